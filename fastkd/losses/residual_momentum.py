"""The residual-momentum term (Pham et al., 2023): pull the online encoder's embedding of a view
towards the momentum encoder's embedding of the same view."""

from __future__ import annotations

import torch
from torch import nn

from fastkd.losses.feature_align import FeatureAlignLoss


class ResidualMomentumLoss(nn.Module):
    """``loss_fn(online, momentum)`` for one view, both ``[B, C]``::

        loss = (2 - 2 * F.cosine_similarity(online, momentum.detach(), dim=-1)).mean()

    i.e. the squared distance of the l2-normalised embeddings. The momentum side receives no
    gradient. Computed with the fused ``feature_align`` op (``loss="cosine"``, no target
    normalisation), which yields ``1 - cos`` per row and its gradient in one pass."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        self.eps = float(eps)
        self.one_minus_cos = FeatureAlignLoss(target_norm="none", loss="cosine", reduction="mean", eps=self.eps)

    def forward(self, online: torch.Tensor, momentum: torch.Tensor) -> torch.Tensor:
        for name, t in (("online", online), ("momentum", momentum)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
            if t.dim() != 2 or t.shape[0] == 0:
                raise ValueError(f"{name} must be a non-empty [B, C] tensor, got shape {tuple(t.shape)}")
        if online.shape != momentum.shape:
            raise ValueError(
                f"online and momentum must have the same shape, got {tuple(online.shape)} and {tuple(momentum.shape)}"
            )
        return 2.0 * self.one_minus_cos(online, momentum.detach())
