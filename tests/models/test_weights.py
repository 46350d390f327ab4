import argparse
import os

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from fastkd.models import CheckpointError, MAEDecoder, MoCoPredictor, MoCoProjector, build_backbone, load_teacher
from fastkd.models import save_backbone
from fastkd.models.weights import FASTKD_FORMAT, FASTKD_FORMAT_VERSION, FORMATS, detect_format

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
TINY_NAME = "vit_tiny_patch16_224"

# A few key names of the official MoCo v3 ViT-S/16 checkpoint (vit-s-300ep.pth.tar), which the layout
# generated from timm + the MoCo v3 MLP below must reproduce.
MOCOV3_VIT_S_KEYS = [
    "module.base_encoder.cls_token",
    "module.base_encoder.pos_embed",
    "module.base_encoder.patch_embed.proj.weight",
    "module.base_encoder.blocks.0.norm1.weight",
    "module.base_encoder.blocks.0.attn.qkv.weight",
    "module.base_encoder.blocks.0.attn.proj.bias",
    "module.base_encoder.blocks.11.mlp.fc2.bias",
    "module.base_encoder.norm.bias",
    "module.base_encoder.head.0.weight",
    "module.base_encoder.head.7.running_mean",
    "module.momentum_encoder.blocks.5.mlp.fc1.weight",
    "module.momentum_encoder.head.6.weight",
    "module.predictor.0.weight",
    "module.predictor.3.weight",
]


def _timm_state(name, seed, **kwargs):
    """Random weights under the real timm names (init skipped for the large ViT, then filled)."""
    torch.manual_seed(seed)
    state = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).state_dict()
    for value in state.values():
        if value.is_floating_point():
            value.normal_()
    return state


def _prefixed(prefix, state):
    return {prefix + k: v for k, v in state.items()}


def _assert_loaded(backbone, state):
    loaded = backbone.model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_official_mocov3_vit_s16_layout_loads_base_and_momentum_encoders(tmp_path):
    base = _timm_state("vit_small_patch16_224", 0, num_heads=12, weight_init="skip")
    momentum = {k: v + 1 for k, v in base.items()}
    state = {
        **_prefixed("module.base_encoder.", base),
        **_prefixed("module.base_encoder.head.", MoCoProjector(384, 32, 16).mlp.state_dict()),
        **_prefixed("module.momentum_encoder.", momentum),
        **_prefixed("module.momentum_encoder.head.", MoCoProjector(384, 32, 16).mlp.state_dict()),
        **_prefixed("module.predictor.", MoCoPredictor(16, 32, 16).mlp.state_dict()),
    }
    assert set(MOCOV3_VIT_S_KEYS) <= state.keys()
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state, "optimizer": {"state": {}}}, path)

    teacher = load_teacher("vit_small_patch16_224", path, num_heads=12)
    _assert_loaded(teacher, base)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    _assert_loaded(load_teacher("vit_small_patch16_224", path, format="mocov3", encoder="momentum", num_heads=12),
                   momentum)
    # timm's vit_small has 6 heads: same tensor shapes, wrong features; refused with the fix
    with pytest.raises(CheckpointError, match=r"has 12 attention heads.*has 6: build it with num_heads=12 "
                                              r"\(YAML: kwargs: \{num_heads: 12\}\)"):
        load_teacher("vit_small_patch16_224", path)


def test_mocov3_resnet_layout_drops_fc_projector(tmp_path):
    kwargs = dict(layers=(1, 1, 1, 1))
    base = _timm_state("resnet18", 1, **kwargs)
    state = {**_prefixed("module.base_encoder.", base),
             **_prefixed("module.base_encoder.fc.", MoCoProjector(512, 16, 8, num_layers=2).mlp.state_dict()),
             **_prefixed("module.momentum_encoder.", base)}
    path = tmp_path / "r18.pth.tar"
    torch.save({"state_dict": state}, path)
    _assert_loaded(load_teacher("resnet18", path, **kwargs), base)


def _mae_checkpoint(encoder):
    decoder = MAEDecoder(48, 4, 8, decoder_dim=32, depth=1, num_heads=4)
    renamed = {"embed": "decoder_embed", "blocks": "decoder_blocks", "norm": "decoder_norm", "pred": "decoder_pred"}
    state = dict(encoder)
    for key, value in decoder.state_dict().items():
        head, _, rest = key.partition(".")
        state[f"{renamed[head]}.{rest}" if head in renamed else key] = value
    state["decoder_pos_embed"] = torch.zeros(1, 17, 32)
    return {"model": state, "epoch": 799, "args": argparse.Namespace(mask_ratio=0.75)}


def test_official_mae_layout_ignores_decoder_and_resizes_pos_embed(tmp_path):
    encoder = _timm_state(TINY_NAME, 2, **TINY)
    path = tmp_path / "mae_pretrain.pth"
    torch.save(_mae_checkpoint(encoder), path)
    assert {"decoder_embed.weight", "mask_token", "decoder_blocks.0.attn.qkv.weight"} <= torch.load(
        path, weights_only=False)["model"].keys()
    _assert_loaded(load_teacher(TINY_NAME, path, **TINY), encoder)

    larger = load_teacher(TINY_NAME, path, format="mae", **{**TINY, "img_size": 48})
    want = resample_abs_pos_embed(encoder["pos_embed"], new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(larger.model.pos_embed, want)
    torch.testing.assert_close(larger.model.blocks[1].mlp.fc1.weight, encoder["blocks.1.mlp.fc1.weight"])


def test_timm_state_dict_with_classifier_loads(tmp_path):
    torch.manual_seed(3)
    model = timm.create_model(TINY_NAME, pretrained=False, num_classes=10, **TINY)
    path = tmp_path / "timm.pth"
    torch.save(model.state_dict(), path)
    teacher = load_teacher(TINY_NAME, path, frozen=False, **TINY)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    _assert_loaded(teacher, {k: v for k, v in model.state_dict().items() if not k.startswith("head.")})


def test_save_backbone_round_trip_is_atomic(tmp_path):
    backbone = build_backbone(TINY_NAME, **TINY)
    path = save_backbone(backbone, tmp_path / "sub" / "student.pth")
    assert os.listdir(path.parent) == ["student.pth"]
    loaded = load_teacher(TINY_NAME, path)  # the architecture kwargs come from the file
    _assert_loaded(loaded, backbone.model.state_dict())
    with pytest.raises(CheckpointError, match="vit_small_patch16_224"):
        load_teacher("vit_small_patch16_224", path)
    with pytest.raises(TypeError, match="Backbone"):
        save_backbone(backbone.model, tmp_path / "x.pth")
    saved = torch.load(path, weights_only=True)
    assert (saved["format"], saved["version"]) == (FASTKD_FORMAT, FASTKD_FORMAT_VERSION)
    assert detect_format(saved) == FASTKD_FORMAT and FASTKD_FORMAT in FORMATS


def test_save_backbone_writes_through_the_durable_writer(tmp_path, monkeypatch):
    import fastkd.durable

    written = []
    real = fastkd.durable.atomic_write
    monkeypatch.setattr(fastkd.durable, "atomic_write", lambda path, write: written.append(path) or real(path, write))
    path = save_backbone(build_backbone(TINY_NAME, **TINY), tmp_path / "student.pt")
    assert written == [path] and path.is_file()

def test_mismatched_checkpoint_lists_keys_and_format(tmp_path):
    path = tmp_path / "mae.pth"
    torch.save(_mae_checkpoint(_timm_state(TINY_NAME, 4, **TINY)), path)
    with pytest.raises(CheckpointError) as info:
        load_teacher(TINY_NAME, path, **{**TINY, "depth": 3})
    message = str(info.value)
    assert "'mae'" in message and "blocks.2.attn.qkv.weight" in message and "missing keys" in message
    with pytest.raises(CheckpointError, match="shape mismatches.*blocks.0.attn.proj.bias: checkpoint .48,. vs model .24,."):
        load_teacher(TINY_NAME, path, **{**TINY, "embed_dim": 24})
    with pytest.raises(CheckpointError, match="requested as format 'mocov3'"):
        load_teacher(TINY_NAME, path, format="mocov3", **TINY)
    with pytest.raises(ValueError, match="encoder"):
        load_teacher(TINY_NAME, path, encoder="momentum", **TINY)
    extra = _timm_state(TINY_NAME, 4, **TINY)
    extra["blocks.9.attn.qkv.weight"] = torch.zeros(1)
    torch.save(extra, path)
    with pytest.raises(CheckpointError, match="format 'timm'.*unexpected keys ..blocks.9.attn.qkv.weight"):
        load_teacher(TINY_NAME, path, **TINY)


def test_corrupted_and_foreign_files_get_a_clear_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    good = tmp_path / "good.pth"
    torch.save(_timm_state(TINY_NAME, 5, **TINY), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (text, empty, truncated):
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
            load_teacher(TINY_NAME, path, **TINY)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, unsafe)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint .*Unsupported global"):
        load_teacher(TINY_NAME, unsafe, **TINY)
    odd = tmp_path / "odd.pth"
    torch.save({"weights": [1, 2]}, odd)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        load_teacher(TINY_NAME, odd, **TINY)
    with pytest.raises(FileNotFoundError):
        load_teacher(TINY_NAME, tmp_path / "missing.pth", **TINY)
    with pytest.raises(ValueError, match="format"):
        load_teacher(TINY_NAME, good, format="dino", **TINY)
