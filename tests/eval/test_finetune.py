"""End-to-end fine-tuning (fastkd.eval.finetune): layer-wise lr groups, the rebuilt model (drop
path, pooling, copied weights), the schedule, short runs of both recipes on 32-px sample images,
option checks before any data is read, the output folder and val classes the train split lacks."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
from timm.layers import DropPath

from fastkd.data import write_sample_dataset
from fastkd.eval.finetune import (FINETUNE_RECIPES, FinetuneRecipe, _optimizer_and_schedule, build_finetune_model,
                                  finetune, layer_decay_param_groups, load_finetuned)
from fastkd.eval.models import load_eval_model
from fastkd.models import Backbone, build_backbone, save_backbone

DEPTH = 2
RUN = dict(batch_size=8, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    return (write_sample_dataset(root / "train", images=24, seed=0),
            write_sample_dataset(root / "val", images=12, seed=1))


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=DEPTH,
                              num_heads=2)
    return save_backbone(backbone, tmp_path_factory.mktemp("run") / "student.pt")


def _layer(name: str) -> int:
    """The layer id: embeddings 0, block i (0-based) i + 1, fc_norm and head L + 1 (as MAE's); the final
    norm (token pooling) L, with the last block (timm's group_matcher; MAE's lr_decay.py says L + 1)."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return DEPTH if name.startswith("norm.") else DEPTH + 1


@pytest.mark.parametrize("global_pool", ["avg", "token"])
def test_layer_decay_groups_follow_the_formula(student, global_pool):
    model = build_finetune_model(load_eval_model(student), 12, global_pool=global_pool)
    decay = 0.65
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=decay)
    found = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert len(found) == sum(len(g["params"]) for g in groups)  # each parameter in one group
    named = dict(model.model.named_parameters())
    assert set(found) == {id(p) for p in named.values()}
    for name, param in named.items():
        scale, weight_decay = found[id(param)]
        assert math.isclose(scale, decay ** (DEPTH + 1 - _layer(name))), name
        no_decay = param.ndim <= 1 or name in ("cls_token", "pos_embed")
        assert weight_decay == (0.0 if no_decay else 0.05), name
    assert found[id(named["head.weight"])] == (1.0, 0.05) and found[id(named["head.bias"])] == (1.0, 0.0)
    assert math.isclose(found[id(named["patch_embed.proj.weight"])][0], decay ** (DEPTH + 1))


def test_schedule_warms_up_then_decays_each_group_at_its_scale(student):
    model = build_finetune_model(load_eval_model(student), 12)
    recipe = dataclasses.replace(FINETUNE_RECIPES["mae"], epochs=4, batch_size=8, warmup_epochs=1)
    optimizer, schedule, warmup = _optimizer_and_schedule(model, recipe, steps_per_epoch=10)
    assert warmup == 1 and recipe.lr == 5e-4 * 8 / 256

    def lrs(step):
        schedule(step)
        return [(g["lr"], g["lr_scale"]) for g in optimizer.param_groups]

    assert all(lr == 0.0 for lr, _ in lrs(0))  # MAE warms up from 0
    assert all(math.isclose(lr, 0.5 * recipe.lr * s) for lr, s in lrs(5))
    assert all(math.isclose(lr, recipe.lr * s) for lr, s in lrs(10))  # peak at the end of the warm-up
    middle = recipe.min_lr + (recipe.lr - recipe.min_lr) * 0.5
    assert all(math.isclose(lr, middle * s) for lr, s in lrs(25))
    assert all(math.isclose(lr, recipe.min_lr * s) for lr, s in lrs(40))


def test_rebuilt_model_has_drop_path_and_the_loaded_weights(student):
    loaded = load_eval_model(student)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    model = build_finetune_model(loaded, 5, global_pool="avg", drop_path=0.2)
    assert isinstance(model, Backbone) and model.timm_kwargs["drop_path_rate"] == 0.2
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in model.model.blocks]
    assert rates == pytest.approx([0.2 * i / (DEPTH - 1) for i in range(DEPTH)])  # timm's stochastic-depth rule
    last = model.model.blocks[-1]
    assert isinstance(last.drop_path1, DropPath) and isinstance(last.drop_path2, DropPath)
    state = model.model.state_dict()
    shared = [k for k in before if not k.startswith("norm.")]
    assert all(torch.equal(state[k], before[k]) for k in shared)
    # avg pooling as MAE: the final norm moves after the pool and starts fresh; a new 5-way head
    assert isinstance(model.model.norm, torch.nn.Identity) and torch.equal(state["fc_norm.weight"], torch.ones(32))
    assert model.model.global_pool == "avg" and state["head.weight"].shape == (5, 32)
    assert model.model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    # token pooling keeps the pre-trained final norm
    token = build_finetune_model(loaded, 5, global_pool="token")
    assert torch.equal(token.model.state_dict()["norm.weight"], before["norm.weight"])
    # the loaded model is untouched: frozen, no classifier, same weights
    assert not any(p.requires_grad for p in loaded.parameters()) and "head.weight" not in loaded.model.state_dict()
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in before.items())
    # another image size: the positional embedding is resampled to the new grid
    larger = build_finetune_model(loaded, 5, image_size=48)
    assert larger.model.pos_embed.shape == (1, 1 + 36, 32)
    with pytest.raises(ValueError, match="image_size must be a multiple of the patch size 8"):
        build_finetune_model(loaded, 5, image_size=30)


@pytest.mark.parametrize("recipe", ["mae", "deit"])
def test_short_run_of_each_recipe(splits, student, recipe):
    loaded = load_eval_model(student)
    result = finetune(loaded, *splits, recipe, epochs=2, blr=0.05, seed=1, **RUN)
    assert len(result.history) == 2 and [h["epoch"] for h in result.history] == [1, 2]
    for h in result.history:
        assert all(math.isfinite(h[key]) for key in ("train_loss", "val_loss", "top1", "top5", "lr"))
    assert 0.0 <= result.top1 <= result.top5 <= 100.0 and result.best_top1 >= result.top1
    assert result.recipe == recipe and result.num_classes == 12 and result.image_size == 32
    values = result.recipe_values
    assert values["epochs"] == 2 and values["batch_size"] == 8 and values["warmup_epochs"] == 1
    assert values["lr"] == pytest.approx(0.05 * 8 / (256 if recipe == "mae" else 512))
    assert values["global_pool"] == ("avg" if recipe == "mae" else "token")
    assert sum(result.class_counts["train"].values()) == 24 and len(result.classes) == 12
    assert not result.model.training and result.model.model.num_classes == 12


def test_same_seed_same_run(splits, student):
    loaded = load_eval_model(student)
    runs = [finetune(loaded, *splits, "mae", epochs=1, seed=3, **RUN) for _ in range(2)]
    assert runs[0].history[0]["train_loss"] == runs[1].history[0]["train_loss"]
    assert runs[0].top1 == runs[1].top1


@pytest.mark.parametrize("options, match", [
    (dict(epochs=0), "epochs"),
    (dict(blr=0.0), "blr"),
    (dict(blr=float("nan")), "blr"),
    (dict(layer_decay=0.0), "layer_decay"),
    (dict(layer_decay=1.5), "layer_decay"),
    (dict(drop_path=1.0), "drop_path"),
    (dict(batch_size=7), "batch_size must be even"),
    (dict(image_size=30), "image_size"),
    (dict(global_pool="max"), "global_pool"),
    (dict(recipe="beit"), "recipe"),
    (dict(precision="fp16"), "precision"),
    (dict(num_workers=-1), "num_workers"),
])
def test_options_are_checked_before_any_data_is_read(student, tmp_path, options, match):
    options = {**RUN, **options}
    recipe = options.pop("recipe", "mae")
    with pytest.raises(ValueError, match=match):
        finetune(load_eval_model(student), tmp_path / "no_train", tmp_path / "no_val", recipe, **options)


def test_model_and_recipe_kinds_are_checked(student, tmp_path):
    with pytest.raises(TypeError, match="model must be a fastkd Backbone"):
        finetune(torch.nn.Linear(2, 2), tmp_path / "a", tmp_path / "b", **RUN)
    with pytest.raises(ValueError, match="label_smoothing"):
        dataclasses.replace(FINETUNE_RECIPES["deit"], label_smoothing=1.0)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="output must be a folder"):
        finetune(load_eval_model(student), tmp_path / "no_train", tmp_path / "no_val", output=tmp_path / "file", **RUN)
    with pytest.raises(ValueError, match="global_pool must be 'avg' for the ResNet"):
        finetune(build_backbone("resnet18"), tmp_path / "no_train", tmp_path / "no_val", "deit", **RUN)
    with pytest.raises(FileNotFoundError, match="no_train"):  # valid options: only now is the data read
        finetune(load_eval_model(student), tmp_path / "no_train", tmp_path / "no_val", **RUN)


def test_recipes_hold_the_papers_values():
    mae, deit = FINETUNE_RECIPES["mae"], FINETUNE_RECIPES["deit"]
    assert isinstance(mae, FinetuneRecipe) and mae.lr == pytest.approx(2e-3) and deit.lr == pytest.approx(1e-3)
    assert (mae.layer_decay, mae.epochs, mae.global_pool, mae.min_lr) == (0.65, 100, "avg", 1e-6)
    assert (deit.layer_decay, deit.epochs, deit.global_pool) == (1.0, 300, "token")
    for recipe in (mae, deit):
        assert (recipe.mixup, recipe.cutmix, recipe.label_smoothing, recipe.re_prob, recipe.drop_path) == (
            0.8, 1.0, 0.1, 0.25, 0.1)
        assert recipe.auto_augment == "rand-m9-mstd0.5-inc1" and recipe.weight_decay == 0.05


def test_output_folder_holds_a_loadable_model_and_json(splits, student, tmp_path):
    out = tmp_path / "out"
    result = finetune(load_eval_model(student), *splits, "mae", epochs=1, output=out, **RUN)
    assert sorted(p.name for p in out.iterdir()) == ["finetune.json", "finetuned.pt"]
    report = json.loads((out / "finetune.json").read_text())
    assert report["top1"] == result.top1 and len(report["history"]) == 1 and report["recipe"] == "mae"
    assert report["classes"] == list(result.classes) and report["model_file"] == str(out / "finetuned.pt")
    images = torch.randn(2, 3, 32, 32)
    features = load_eval_model(out / "finetuned.pt")  # the trunk, as every evaluation loads models
    assert isinstance(features, Backbone) and features(images).shape == (2, 32)
    classifier = load_finetuned(out)  # the trunk and its classifier
    assert torch.allclose(classifier.model(images), result.model.model(images), atol=1e-6)


def test_val_class_missing_from_train_is_refused(splits, student, tmp_path):
    train, val = splits
    extra = tmp_path / "val_extra"
    shutil.copytree(val, extra)
    (extra / "unicorns").mkdir()
    shutil.copy(next(val.rglob("*.jpg")), extra / "unicorns" / "u.jpg")
    with pytest.raises(ValueError, match="unicorns"):
        finetune(load_eval_model(student), train, extra, epochs=1, **RUN)
    with pytest.raises(ValueError, match="batch_size 32 exceeds the 24 train images"):
        finetune(load_eval_model(student), train, val, epochs=1, **{**RUN, "batch_size": 32})
