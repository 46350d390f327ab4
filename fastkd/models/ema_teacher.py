"""The momentum (EMA) teacher of MoCo v3 / DINO style methods over :func:`fastkd.ops.ema_`, and its cosine
momentum schedule."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastkd.checks import check_choice, check_number
from fastkd.ops import EMAGap, ema_, ema_unless_

BN_STATS = ("batch", "ema")  # EMATeacher's BatchNorm statistics: its own batch statistics, or an EMA of the student's


def momentum_schedule(step: int, total: int, base: float) -> float:
    """MoCo v3 / DINO cosine schedule from ``base`` at step 0 to 1 at ``total``:
    ``m = 1 - 0.5 * (1 + cos(pi * step / total)) * (1 - base)``."""
    check_number("total", total, low=0, low_open=True, integer=True)
    check_number("step", step, low=0, high=total, integer=True)
    check_number("base", base, low=0.0, high=1.0)
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * step / total)) * (1.0 - base)


class EMATeacher(nn.Module):
    """A frozen copy of ``student_module`` (``.module``; the student is referenced, not registered) that
    ``update(m)`` moves by ``p_t <- m * p_t + (1 - m) * p_s`` in one :func:`fastkd.ops.ema_` pass.

    The teacher runs in eval mode; only its BatchNorm layers follow the owner's mode, by ``bn_stats``:

    - ``"batch"`` (default, the official code: MoCo v3 moves ``parameters()`` only, DINO's teacher is never in eval
      mode): in training its BatchNorm uses its own batch statistics and keeps its own running statistics;
    - ``"ema"``: BatchNorm in eval mode too, running statistics moved by the same EMA (``num_batches_tracked``
      copied).

    Other buffers are copied from the student at each update.
    """

    def __init__(self, student_module: nn.Module, bn_stats: str = "batch"):
        super().__init__()
        if not isinstance(student_module, nn.Module):
            raise TypeError(f"EMATeacher: student_module must be an nn.Module, got {type(student_module).__name__}")
        check_choice("bn_stats", bn_stats, BN_STATS)
        self.bn_stats = bn_stats
        self.module = copy.deepcopy(student_module)
        self.module.requires_grad_(False)
        for param in self.module.parameters():  # ema_ updates contiguous teachers (e.g. channels_last)
            if not param.is_contiguous():
                param.data = param.data.contiguous()
        self._student = (student_module,)  # a tuple hides it from nn.Module registration
        self.train(student_module.training)

    @property
    def student(self) -> nn.Module:
        return self._student[0]

    def train(self, mode: bool = True):
        """``self.training = mode``; the teacher stays in eval mode but for BatchNorm with ``bn_stats == "batch"``."""
        super().train(mode)
        self.module.eval()
        if mode and self.bn_stats == "batch":
            for module in self.module.modules():
                if isinstance(module, _BatchNorm):
                    module.train()
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _batchnorm_buffers(self) -> set[str]:
        names = set()
        for prefix, module in self.module.named_modules():
            if isinstance(module, _BatchNorm):
                names.update(f"{prefix}.{name}" if prefix else name for name, _ in module.named_buffers(recurse=False))
        return names

    def _matched_parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher and student parameters, matched by name."""
        teacher_params = dict(self.module.named_parameters())
        student_params = dict(self.student.named_parameters())
        if teacher_params.keys() != student_params.keys():
            missing = sorted(student_params.keys() - teacher_params.keys())
            extra = sorted(teacher_params.keys() - student_params.keys())
            raise ValueError(f"EMATeacher.update: parameters differ: only in student {missing}, "
                             f"only in teacher {extra}")
        return list(teacher_params.values()), [student_params[n] for n in teacher_params]

    @torch.no_grad()
    def update(self, momentum: float, return_gap: bool = False,
               skip: torch.Tensor | None = None) -> EMAGap | torch.Tensor | None:
        """EMA step of parameters and buffers (``bn_stats``); the gap before it when ``return_gap``. ``skip``: a 0/1
        device tensor (``found_inf``) for :func:`fastkd.ops.ema_unless_`, the gap then a ``[4]`` device tensor."""
        def average(teacher: list, student: list, gap: bool = False):
            if skip is None:
                return ema_(teacher, student, momentum, return_gap=gap)
            return ema_unless_(teacher, student, momentum, skip, return_gap=gap)

        def copy(buffer: torch.Tensor, source: torch.Tensor) -> None:
            buffer.copy_(source if skip is None else torch.where(skip.to(buffer.device).reshape(()) > 0,
                                                                 buffer, source))

        gap = average(*self._matched_parameters(), gap=return_gap)
        student_buffers = dict(self.student.named_buffers())
        batchnorm = self._batchnorm_buffers()
        averaged = []
        for name, buffer in self.module.named_buffers():
            if name not in batchnorm:
                copy(buffer, student_buffers[name])
            elif self.bn_stats == "ema":
                if buffer.is_floating_point():
                    averaged.append((buffer, student_buffers[name]))
                else:
                    copy(buffer, student_buffers[name])  # num_batches_tracked
        if averaged:
            average([t for t, _ in averaged], [s for _, s in averaged])
        return gap
