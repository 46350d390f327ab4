"""The momentum (EMA) teacher of MoCo v3 / DINO style methods, a model wrapper over
:func:`fastkd.ops.ema_`, and its cosine momentum schedule (kept here, beside the one model it
drives, so that methods can use it without importing the trainer)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from fastkd.checks import check_number
from fastkd.ops import EMAGap, ema_


def momentum_schedule(step: int, total: int, base: float) -> float:
    """MoCo v3 / DINO cosine schedule from ``base`` at step 0 to 1 at ``total``:
    ``m = 1 - 0.5 * (1 + cos(pi * step / total)) * (1 - base)``."""
    check_number("total", total, low=0, low_open=True, integer=True)
    check_number("step", step, low=0, high=total, integer=True)
    check_number("base", base, low=0.0, high=1.0)
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * step / total)) * (1.0 - base)


class EMATeacher(nn.Module):
    """A frozen copy of ``student_module`` (``.module``) that follows it by EMA.

    ``update(m)``: every teacher parameter ``p_t <- m * p_t + (1 - m) * p_s`` in one
    :func:`fastkd.ops.ema_` pass; buffers (e.g. BatchNorm statistics) are copied. The student is
    referenced, not registered, so it appears once in the owner's ``state_dict``.
    """

    def __init__(self, student_module: nn.Module):
        super().__init__()
        if not isinstance(student_module, nn.Module):
            raise TypeError(f"EMATeacher: student_module must be an nn.Module, got {type(student_module).__name__}")
        self.module = copy.deepcopy(student_module)
        self.module.requires_grad_(False)
        for param in self.module.parameters():  # ema_ updates contiguous teachers (e.g. channels_last)
            if not param.is_contiguous():
                param.data = param.data.contiguous()
        self._student = (student_module,)  # a tuple hides it from nn.Module registration

    @property
    def student(self) -> nn.Module:
        return self._student[0]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, momentum: float, return_gap: bool = False) -> EMAGap | None:
        """EMA step over parameters (matched by name) and copy of buffers; returns the
        parameter-space gap measured before the update when ``return_gap``."""
        teacher_params = dict(self.module.named_parameters())
        student_params = dict(self.student.named_parameters())
        if teacher_params.keys() != student_params.keys():
            missing = sorted(student_params.keys() - teacher_params.keys())
            extra = sorted(teacher_params.keys() - student_params.keys())
            raise ValueError(f"EMATeacher.update: parameters differ: only in student {missing}, only in teacher {extra}")
        names = list(teacher_params)
        gap = ema_([teacher_params[n] for n in names], [student_params[n] for n in names], momentum,
                   return_gap=return_gap)
        student_buffers = dict(self.student.named_buffers())
        for name, buffer in self.module.named_buffers():
            buffer.copy_(student_buffers[name])
        return gap
