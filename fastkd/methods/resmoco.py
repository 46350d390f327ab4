"""Residual Momentum (Pham et al., 2023): MoCo v3 plus a term shrinking the gap between the online
and momentum encoders on the *same* view::

    loss = InfoNCE(q_1, k_2) + InfoNCE(q_2, k_1) + lambda * sum_v (2 - 2 cos(z_v, sg[z_m,v]))

with ``lambda = residual_weight`` and ``z`` taken at ``residual_tap``: the projector outputs
(``"projector"``, default: the space MoCo v3's own loss compares) or the backbone features
(``"backbone"``). The form 2 - 2 cos (BYOL's normalised MSE), lambda = 1 and the default tap are
chosen here: the paper does not pin them down.

``after_step`` moves the momentum encoder with ``ema_(..., return_gap=True)``; the parameter-space
gap of that update is reported in the next forward's dict as ``param_gap_sq = ||s - t||^2`` and
``param_cos = <s, t> / (|s| |t|)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastkd.checks import check_choice, check_number
from fastkd.data.batch import Batch
from fastkd.losses.residual_momentum import ResidualMomentumLoss
from fastkd.methods.base import check_batch, loss_dict
from fastkd.methods.mocov3 import MoCoV3, MoCoV3Config

TAPS = ("projector", "backbone")


@dataclass
class ResMoCoConfig(MoCoV3Config):
    residual_weight: float = 1.0
    residual_tap: str = "projector"

    def __post_init__(self):
        super().__post_init__()
        check_number("residual_weight", self.residual_weight, low=0.0)
        check_choice("residual_tap", self.residual_tap, TAPS)


class ResMoCo(MoCoV3, name="resmoco", config=ResMoCoConfig):
    """Residual-momentum MoCo v3 (recipe ``mocov3``). Parts: ``contrastive``, ``residual``;
    metrics: ``param_gap_sq``, ``param_cos`` (of the last ``after_step``; NaN before the first)."""

    def __init__(self, config: ResMoCoConfig):
        super().__init__(config)
        self.residual = ResidualMomentumLoss()
        self.register_buffer("param_gap", torch.full((2,), math.nan, dtype=torch.float64))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        views = check_batch(batch, 2, type(self).__name__)[:2]
        enc = self.encode(views)
        contrastive = self.contrastive(enc["q"][0], enc["q"][1], enc["k"][0], enc["k"][1])
        online, momentum = ("z", "k") if self.config.residual_tap == "projector" else ("h", "h_m")
        residual = sum(self.residual(o, m) for o, m in zip(enc[online], enc[momentum]))
        return loss_dict(
            {"contrastive": contrastive, "residual": residual},
            {"contrastive": 1.0, "residual": self.config.residual_weight},
            {"param_gap_sq": self.param_gap[0], "param_cos": self.param_gap[1]},
        )

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int, found_inf: torch.Tensor | None = None) -> None:
        """EMA update of the momentum encoder; records the gap measured before the update. With
        ``found_inf`` (the trainer's device-side skip flag) both are decided on the device: when it is
        1 the encoder and the recorded gap stay as they were, and nothing is read by the host."""
        momentum = self.momentum_at(step, total_steps)
        if found_inf is None:
            gap = self.momentum_encoder.update(momentum, return_gap=True)
            norms = gap.teacher_sq * gap.student_sq
            cos = gap.dot / math.sqrt(norms) if norms > 0 else math.nan
            self.param_gap.copy_(torch.tensor([gap.diff_sq, cos], dtype=torch.float64))
            return
        diff_sq, dot, teacher_sq, student_sq = self.momentum_encoder.update(momentum, return_gap=True,
                                                                            skip=found_inf).unbind()
        norms = teacher_sq * student_sq
        cos = torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(torch.float64).tiny).sqrt(), math.nan)
        gap = torch.stack([diff_sq, cos]).to(self.param_gap.device)
        self.param_gap.copy_(torch.where(found_inf.to(gap.device).reshape(()) > 0, self.param_gap, gap))
