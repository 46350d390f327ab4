"""How a per-row op output becomes a loss: the ``reduction`` option shared by the losses."""

from __future__ import annotations

from torch import Tensor

__all__ = ["REDUCTIONS", "reduce_rows"]

REDUCTIONS = ("mean", "sum", "none")


def reduce_rows(rows: Tensor, reduction: str) -> Tensor:
    """``rows.mean()``, ``rows.sum()`` or ``rows`` itself for ``reduction`` "mean", "sum", "none"."""
    return rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows
