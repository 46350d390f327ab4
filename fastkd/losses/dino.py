"""DINO's self-distillation loss: cross-entropy between a centred, sharpened teacher distribution
and the student distribution over crops, with the teacher-temperature warm-up."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastkd.checks import check_number, check_positive_ints


def _check_outputs(name: str, outputs, out_dim: int, batch: int | None = None) -> list[torch.Tensor]:
    """``outputs`` as a list of ``[B, out_dim]`` tensors of one batch size ``B > 0`` (``batch`` when given)."""
    if isinstance(outputs, torch.Tensor) or not isinstance(outputs, Sequence) or len(outputs) == 0:
        raise TypeError(f"{name} must be a non-empty list of [B, {out_dim}] tensors, got {type(outputs).__name__}")
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in outputs]
    B = batch or (shapes[0][0] if isinstance(shapes[0], tuple) and shapes[0] else 0)
    if B < 1 or any(shape != (B, out_dim) for shape in shapes):
        raise ValueError(f"{name} must be [B, {out_dim}] tensors of one batch size B > 0"
                         f"{'' if batch is None else f' (the student batch, {batch})'}, got {shapes}")
    return list(outputs)


class DINOLoss(nn.Module):
    """``loss_fn(student_outputs, teacher_outputs)``: lists of per-crop logits ``[B, out_dim]``
    (the teacher's crops are the first ``len(teacher_outputs)`` of the student's, i.e. the global
    crops). With ``c`` the centre and ``tau_t`` the current teacher temperature::

        p_i = softmax((teacher_outputs[i] - c) / tau_t, dim=-1).detach()
        l_iv = (-p_i * log_softmax(student_outputs[v] / student_temp, dim=-1)).sum(-1).mean()
        loss = mean over pairs (i, v), skipping v == i when skip_same_view

    In training mode (with ``centering``) each call then sets ``c <- m * c + (1 - m) * mean_rows(cat(teacher_outputs))``
    over all ranks. ``set_progress`` moves ``tau_t`` linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over
    the first ``warmup_fraction`` of training (DINO: 0.04 -> 0.07 over 30 of 100 epochs). ``centering=False``: a
    plain sharpened-target cross-entropy (MOKD's cross-attention feature search)."""

    def __init__(self, out_dim: int, *, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, warmup_fraction: float = 0.3, center_momentum: float = 0.9,
                 centering: bool = True, skip_same_view: bool = True, group: dist.ProcessGroup | None = None):
        super().__init__()
        check_positive_ints(out_dim=out_dim)
        check_number("warmup_fraction", warmup_fraction, low=0, high=1)
        check_number("center_momentum", center_momentum, low=0, high=1)
        for name, value in (("student_temp", student_temp), ("teacher_temp", teacher_temp),
                            ("warmup_teacher_temp", warmup_teacher_temp)):
            check_number(name, value, low=0, low_open=True)
        self.out_dim = out_dim
        self.student_temp, self.teacher_temp = float(student_temp), float(teacher_temp)
        self.warmup_teacher_temp = float(warmup_teacher_temp)
        self.warmup_fraction = float(warmup_fraction)
        self.center_momentum = float(center_momentum)
        self.centering = bool(centering)
        self.skip_same_view = bool(skip_same_view)
        self.group = group
        self.register_buffer("center", torch.zeros(1, out_dim))
        initial = self.warmup_teacher_temp if self.warmup_fraction > 0 else self.teacher_temp
        self.register_buffer("current_teacher_temp", torch.tensor(initial))

    def teacher_temp_at(self, step: int, total_steps: int) -> float:
        """The teacher temperature at ``step`` of ``total_steps``."""
        check_positive_ints(total_steps=total_steps)
        check_number("step", step, low=0, integer=True)
        warmup = self.warmup_fraction * total_steps
        if step >= warmup:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * step / warmup

    def set_progress(self, step: int, total_steps: int) -> None:
        """Set the teacher temperature for ``step`` of ``total_steps``."""
        self.current_teacher_temp.fill_(self.teacher_temp_at(step, total_steps))

    def forward(self, student_outputs: Sequence[torch.Tensor], teacher_outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        student_outputs = _check_outputs("student_outputs", student_outputs, self.out_dim)
        teacher_outputs = _check_outputs("teacher_outputs", teacher_outputs, self.out_dim,
                                         batch=student_outputs[0].shape[0])
        teacher = torch.cat(teacher_outputs).detach().float()
        centre = self.center if self.centering else torch.zeros_like(self.center)
        targets = F.softmax((teacher - centre) / self.current_teacher_temp, dim=-1).chunk(len(teacher_outputs))
        pairs = [(i, v) for i in range(len(teacher_outputs)) for v in range(len(student_outputs))
                 if not (self.skip_same_view and v == i)]
        if not pairs:
            raise ValueError("skip_same_view leaves no (teacher, student) crop pair: give the student more crops")
        log_probs = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_outputs]
        total = sum((-targets[i] * log_probs[v]).sum(-1).mean() for i, v in pairs)
        if self.training and self.centering:
            self._update_center(teacher)
        return total / len(pairs)

    @torch.no_grad()
    def _update_center(self, teacher: torch.Tensor) -> None:
        row_sum = teacher.sum(0, keepdim=True)
        rows = torch.tensor(float(teacher.shape[0]), device=teacher.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(row_sum, group=self.group)
            dist.all_reduce(rows, group=self.group)
        self.center.mul_(self.center_momentum).add_(row_sum / rows, alpha=1.0 - self.center_momentum)

    def extra_repr(self) -> str:
        return (f"out_dim={self.out_dim}, student_temp={self.student_temp}, teacher_temp="
                f"{self.warmup_teacher_temp}->{self.teacher_temp}, center_momentum={self.center_momentum}, "
                f"centering={self.centering}, skip_same_view={self.skip_same_view}")
