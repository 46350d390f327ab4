"""The momentum (EMA) teacher of MoCo v3 / DINO style methods, a model wrapper over
:func:`fastkd.ops.ema_`, and its cosine momentum schedule (kept here, beside the one model it
drives, so that methods can use it without importing the trainer)."""

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
    """A frozen copy of ``student_module`` (``.module``) that follows it by EMA: ``update(m)`` moves every
    teacher parameter ``p_t <- m * p_t + (1 - m) * p_s`` in one :func:`fastkd.ops.ema_` pass. The student
    is referenced, not registered (it appears once in the owner's ``state_dict``).

    The teacher runs in eval mode whatever its owner's ``train()`` asks (no dropout, drop-path or
    other train-only randomness); only its BatchNorm layers follow the owner's mode, by ``bn_stats``:

    - ``"batch"`` (default, the official code): in training the teacher's BatchNorm uses the batch
      statistics of its own activations and keeps its own running statistics, never copied from the
      student (MoCo v3's ``_update_momentum_encoder`` moves ``parameters()`` only and the momentum
      encoder trains in train mode; DINO's teacher is never put in eval mode);
    - ``"ema"``: BatchNorm in eval mode too, and ``update(m)`` moves ``running_mean`` / ``running_var``
      by the same EMA towards the student's (``num_batches_tracked`` is copied).

    Other buffers (none in fastkd's models) are copied from the student at each update.
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
        """``self.training = mode``; the teacher module stays in eval mode but for its BatchNorm
        layers, which take ``mode`` when ``bn_stats == "batch"``."""
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
        """EMA step over parameters (matched by name) and the buffers by ``bn_stats``; returns the
        parameter gap measured before the update when ``return_gap``. ``skip`` (a 0-dim 0/1 device
        tensor, the trainer's ``found_inf``) decides on the device (:func:`fastkd.ops.ema_unless_`):
        with ``skip = 1`` nothing changes; the gap is then a ``[4]`` float64 device tensor."""
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
