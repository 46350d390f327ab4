"""DINO projection head (used by MOKD on the pooled feature / CLS token) and its last layer::

    z = W_3 GELU(W_2 GELU(W_1 x))                 # MLP in_dim -> hidden -> hidden -> bottleneck
    logits = WeightNormLinear(z / ||z||_2)        # bottleneck -> out_dim, weight-normalised

``WeightNormLinear``: ``y = x @ (g * v / ||v||_row).T``, ``v [out, in]``, ``g [out, 1]`` (DINO's ``weight_v`` /
``weight_g``); ``fix_gain=True`` (``norm_last_layer``) freezes ``g = 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.checks import check_positive_ints, check_shape


def init_linear(module: nn.Module) -> None:
    """DINO's init of a linear layer: weight ~ trunc-normal(std 0.02), bias 0 (for ``module.apply``)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class WeightNormLinear(nn.Module):
    """``F.linear(x, weight_g * weight_v / weight_v.norm(dim=1, keepdim=True))``, no bias."""

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


class DINOHead(nn.Module):
    """DINO head: 3-layer GELU MLP, l2 normalisation, weight-normalised ``out_dim``-way last layer."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True):
        super().__init__()
        check_positive_ints(in_dim=in_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim)
        self.in_dim = in_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.mlp.apply(init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_gain=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_shape("DINOHead input", x, ("B", self.in_dim))
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))

    def cancel_last_layer_grad(self) -> None:
        """Drop the last layer's gradients (between backward and optimiser step)."""
        self.last_layer.cancel_grad()
