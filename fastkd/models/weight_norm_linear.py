"""Weight-normalised linear layer without bias (the last layer of DINO-style heads).

``y = x @ (g * v / ||v||_row).T`` with direction ``v [out, in]`` and per-row gain ``g [out, 1]``
(parameter names ``weight_v`` / ``weight_g`` as in DINO's checkpoints). ``fix_gain=True`` keeps
``g = 1`` frozen (DINO's ``norm_last_layer``), so each output is ``<x, v_i> / ||v_i||``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.checks import check_positive_ints


class WeightNormLinear(nn.Module):
    """``F.linear(x, weight_g * weight_v / weight_v.norm(dim=1, keepdim=True))``."""

    def __init__(self, in_dim: int, out_dim: int, *, fix_gain: bool = True):
        super().__init__()
        check_positive_ints(in_dim=in_dim, out_dim=out_dim)
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_gain)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def cancel_grad(self) -> None:
        """Drop this layer's gradients (DINO freezes the last layer for the first epoch(s))."""
        self.weight_v.grad = None
        self.weight_g.grad = None
