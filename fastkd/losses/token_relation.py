"""``TokenRelationLoss``: attention-map (token relation) distillation, Hybrid Distill's MIM term.

Math (see :mod:`fastkd.ops.token_relation` for the per-row KL and the head mapping)::

    kl = token_relation(q_s, k_s, q_t, k_t, temperature=T, direction=..., head_map=...)   # [B, H_s, N]
    reduction="mean": kl.mean()   (over batch, student heads and query rows)
    reduction="sum":  kl.sum()
    reduction="none": kl

Teacher inputs never receive gradients; gradients flow to ``q_s`` and ``k_s``. The scales default to
``d ** -0.5`` of each model's head dim (the attention scale of a ViT).
"""

from __future__ import annotations

from torch import Tensor, nn

from fastkd.ops.token_relation import DIRECTIONS, HEAD_MAPS, token_relation

REDUCTIONS = ("mean", "sum", "none")


class TokenRelationLoss(nn.Module):
    """KL between teacher and student token relations, called as ``loss_fn(q_s, k_s, q_t, k_t)``
    with ``q, k [B, H, N, d]``; returns a scalar (fp32) unless ``reduction="none"``."""

    def __init__(
        self,
        temperature: float = 1.0,
        direction: str = "teacher_to_student",
        head_map: str | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if head_map not in HEAD_MAPS:
            raise ValueError(f"head_map must be None or 'mean', got {head_map!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.temperature = float(temperature)
        self.direction = direction
        self.head_map = head_map
        self.reduction = reduction

    def forward(self, q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor) -> Tensor:
        kl = token_relation(
            q_s, k_s, q_t, k_t, temperature=self.temperature, direction=self.direction, head_map=self.head_map
        )
        if self.reduction == "mean":
            return kl.mean()
        if self.reduction == "sum":
            return kl.sum()
        return kl

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, direction={self.direction!r}, head_map={self.head_map!r}, "
            f"reduction={self.reduction!r}"
        )
