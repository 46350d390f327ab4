"""MoCo v3's fixed 2-D sin-cos position embedding for a timm ViT.

For the patch at grid row ``r`` and column ``c`` of an ``H x W`` grid and width ``D`` (``D % 4 == 0``),
with ``omega_k = 1 / T ** (k / (D / 4))``, ``k = 0 .. D/4 - 1`` and ``T = 10000``::

    pos[r * W + c] = cat(sin(r omega), cos(r omega), sin(c omega), cos(c omega))      # [D]

and 0 for the prefix tokens (CLS, registers) that carry a position embedding. The embedding is a
frozen parameter (``requires_grad=False``): it keeps its name in state dicts (checkpoints stay
loadable by timm) but is never trained.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn


def sincos_2d_pos_embed(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The ``[grid_h * grid_w, dim]`` fixed 2-D sin-cos embedding of the module docstring (row-major)."""
    for name, value in (("grid_h", grid_h), ("grid_w", grid_w), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)[:, None] * omega  # [HW, D/4]
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)[:, None] * omega
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1).float()


@torch.no_grad()
def set_sincos_pos_embed(model: nn.Module, temperature: float = 10000.0) -> None:
    """Replace the learned position embedding of the timm ``VisionTransformer`` ``model`` (or a
    fastkd ``Backbone`` over one) by the fixed 2-D sin-cos embedding, frozen."""
    vit = getattr(model, "model", model)
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"the sin-cos position embedding needs a timm VisionTransformer, got {type(vit).__name__}")
    if vit.pos_embed is None:
        raise ValueError("this ViT has no absolute position embedding to replace (pos_embed is None)")
    grid_h, grid_w = vit.patch_embed.grid_size
    pos = vit.pos_embed
    prefix = pos.shape[1] - grid_h * grid_w
    if prefix < 0 or pos.shape[-1] != vit.embed_dim:
        raise ValueError(f"pos_embed {tuple(pos.shape)} does not fit the {grid_h}x{grid_w} patch grid")
    table = sincos_2d_pos_embed(grid_h, grid_w, vit.embed_dim, temperature)
    pos.zero_()
    pos[0, prefix:] = table.to(pos.dtype)
    pos.requires_grad_(False)
