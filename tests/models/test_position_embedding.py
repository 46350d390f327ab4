"""MoCo v3's fixed 2-D sin-cos position embedding against the formula, written out per element."""

import math

import pytest
import torch

from fastkd.models import build_backbone
from fastkd.models.position_embedding import set_sincos_pos_embed, sincos_2d_pos_embed


def formula(h: int, w: int, dim: int) -> torch.Tensor:
    quarter = dim // 4
    out = torch.zeros(h * w, dim, dtype=torch.float64)
    for r in range(h):
        for c in range(w):
            for k in range(quarter):
                omega = 1.0 / 10000 ** (k / quarter)
                out[r * w + c, k] = math.sin(r * omega)
                out[r * w + c, quarter + k] = math.cos(r * omega)
                out[r * w + c, 2 * quarter + k] = math.sin(c * omega)
                out[r * w + c, 3 * quarter + k] = math.cos(c * omega)
    return out.float()


def test_table_matches_formula_rectangular_grid():
    torch.testing.assert_close(sincos_2d_pos_embed(3, 5, 16), formula(3, 5, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_pos_embed(2, 2, 6)


def test_set_on_timm_vit_is_fixed_and_frozen():
    backbone = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3)
    set_sincos_pos_embed(backbone)
    pos = backbone.model.pos_embed
    assert pos.shape == (1, 17, 48) and not pos.requires_grad
    torch.testing.assert_close(pos[0, 0], torch.zeros(48))  # the CLS token: no position
    torch.testing.assert_close(pos[0, 1:], formula(4, 4, 48))
    with pytest.raises(TypeError, match="VisionTransformer"):
        set_sincos_pos_embed(build_backbone("resnet18"))
