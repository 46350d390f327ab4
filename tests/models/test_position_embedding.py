"""MoCo v3's fixed 2-D sin-cos position embedding against the formula, written out per element."""

import math

import pytest
import torch

from fastkd.models import build_backbone
from fastkd.models.position_embedding import set_sincos_pos_embed, sincos_2d_pos_embed
from tests.methods.plain import dino_interpolate_pos_encoding


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


def test_mae_table_puts_the_column_first():
    """MAE's get_2d_sincos_pos_embed: ``np.meshgrid(grid_w, grid_h)`` makes the first half the column's."""
    quarter = 4
    table = sincos_2d_pos_embed(3, 5, 16, columns_first=True)
    rows_first = formula(3, 5, 16)
    torch.testing.assert_close(table, torch.cat([rows_first[:, 2 * quarter:], rows_first[:, :2 * quarter]], 1))


@pytest.mark.parametrize("size", [16, 24, 40])
def test_dino_resize_on_local_crops_matches_dino(size):
    """A ViT on crops smaller (or larger) than it was built for, ``pos_embed_resize="dino"``: the
    tokens' position embedding is DINO's interpolation, not timm's antialiased resize."""
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, dynamic_img_size=True)
    dino = build_backbone("vit_tiny_patch16_224", pos_embed_resize="dino", **kwargs)
    timm_resize = build_backbone("vit_tiny_patch16_224", **kwargs)
    timm_resize.load_state_dict(dino.state_dict())
    x = torch.randn(2, 3, size, size)
    model = dino.model
    patches = model.patch_embed(x).flatten(1, 2)
    expected = torch.cat([model.cls_token.expand(2, -1, -1), patches], 1) + dino_interpolate_pos_encoding(
        model.pos_embed, size, size, 8)
    torch.testing.assert_close(dino._embed(x, None), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(timm_resize._embed(x, None), expected, atol=1e-4)  # timm antialiases


def test_pos_embed_resize_is_checked():
    with pytest.raises(ValueError, match="pos_embed_resize must be one of"):
        build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3,
                       pos_embed_resize="bilinear")
