"""The batch every data pipeline yields and every method consumes."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """``views``: each ``[B, 3, H, W]``, in the recipe's order; ``labels``: ``[B]`` int64 (-1: unknown);
    ``indices``: ``[B]`` int64 dataset indices."""

    views: list[torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        """The batch on ``device`` (copies issued ``non_blocking``)."""
        return Batch([view.to(device, non_blocking=True) for view in self.views],
                     self.labels.to(device, non_blocking=True), self.indices.to(device, non_blocking=True))
