"""MoCo v3's symmetrised contrastive (InfoNCE) loss with keys gathered from every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastkd.checks import check_embedding_pair, check_number


def gather_keys(k: torch.Tensor, group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, int]:
    """All ranks' ``k`` in rank order (no gradient) and this rank's index; ``(k.detach(), 0)`` on one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return k.detach(), 0
    world = dist.get_world_size(group)
    if world == 1:
        return k.detach(), 0
    parts = [torch.empty_like(k) for _ in range(world)]
    dist.all_gather(parts, k.detach().contiguous(), group=group)
    return torch.cat(parts, dim=0), dist.get_rank(group)


def infonce(q: torch.Tensor, k: torch.Tensor, temperature: float,
            group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """One direction of MoCo v3's loss for queries ``q`` and keys ``k`` (both ``[B, C]``)::

        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        k_all = cat(all_gather(k))                  # [world * B, C], no gradient
        logits = q @ k_all.T / temperature
        loss = F.cross_entropy(logits, arange(B) + rank * B) * 2 * temperature

    The keys receive no gradient (they come from the momentum encoder)."""
    check_embedding_pair("q", q, "k", k)
    check_number("temperature", temperature, low=0, low_open=True)
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    k_all, rank = gather_keys(k, group)
    logits = q @ k_all.t() / float(temperature)
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return F.cross_entropy(logits, labels) * (2.0 * float(temperature))


class InfoNCELoss(nn.Module):
    """``loss_fn(q1, q2, k1, k2) = infonce(q1, k2, T) + infonce(q2, k1, T)``, ``q_v`` the online (predictor) and
    ``k_v`` the momentum-encoder outputs of view ``v``, ``[B, C]``. MoCo v3: T = 0.2 for ViTs, 1.0 for ResNets."""

    def __init__(self, temperature: float = 0.2, group: dist.ProcessGroup | None = None):
        super().__init__()
        check_number("temperature", temperature, low=0, low_open=True)
        self.temperature = float(temperature)
        self.group = group

    def forward(self, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
        check_embedding_pair("q1", q1, "k2", k2)
        check_embedding_pair("q2", q2, "k1", k1)
        return infonce(q1, k2, self.temperature, self.group) + infonce(q2, k1, self.temperature, self.group)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
