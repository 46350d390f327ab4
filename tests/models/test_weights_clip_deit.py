"""The ``clip`` (OpenAI CLIP / open_clip image towers) and ``deit`` (DeiT / timm training checkpoints)
teacher formats of :mod:`fastkd.models.weights`, on checkpoints written here."""

import argparse
import warnings
from collections import OrderedDict

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from fastkd.models import CheckpointError, load_teacher
from fastkd.models.weights import FORMATS, detect_format
from tests.models.test_weights import TINY, TINY_NAME, _mae_checkpoint, _timm_state

WIDTH, LAYERS, HEADS, PATCH, IMAGE, OUTPUT_DIM = 64, 2, 4, 8, 32, 16
CLIP_KWARGS = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=LAYERS, num_heads=HEADS)
CLIP_QUICKGELU = "vit_base_patch16_clip_quickgelu_224"
CLIP_GELU = "vit_base_patch16_clip_224"
# A few keys of a text tower, which the clip format ignores (OpenAI names; positional_embedding is the text one)
TEXT_TOWER = {
    "token_embedding.weight": torch.zeros(10, WIDTH),
    "positional_embedding": torch.zeros(7, WIDTH),
    "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3 * WIDTH, WIDTH),
    "transformer.resblocks.0.ln_1.weight": torch.ones(WIDTH),
    "ln_final.weight": torch.ones(WIDTH),
    "text_projection": torch.zeros(WIDTH, OUTPUT_DIM),
    "logit_scale": torch.tensor(4.6),
}


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """OpenAI CLIP's block: pre-norm ``nn.MultiheadAttention`` and a c_fc / QuickGELU / c_proj MLP."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            [("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):  # [L, B, D], as in CLIP
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class CLIPVisionTower(nn.Module):
    """OpenAI CLIP's ``VisionTransformer`` (the ``visual`` module of a CLIP model), randomly initialised."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, WIDTH, kernel_size=PATCH, stride=PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(WIDTH))
        self.positional_embedding = nn.Parameter(torch.randn((IMAGE // PATCH) ** 2 + 1, WIDTH))
        self.ln_pre = nn.LayerNorm(WIDTH)
        self.transformer = Transformer(WIDTH, LAYERS, HEADS)
        self.ln_post = nn.LayerNorm(WIDTH)
        self.proj = nn.Parameter(torch.randn(WIDTH, OUTPUT_DIM))
        with torch.no_grad():  # every weight and bias random, LayerNorm gains near 1
            for name, param in self.named_parameters():
                param.normal_(std=0.1).add_(1.0 if name.endswith("weight") and "ln_" in name else 0.0)

    def forward(self, x):
        """``(tokens [B, 1+N, D] after ln_post, CLS @ proj [B, OUTPUT_DIM])``."""
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).transpose(0, 1)).transpose(0, 1)
        tokens = self.ln_post(x)
        return tokens, tokens[:, 0] @ self.proj


def _images(size=IMAGE):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _clip_state_dict(tower):
    """A full CLIP model's state dict: the image tower under ``visual.`` beside a text tower."""
    return {**{"visual." + k: v for k, v in tower.state_dict().items()}, **TEXT_TOWER}


def _assert_same_tokens(teacher, tower):
    x = _images()
    with torch.no_grad():
        want, _ = tower(x)
        got = teacher.forward_features(x).tokens
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch, fmt, kwargs", [
    (CLIP_QUICKGELU, "clip", {}),
    (CLIP_GELU, "auto", {"act_layer": "quick_gelu"}),
])
def test_openai_clip_state_dict_gives_the_reference_tokens(tmp_path, arch, fmt, kwargs):
    tower = CLIPVisionTower().eval()
    path = tmp_path / "ViT-tiny-openai.pth"
    torch.save(_clip_state_dict(tower), path)
    assert detect_format(torch.load(path, weights_only=True)) == "clip" and "clip" in FORMATS

    teacher = load_teacher(arch, path, format=fmt, **CLIP_KWARGS, **kwargs)
    _assert_same_tokens(teacher, tower)
    assert isinstance(teacher.model.head, nn.Identity)  # visual.proj is dropped like a classifier
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("layout", ["open_clip_training", "tower_alone"])
def test_open_clip_and_tower_only_layouts_load(tmp_path, layout):
    tower = CLIPVisionTower(seed=2).eval()
    if layout == "open_clip_training":
        state = {"module." + k: v for k, v in _clip_state_dict(tower).items()}
        checkpoint = {"epoch": 32, "name": "ViT-tiny", "state_dict": state, "optimizer": {"state": {}}}
    else:
        checkpoint = tower.state_dict()
    path = tmp_path / f"{layout}.pt"
    torch.save(checkpoint, path)
    assert detect_format(torch.load(path, weights_only=True)) == "clip"
    _assert_same_tokens(load_teacher(CLIP_QUICKGELU, path, **CLIP_KWARGS), tower)


def test_clip_positional_embedding_is_resampled_to_the_model_grid(tmp_path):
    tower = CLIPVisionTower(seed=3)
    path = tmp_path / "clip.pth"
    torch.save(_clip_state_dict(tower), path)
    teacher = load_teacher(CLIP_QUICKGELU, path, format="clip", **{**CLIP_KWARGS, "img_size": 48})
    grid = IMAGE // PATCH
    want = resample_abs_pos_embed(tower.positional_embedding.detach()[None], new_size=[6, 6], old_size=[grid, grid],
                                  num_prefix_tokens=1)
    torch.testing.assert_close(teacher.model.pos_embed, want)
    assert teacher.forward_features(_images(48)).tokens.shape == (2, 1 + 36, WIDTH)


def test_torchscript_and_garbage_files_get_a_clear_error(tmp_path):
    scripted = tmp_path / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; OpenAI's files are TorchScript
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), scripted)
    with pytest.raises(CheckpointError, match=r"TorchScript archive .*torch.save\(model.state_dict\(\)"):
        load_teacher(CLIP_QUICKGELU, scripted, format="clip", **CLIP_KWARGS)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"PK\x03\x04 not really a zip file" * 8)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_teacher(CLIP_QUICKGELU, garbage, format="clip", **CLIP_KWARGS)


def test_clip_into_the_wrong_arch_names_the_mismatched_keys(tmp_path):
    path = tmp_path / "clip.pth"
    torch.save(_clip_state_dict(CLIPVisionTower(seed=4)), path)
    with pytest.raises(CheckpointError, match=r"format 'clip'.*shape mismatches .*'blocks.0.attn.qkv.weight: "
                                              r"checkpoint .192, 64. vs model .96, 32."):
        load_teacher(CLIP_QUICKGELU, path, **{**CLIP_KWARGS, "embed_dim": 32})
    with pytest.raises(CheckpointError) as info:  # a ViT without CLIP's ln_pre (and with a patch-embedding bias)
        load_teacher(TINY_NAME, path, **CLIP_KWARGS)
    message = str(info.value)
    assert "missing keys ['patch_embed.proj.bias']" in message and "'norm_pre.weight'" in message
    with pytest.raises(CheckpointError, match="requested as format 'deit' but looks like 'clip'"):
        load_teacher(CLIP_QUICKGELU, path, format="deit", **CLIP_KWARGS)


def _deit_checkpoint(model):
    """A DeiT training checkpoint (main.py's layout) of ``model``."""
    return {"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4}]},
            "lr_scheduler": {"last_epoch": 3}, "epoch": 3, "args": argparse.Namespace(model="deit_tiny")}


def _reference_tokens(model, x):
    with torch.no_grad():
        return model.eval().forward_features(x)


def test_deit_training_checkpoint_detects_deit_and_loads_strictly(tmp_path):
    torch.manual_seed(5)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, **TINY)
    path = tmp_path / "checkpoint.pth"
    torch.save(_deit_checkpoint(model), path)
    assert detect_format(torch.load(path, weights_only=False)) == "deit"

    for fmt in ("auto", "deit", "mae"):  # mae: MAE's encoder-only releases share this layout
        teacher = load_teacher(TINY_NAME, path, format=fmt, **TINY)
        torch.testing.assert_close(teacher.forward_features(_images()).tokens, _reference_tokens(model, _images()))
    with pytest.raises(CheckpointError, match=r"format 'deit'.*missing keys \['blocks.2"):
        load_teacher(TINY_NAME, path, **{**TINY, "depth": 3})


def test_mae_layout_still_detects_mae_and_is_not_deit(tmp_path):
    path = tmp_path / "mae_pretrain.pth"
    torch.save(_mae_checkpoint(_timm_state(TINY_NAME, 6, **TINY)), path)
    assert detect_format(torch.load(path, weights_only=False)) == "mae"
    with pytest.raises(CheckpointError, match="requested as format 'deit' but looks like 'mae'"):
        load_teacher(TINY_NAME, path, format="deit", **TINY)


def test_distilled_deit_loads_into_a_vit_with_one_register_token(tmp_path):
    torch.manual_seed(7)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10, **TINY)
    path = tmp_path / "deit_distilled.pth"
    torch.save(_deit_checkpoint(model), path)
    assert {"dist_token", "head_dist.weight"} <= torch.load(path, weights_only=False)["model"].keys()

    teacher = load_teacher(TINY_NAME, path, reg_tokens=1, **TINY)  # head.* and head_dist.* dropped
    assert teacher.num_prefix_tokens == 2
    torch.testing.assert_close(teacher.model.reg_token, model.dist_token)
    torch.testing.assert_close(teacher.forward_features(_images()).tokens, _reference_tokens(model, _images()))
    with pytest.raises(CheckpointError, match=r"distillation token 'dist_token'.*reg_tokens=1 \(this one has 0"):
        load_teacher(TINY_NAME, path, **TINY)
    with pytest.raises(TypeError, match="overrides the token embedding"):
        load_teacher("deit_tiny_distilled_patch16_224", path, **TINY)
