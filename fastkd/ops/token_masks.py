"""Which tokens a masked student keeps, as int64 indices ready for :func:`fastkd.ops.gather_tokens`.

``random_keep`` is MAE's random masking written as index arithmetic::

    ids_shuffle = argsort(torch.rand(B, N), dim=1)
    restore     = argsort(ids_shuffle, dim=1)   # the inverse permutation
    keep_idx    = ids_shuffle[:, :keep]

``topk_keep`` keeps the ``keep`` highest-scoring tokens of each row (e.g. by teacher attention), in
increasing position order: ``torch.topk(scores, keep, dim=1).indices.sort(dim=1).values``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastkd.checks import check_number


def _check_keep(keep: object, N: int) -> None:
    check_number("keep", keep, low=0, integer=True)
    if keep > N:
        raise ValueError(f"keep must be <= N, got keep={keep} > N={N}")


def random_keep(B: int, N: int, keep: int, *, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """MAE random masking: ``(keep_idx [B, keep] int64, restore [B, N] int64)``.

    ``keep_idx`` is a uniformly random subset in random order and ``torch.gather(shuffled, 1,
    restore)`` puts tokens listed in shuffled order back in place (the inverse permutation comes
    from a scatter, O(N), not a second sort). ``device`` defaults to the generator's (CPU without one).
    """
    check_number("B", B, low=0, integer=True)
    check_number("N", N, low=1, integer=True)
    _check_keep(keep, N)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    device = torch.device(device if device is not None else generator.device if generator is not None else "cpu")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but device={device}")
    ids_shuffle = torch.argsort(torch.rand(B, N, generator=generator, device=device), dim=1)
    positions = torch.arange(N, device=device).expand(B, N)
    restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, positions)
    return ids_shuffle[:, :keep].contiguous(), restore


def topk_keep(scores: Tensor, keep: int) -> Tensor:
    """Indices ``[B, keep]`` (int64) of the ``keep`` highest ``scores [B, N]`` (floating or integer) per
    row, sorted by position; ties and NaN (the largest) as ``torch.topk`` treats them."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [B, N], got {tuple(scores.shape)}")
    if not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
        raise TypeError(f"scores must be a real (floating or integer) tensor, got {scores.dtype}")
    _check_keep(keep, scores.shape[1])
    return torch.topk(scores, keep, dim=1, largest=True, sorted=False).indices.sort(dim=1).values
