"""``TokenRelationLoss``: attention-map distillation (Hybrid Distill's MIM term), the per-row KL of
:func:`fastkd.ops.token_relation` (scales ``d ** -0.5`` of each head dim) reduced by ``reduction``."""

from __future__ import annotations

from torch import Tensor, nn

from fastkd.checks import check_choice
from fastkd.ops.reduction import REDUCTIONS, reduce_rows
from fastkd.ops.token_relation import check_options, token_relation


class TokenRelationLoss(nn.Module):
    """``loss_fn(q_s, k_s, q_t, k_t)``, ``q, k [B, H, N, d]``: a scalar (fp32) unless ``reduction="none"``."""

    def __init__(self, temperature: float = 1.0, direction: str = "teacher_to_student", head_map: str | None = None,
                 reduction: str = "mean") -> None:
        super().__init__()
        check_options(temperature, direction, head_map)
        check_choice("reduction", reduction, REDUCTIONS)
        self.temperature = float(temperature)
        self.direction, self.head_map, self.reduction = direction, head_map, reduction

    def forward(self, q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor) -> Tensor:
        kl = token_relation(q_s, k_s, q_t, k_t, temperature=self.temperature, direction=self.direction,
                            head_map=self.head_map)
        return reduce_rows(kl, self.reduction)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, direction={self.direction!r}, head_map={self.head_map!r}, "
                f"reduction={self.reduction!r}")
