"""How a per-row op output becomes a loss: the ``reduction`` option shared by the losses."""

from __future__ import annotations

from torch import Tensor

__all__ = ["REDUCTIONS", "check_reduction", "reduce_rows"]

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: object) -> None:
    """Raise ValueError unless ``reduction`` is one of :data:`REDUCTIONS`."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce_rows(rows: Tensor, reduction: str) -> Tensor:
    """``rows.mean()``, ``rows.sum()`` or ``rows`` itself for ``reduction`` "mean", "sum", "none"."""
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows
