"""``FeatureAlignLoss``: regress student features onto normalised teacher features (MOMA, Hybrid
Distill, Residual Momentum), on the fused ``fastkd.ops.feature_align`` op."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastkd.checks import check_choice
from fastkd.ops._dispatch import check_float_tensors
from fastkd.ops.feature_align import check_options, feature_align
from fastkd.ops.reduction import REDUCTIONS


def _nonnegative(mask):
    """``mask``, float weights checked >= 0: a ValueError on CPU, a NaN mask elsewhere (no host sync)."""
    if not isinstance(mask, Tensor) or not mask.dtype.is_floating_point:
        return mask
    negative = (mask.detach() < 0).any()
    if mask.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(negative):
            raise ValueError(f"mask must hold weights >= 0, got a minimum of {float(mask.min()):.6g}")
        return mask
    return torch.where(negative, torch.full_like(mask, float("nan")), mask)


class FeatureAlignLoss(nn.Module):
    """``loss_fn(student, teacher, mask=None)`` for ``student``, ``teacher`` ``[..., D]`` and an
    optional bool or float row weight ``mask [...]`` (no gradient). With ``l`` the per-row loss of
    :func:`fastkd.ops.feature_align` and ``w = mask`` (1 where None)::

        "mean": (w * l).sum() / w.sum()  (0 when w.sum() == 0),  "sum": (w * l).sum(),  "none": w * l

    so without a mask ``"mean"`` equals ``nn.SmoothL1Loss(beta=beta)`` / ``nn.MSELoss()`` on ``x`` and ``y``. A
    negative mask weight raises ValueError on CPU and makes the loss NaN elsewhere (the trainer reports it)."""

    def __init__(self, target_norm: str = "layernorm", student_norm: bool = False, loss: str = "smooth_l1",
                 beta: float = 2.0, reduction: str = "mean", eps: float = 1e-6):
        super().__init__()
        check_options(target_norm, student_norm, loss, beta, eps)
        check_choice("reduction", reduction, REDUCTIONS)
        self.target_norm, self.student_norm, self.loss = target_norm, student_norm, loss
        self.beta, self.reduction, self.eps = float(beta), reduction, float(eps)

    def extra_repr(self) -> str:
        return (f"target_norm={self.target_norm!r}, student_norm={self.student_norm}, loss={self.loss!r}, "
                f"beta={self.beta}, reduction={self.reduction!r}, eps={self.eps}")

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = _nonnegative(mask)
        if self.reduction == "mean":
            # 1 / sum(w) folded into the row weights: a plain backward then skips the op's scaling
            check_float_tensors(student=student)
            if mask is None:
                rows = student.shape[:-1]
                mask = torch.full(rows, 1.0 / max(1, rows.numel()), dtype=torch.float32, device=student.device)
            elif isinstance(mask, Tensor):
                weight = mask.detach().to(torch.float32)
                mask = weight / weight.sum().clamp_min(torch.finfo(torch.float32).tiny)
        rows = feature_align(student, teacher, mask, target_norm=self.target_norm, student_norm=self.student_norm,
                             loss=self.loss, beta=self.beta, eps=self.eps)
        return rows if self.reduction == "none" else rows.sum()
