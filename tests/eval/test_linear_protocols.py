"""The papers' linear-probe protocols (DINO eval_linear, MoCo v3 main_lincls) at CPU size: a
2-block 32 px ViT on the sample dataset, augmented crops every step, one head per swept lr."""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from fastkd.data import build_loader, build_recipe, write_sample_dataset
from fastkd.data.recipes import ViewSpec
from fastkd.eval.linear_protocols import (LINEAR_PROTOCOLS, LinearProtocol, evaluate_linear_protocol, feature_layout,
                                          protocol_features)
from fastkd.models import build_backbone

RUN = dict(batch_size=8, backend="torch", num_workers=0, progress=False)
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    return (write_sample_dataset(root / "train", images=24, seed=0),
            write_sample_dataset(root / "val", images=12, seed=1))


def frozen_vit(**overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_backbone("vit_tiny_patch16_224", **{**TINY_VIT, **overrides}).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def vit():
    return frozen_vit()


def reference_features(backbone, images, n_last_blocks, avgpool_patches):
    """timm's own token path, one block at a time: CLS of norm(h_l) for the last n blocks, then the
    mean of norm(h_L)'s patch tokens (prefix tokens excluded)."""
    model = backbone.model
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    normed = []
    for block in model.blocks:
        x = block(x)
        normed.append(model.norm(x))
    parts = [tokens[:, 0] for tokens in normed[-n_last_blocks:]]
    if avgpool_patches:
        parts.append(normed[-1][:, model.num_prefix_tokens:].mean(dim=1))
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("reg_tokens", [0, 2])
@pytest.mark.parametrize("n_last_blocks, avgpool_patches", [(1, False), (1, True), (2, False), (2, True)])
def test_features_match_a_plain_loop_over_blocks(reg_tokens, n_last_blocks, avgpool_patches):
    backbone = frozen_vit(reg_tokens=reg_tokens)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = protocol_features(backbone, images, n_last_blocks=n_last_blocks, avgpool_patches=avgpool_patches)
        expected = reference_features(backbone, images, n_last_blocks, avgpool_patches)
    assert ours.shape == (3, 32 * (n_last_blocks + avgpool_patches))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    if n_last_blocks == 1 and not avgpool_patches:  # the backbone's own global feature
        torch.testing.assert_close(ours, backbone(images), rtol=0, atol=0)


def test_feature_layout_follows_the_model():
    wide = build_backbone("vit_tiny_patch16_224", img_size=16, patch_size=16, embed_dim=768, depth=1, num_heads=12)
    assert feature_layout(frozen_vit(depth=4), "dino") == (4, False)  # DINO ViT-S: 4 blocks, no patch average
    assert feature_layout(frozen_vit(), "dino") == (2, False)  # ... at most the depth when left to the rule
    assert feature_layout(wide, "dino") == (1, True)  # DINO ViT-B: 1 block + patch average
    assert feature_layout(frozen_vit(depth=4), "mocov3") == (1, False)
    assert feature_layout(frozen_vit(), "dino", n_last_blocks=1, avgpool_patches=True) == (1, True)
    plain = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
    assert feature_layout(plain, "dino") == (1, False)
    with pytest.raises(ValueError, match="need a fastkd ViT backbone; the model is a Sequential"):
        feature_layout(plain, "dino", avgpool_patches=True)
    with pytest.raises(ValueError, match="n_last_blocks must be at most the model's depth 2, got 3"):
        feature_layout(frozen_vit(), "dino", n_last_blocks=3)
    assert LINEAR_PROTOCOLS["mocov3"].base_lrs(is_resnet=True) == (0.1,)
    assert LINEAR_PROTOCOLS["mocov3"].base_lrs() == (3.0,)


def test_every_protocol_value_names_its_source():
    for name, protocol in LINEAR_PROTOCOLS.items():
        assert protocol.name == name
        for key in ("epochs", "base_lr", "batch_size", "optimizer", "schedule", "n_last_blocks", "avgpool_patches",
                    "init", "batchnorm", "train_augmentation", "val_augmentation"):
            assert protocol.sources.get(key), (name, key)
    dino, mocov3 = LINEAR_PROTOCOLS["dino"], LINEAR_PROTOCOLS["mocov3"]
    assert (dino.epochs, dino.base_lr, dino.momentum, dino.weight_decay) == (100, 0.001, 0.9, 0.0)
    assert (mocov3.epochs, mocov3.base_lr, mocov3.momentum, mocov3.weight_decay) == (90, 3.0, 0.9, 0.0)
    assert not dino.batchnorm and not mocov3.batchnorm


@pytest.mark.parametrize("protocol", ["dino", "mocov3"])
def test_end_to_end_run_reports_every_field(splits, vit, protocol):
    result = evaluate_linear_protocol(vit, *splits, protocol, epochs=2, **RUN)
    expected_lr = LINEAR_PROTOCOLS[protocol].base_lr
    assert result.protocol == protocol and result.epochs == 2 and result.batch_size == 8
    assert (result.image_size, result.resize) == (32, 37)  # the model's own size, resize 32 * 256 / 224
    assert [entry["lr"] for entry in result.sweep] == [expected_lr] and result.lr == expected_lr
    assert result.scaled_lr == pytest.approx(expected_lr * 8 / 256)
    assert 0.0 <= result.top1 <= result.top5 <= 100.0 and math.isfinite(result.train_loss)
    layout = (2, False) if protocol == "dino" else (1, False)
    assert (result.n_last_blocks, result.avgpool_patches) == layout
    assert result.feature_dim == 32 * layout[0] and result.classifier.weight.shape == (12, result.feature_dim)
    assert result.num_classes == 12 and sum(result.class_counts["val"].values()) == 12
    assert sum(result.class_counts["train"].values()) == 24
    assert "CLS after the final norm" in result.features
    json.dumps(result.to_dict(), allow_nan=False)
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())


def test_lr_sweep_trains_each_head_as_it_would_alone(splits, vit):
    lrs = (0.05, 2.0)
    sweep = evaluate_linear_protocol(vit, *splits, "dino", epochs=2, lrs=lrs, n_last_blocks=1, avgpool_patches=True,
                                     **RUN)
    assert [entry["lr"] for entry in sweep.sweep] == list(lrs) and len(sweep.classifiers) == 2
    assert set(sweep.top1_per_lr) == set(lrs)
    best = max(sweep.sweep, key=lambda e: (e["top1"], e["top5"]))
    assert (sweep.top1, sweep.lr) == (best["top1"], best["lr"])
    for index, lr in enumerate(lrs):
        alone = evaluate_linear_protocol(vit, *splits, "dino", epochs=2, lrs=[lr], n_last_blocks=1,
                                         avgpool_patches=True, **RUN)
        torch.testing.assert_close(sweep.classifiers[index].weight, alone.classifier.weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sweep.classifiers[index].bias, alone.classifier.bias, rtol=1e-6, atol=1e-7)
        assert sweep.sweep[index]["top1"] == alone.top1
        assert sweep.sweep[index]["train_loss"] == pytest.approx(alone.train_loss, rel=1e-6)
    assert not torch.equal(sweep.classifiers[0].weight, sweep.classifiers[1].weight)


@pytest.mark.parametrize("changes", [dict(optimizer="lars"), dict(batchnorm=True, weight_decay=1e-4)])
def test_custom_protocols_run(splits, vit, changes):
    protocol = dataclasses.replace(LINEAR_PROTOCOLS["mocov3"], name="custom", **changes)
    result = evaluate_linear_protocol(vit, *splits, protocol, epochs=1, lrs=[0.1, 1.0], **RUN)
    assert result.protocol == "custom" and result.optimizer == protocol.optimizer
    assert all(math.isfinite(entry["train_loss"]) for entry in result.sweep)
    assert torch.isfinite(result.classifier.weight).all()


def test_a_plain_module_is_probed_on_its_output(splits):
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten()).train()
    result = evaluate_linear_protocol(model, *splits, "dino", epochs=1, image_size=32, **RUN)
    assert (result.n_last_blocks, result.avgpool_patches, result.feature_dim) == (1, False, 48)
    assert "not a fastkd Backbone" in result.features
    assert model.training  # its mode is restored


@pytest.mark.parametrize("options, message", [
    (dict(epochs=0), "epochs must be an integer >= 1"),
    (dict(lrs=[0.1, math.nan]), r"lrs\[1\] must be a finite number"),
    (dict(lrs=[-0.1]), r"lrs\[0\] must be > 0"),
    (dict(lrs=[]), "lrs must hold at least one"),
    (dict(lrs=0.1), "lrs must be a list"),
    (dict(protocol="simclr"), "protocol must be one of"),
    (dict(n_last_blocks=3), "n_last_blocks must be at most the model's depth 2"),
    (dict(n_last_blocks=0), "n_last_blocks must be >= 1"),
    (dict(avgpool_patches="yes"), "avgpool_patches must be"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(image_size=32, resize=16), r"resize must be >= image_size \(32\)"),
    (dict(backend="opencv"), "backend must be one of"),
    (dict(num_workers=-1), "num_workers must be"),
    (dict(seed=-1), "seed must be"),
    (dict(device="tpu"), "device must be"),
])
def test_bad_options_are_refused_before_reading_data(tmp_path, vit, options, message):
    missing = tmp_path / "missing"  # any attempt to read the splits would fail on this instead
    with pytest.raises(ValueError, match=message):
        evaluate_linear_protocol(vit, missing, missing, **{"progress": False, **options})


def test_good_options_then_read_the_splits(tmp_path, vit):
    with pytest.raises(FileNotFoundError, match="missing"):
        evaluate_linear_protocol(vit, tmp_path / "missing", tmp_path / "missing", "mocov3", progress=False)


def test_protocol_fields_are_checked():
    with pytest.raises(ValueError, match="LinearProtocol.epochs"):
        LinearProtocol(name="x", epochs=0, base_lr=0.1)
    with pytest.raises(ValueError, match=r"LinearProtocol.lrs\[0\]"):
        LinearProtocol(name="x", epochs=1, base_lr=0.1, lrs=(math.inf,))
    with pytest.raises(ValueError, match="LinearProtocol.optimizer"):
        LinearProtocol(name="x", epochs=1, base_lr=0.1, optimizer="adamw")


def test_linear_recipe_is_random_resized_crop_and_flip_only():
    (view,) = build_recipe("linear").views
    assert view == ViewSpec(size=224, scale=(0.08, 1.0), interpolation="bicubic", flip_p=0.5)
    assert view.jitter is None and view.grayscale_p == view.blur_p == view.solarize_p == 0.0


def test_linear_recipe_draws_new_crops_every_epoch(splits):
    def epoch(recipe, number, **overrides):
        loader = build_loader(splits[0], recipe, batch_size=24, backend="torch", num_workers=0, shuffle=False,
                              drop_last=False, size=16, **overrides)
        loader.set_epoch(number)
        (batch,) = list(loader)
        return batch.views[0]

    first, again, second = epoch("linear", 0), epoch("linear", 0), epoch("linear", 1)
    assert torch.equal(first, again)  # a pure function of (seed, epoch, image)
    assert not torch.equal(first, second)
    assert (first - second).flatten(1).abs().amax(1).gt(0).float().mean() > 0.9  # nearly every image re-cropped
    assert torch.equal(epoch("eval", 0, resize=18), epoch("eval", 1, resize=18))  # the val crops never change
