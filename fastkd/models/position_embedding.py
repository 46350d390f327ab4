"""Position embeddings of ViTs: the fixed 2-D sin-cos tables of MoCo v3 and MAE, and DINO's resize.

Sin-cos, for the patch at grid row ``r`` and column ``c`` of an ``H x W`` grid and width ``D``
(``D % 4 == 0``), with ``omega_k = 1 / T ** (k / (D / 4))``, ``k = 0 .. D/4 - 1`` and ``T = 10000``::

    pos[r * W + c] = cat(sin(r omega), cos(r omega), sin(c omega), cos(c omega))   # rows first (MoCo v3)
    pos[r * W + c] = cat(sin(c omega), cos(c omega), sin(r omega), cos(r omega))   # columns first (MAE)

and 0 for the prefix tokens. Set on a ViT, the embedding is a frozen parameter (``requires_grad=False``).

DINO's resize (:func:`resize_pos_embed_dino`, also MOKD's): bicubic ``F.interpolate`` of the
``[gh, gw]`` grid with *scale factors* ``(h + 0.1) / gh`` and ``(w + 0.1) / gw``, no antialiasing
(unlike timm's ``resample_abs_pos_embed`` to the size ``(h, w)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fastkd.checks import check_positive_ints


def vit_of(model: nn.Module, purpose: str) -> VisionTransformer:
    """The timm ``VisionTransformer`` ``model`` is (or a fastkd ``Backbone`` holds); ``TypeError`` otherwise."""
    vit = getattr(model, "model", model)
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"{purpose} needs a timm VisionTransformer, got {type(vit).__name__}")
    return vit


def sincos_2d_pos_embed(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0, *,
                        columns_first: bool = False) -> torch.Tensor:
    """The ``[grid_h * grid_w, dim]`` sin-cos table of the module docstring (row-major patches)."""
    check_positive_ints(grid_h=grid_h, grid_w=grid_w, dim=dim)
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)[:, None] * omega  # [HW, D/4]
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)[:, None] * omega
    first, second = (cols, rows) if columns_first else (rows, cols)
    return torch.cat([first.sin(), first.cos(), second.sin(), second.cos()], dim=1).float()


@torch.no_grad()
def set_sincos_pos_embed(model: nn.Module, temperature: float = 10000.0, *, columns_first: bool = False) -> None:
    """Replace a ViT's (or Backbone's) learned position embedding by the frozen sin-cos one (MAE: columns first)."""
    vit = vit_of(model, "the sin-cos position embedding")
    if vit.pos_embed is None:
        raise ValueError("this ViT has no absolute position embedding to replace (pos_embed is None)")
    grid_h, grid_w = vit.patch_embed.grid_size
    pos = vit.pos_embed
    prefix = pos.shape[1] - grid_h * grid_w
    table = sincos_2d_pos_embed(grid_h, grid_w, vit.embed_dim, temperature, columns_first=columns_first)
    pos.zero_()
    pos[0, prefix:] = table.to(pos.dtype)
    pos.requires_grad_(False)


def resize_pos_embed_dino(pos: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``pos [1, gh*gw, D]`` on ``grid`` resized to ``size = (h, w)`` by DINO's interpolation (module doc)."""
    (gh, gw), (h, w) = grid, size
    if (h, w) == (gh, gw):
        return pos
    dim = pos.shape[-1]
    maps = pos.reshape(1, gh, gw, dim).permute(0, 3, 1, 2)
    maps = F.interpolate(maps.float(), scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic",
                         align_corners=False)
    assert tuple(maps.shape[-2:]) == (h, w), "the +0.1 keeps the output size exact"
    return maps.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, dim)
