"""The residual-momentum term (Pham et al., 2023): pull the online encoder's embedding of a view
towards the momentum encoder's embedding of the same view."""

from __future__ import annotations

import torch
from torch import nn

from fastkd.checks import check_embedding_pair, check_number
from fastkd.losses.feature_align import FeatureAlignLoss


class ResidualMomentumLoss(nn.Module):
    """``loss_fn(online, momentum)`` for one view, both ``[B, C]``::

        loss = (2 - 2 * F.cosine_similarity(online, momentum.detach(), dim=-1)).mean()

    the squared distance of the l2-normalised embeddings, through the fused ``feature_align`` op (``1 - cos``)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        check_number("eps", eps, low=0, low_open=True)
        self.eps = float(eps)
        self.one_minus_cos = FeatureAlignLoss(target_norm="none", loss="cosine", reduction="mean", eps=self.eps)

    def forward(self, online: torch.Tensor, momentum: torch.Tensor) -> torch.Tensor:
        check_embedding_pair("online", online, "momentum", momentum)
        return 2.0 * self.one_minus_cos(online, momentum.detach())
