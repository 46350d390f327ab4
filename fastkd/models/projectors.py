"""Student-to-teacher feature projectors on the last dimension of ``x [..., in_dim]`` (MOMA, Hybrid Distill)."""

from __future__ import annotations

import torch
from torch import nn

from fastkd.checks import check_positive_ints, check_shape


class LinearProjector(nn.Module):
    """``x W^T + b``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        check_positive_ints(in_dim=in_dim, out_dim=out_dim)
        self.in_dim = in_dim
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_shape("LinearProjector input", x, (..., self.in_dim))
        return self.proj(x)


class MLPProjector(nn.Module):
    """``W_2 GELU(W_1 x + b_1) + b_2``, ``in_dim -> hidden_dim -> out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int):
        super().__init__()
        check_positive_ints(in_dim=in_dim, out_dim=out_dim, hidden_dim=hidden_dim)
        self.in_dim = in_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_shape("MLPProjector input", x, (..., self.in_dim))
        return self.mlp(x)
