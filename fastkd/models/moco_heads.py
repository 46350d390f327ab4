"""MoCo v3 projector and predictor MLPs, and SyncBatchNorm conversion for DDP.

Both are ``num_layers`` of ``Linear(bias=False)``, with ``BatchNorm1d + ReLU`` after every layer but
the last, and with ``last_bn`` a final ``BatchNorm1d(affine=False)``::

    projector(x) = BN_noaffine(W_L ... ReLU(BN(W_1 x)))
    predictor(x) = BN_noaffine(W_2 ReLU(BN(W_1 x)))     # last_bn=True: MoCo v3's ViT predictor (default)
    predictor(x) = W_2 ReLU(BN(W_1 x))                  # last_bn=False: MoCo v3's ResNet predictor

Module indices inside ``.mlp`` match MoCo v3's ``_build_mlp`` (``moco/builder.py``), so official
projector weights load by renaming ``head.`` -> ``mlp.``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastkd.checks import check_bool, check_positive_ints, check_shape


class _MoCoMLP(nn.Module):
    """MoCo v3's ``_build_mlp`` as ``self.mlp``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, last_bn: bool):
        super().__init__()
        check_positive_ints(in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim, num_layers=num_layers)
        check_bool("last_bn", last_bn)
        self.in_dim, self.out_dim = in_dim, out_dim
        layers: list[nn.Module] = []
        for index in range(num_layers):
            dim_out = out_dim if index == num_layers - 1 else hidden_dim
            layers.append(nn.Linear(in_dim if index == 0 else hidden_dim, dim_out, bias=False))
            if index < num_layers - 1:
                layers += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
            elif last_bn:
                layers.append(nn.BatchNorm1d(dim_out, affine=False))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_shape(f"{type(self).__name__} input", x, ("B", self.in_dim))
        return self.mlp(x)


class MoCoProjector(_MoCoMLP):
    """MoCo v3 projector (3 layers for ViTs, 2 for ResNets), last BatchNorm without affine."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, num_layers: int = 3):
        super().__init__(in_dim, hidden_dim, out_dim, num_layers, last_bn=True)


class MoCoPredictor(_MoCoMLP):
    """MoCo v3 predictor (online branch only); ``last_bn``: module docstring."""

    def __init__(self, in_dim: int = 256, hidden_dim: int = 4096, out_dim: int = 256, num_layers: int = 2,
                 last_bn: bool = True):
        super().__init__(in_dim, hidden_dim, out_dim, num_layers, last_bn=last_bn)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm as ``SyncBatchNorm`` (before DDP wrapping): global-batch statistics."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
