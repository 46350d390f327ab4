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

from fastkd.checks import check_number, check_positive_ints


def scaled_lr(base_lr: float, global_batch_size: int, reference_batch_size: int = 256) -> float:
    """Linear scaling rule (Goyal et al.): ``base_lr * global_batch_size / reference_batch_size``."""
    check_number("base_lr", base_lr, low=0)
    check_positive_ints(global_batch_size=global_batch_size, reference_batch_size=reference_batch_size)
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
        check_positive_ints(total_steps=self.total_steps)
        check_number(f"warmup_steps (total_steps={self.total_steps})", self.warmup_steps, low=0,
                     high=self.total_steps, integer=True)
        for name in ("peak", "start", "end"):
            check_number(name, getattr(self, name), finite=True)

    def __call__(self, step: int) -> float:
        check_number("step", step, low=0, integer=True)
        if step < self.warmup_steps:
            return self.start + (self.peak - self.start) * step / self.warmup_steps
        if step >= self.total_steps:
            return float(self.end)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.end + 0.5 * (self.peak - self.end) * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        return asdict(self)
