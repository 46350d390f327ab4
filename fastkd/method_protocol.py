"""What the trainer and the runner use of a method: one base class, with the defaults.

Per optimiser step the trainer calls ``forward(batch)`` (a dict with ``loss``, the scalar to
backprop, and detached named parts), ``before_optimizer_step(epoch)`` after backward and clipping,
and ``after_step(step, total_steps, found_inf)`` after the optimiser step (teacher EMA, schedules);
``found_inf`` is None (the host found the step good; a skipped step gets no call) or a 0-dim device
tensor (1: skipped) that every state update must honour without reading it on the host. It builds
the optimisers from ``param_groups(weight_decay)`` and sets ``frozen_teacher_dtype``; the runner
saves ``student`` and ``ema_teacher_backbone``. This module imports nothing from fastkd.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def grouped_parameters(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                       prefix: str = "", *, decay_all: bool = False) -> list[dict]:
    """``[{"params": weights, "weight_decay": weight_decay, "name": prefix + "decay"},
    {"params": biases and norm weights (< 2 dims), "weight_decay": 0.0, "name": prefix + "no_decay"}]``
    over the parameters that require grad (empty groups dropped); ``decay_all``: every parameter
    in the decayed group (as MoCo v3's ``model.parameters()``)."""
    decay, no_decay = [], []
    for _, param in named_parameters:
        if param.requires_grad:
            (no_decay if param.dim() < 2 and not decay_all else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay), "name": f"{prefix}decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": f"{prefix}no_decay"},
    ]
    return [g for g in groups if g["params"]]


class TrainingMethod(nn.Module):
    """The method protocol of the trainer and the runner (see the module docstring). Subclasses
    implement ``forward`` and ``student``; everything else has a default here."""

    # dtype the frozen teachers compute in (set by the trainer); None: the caller's autocast state
    frozen_teacher_dtype: torch.dtype | None = None

    def forward(self, batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch)")

    @property
    def student(self) -> nn.Module:
        """The model that is evaluated and saved as ``student.pt``."""
        raise NotImplementedError(f"{type(self).__name__} must define the student property")

    @property
    def ema_teacher_backbone(self) -> nn.Module | None:
        """The EMA teacher's copy of :attr:`student`, saved as ``teacher.pt``; None: no EMA teacher."""
        return None

    def before_optimizer_step(self, epoch: float) -> None:
        """After backward and clipping, before the optimiser step(s), with the fractional epoch;
        may edit gradients (e.g. MOKD's last-layer freeze). Default: nothing."""

    def after_step(self, step: int, total_steps: int, found_inf: torch.Tensor | None = None) -> None:
        """After the optimiser step ``step`` (0-based) of ``total_steps``. Default: nothing."""

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimiser groups: weights with ``weight_decay``, biases and norm weights (< 2 dims) without."""
        return grouped_parameters(self.named_parameters(), weight_decay)
