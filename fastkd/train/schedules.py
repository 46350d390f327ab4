"""Step-indexed schedules (learning rate, weight decay, anything scheduled) and linear lr scaling.

A :class:`WarmupCosine` is a pure function of the step, so a resumed run recomputes exactly the
value an uninterrupted run had; its parameters are recorded in the checkpoint (``state_dict``)::

    value(step) = start + (peak - start) * step / warmup                      if step < warmup
    value(step) = end + 0.5 * (peak - end) * (1 + cos(pi * (step - warmup) / (total - warmup)))
                                                                              otherwise
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def scaled_lr(base_lr: float, global_batch_size: int, reference_batch_size: int = 256) -> float:
    """Linear scaling rule (Goyal et al.): ``base_lr * global_batch_size / reference_batch_size``."""
    if not isinstance(base_lr, (int, float)) or base_lr < 0:
        raise ValueError(f"base_lr must be a non-negative number, got {base_lr!r}")
    for name, value in (("global_batch_size", global_batch_size), ("reference_batch_size", reference_batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return float(base_lr) * global_batch_size / reference_batch_size


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup_steps``, then half-cosine from
    ``peak`` to ``end`` at ``total_steps`` (constant ``end`` after it)."""

    peak: float
    total_steps: int
    warmup_steps: int = 0
    start: float = 0.0
    end: float = 0.0

    def __post_init__(self):
        if not isinstance(self.total_steps, int) or self.total_steps <= 0:
            raise ValueError(f"total_steps must be a positive int, got {self.total_steps!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps must be an int in [0, total_steps={self.total_steps}], got {self.warmup_steps!r}"
            )
        for name in ("peak", "start", "end"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

    def __call__(self, step: int) -> float:
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if step < self.warmup_steps:
            return self.start + (self.peak - self.start) * step / self.warmup_steps
        if step >= self.total_steps:
            return float(self.end)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.end + 0.5 * (self.peak - self.end) * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        return asdict(self)
