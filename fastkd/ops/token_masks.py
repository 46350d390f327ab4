"""Token index helpers for masked encoders: which tokens a masked student keeps.

``random_keep`` is MAE's random masking written as index arithmetic::

    noise       = torch.rand(B, N)
    ids_shuffle = argsort(noise, dim=1)
    restore     = argsort(ids_shuffle, dim=1)   # the inverse permutation
    keep_idx    = ids_shuffle[:, :keep]

``topk_keep`` keeps the ``keep`` highest-scoring tokens of each row (e.g. by teacher attention),
returned in increasing position order::

    torch.topk(scores, keep, dim=1).indices.sort(dim=1).values

Both return int64 indices ready for :func:`fastkd.ops.gather_tokens`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_count(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def random_keep(
    B: int,
    N: int,
    keep: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """MAE random masking: ``(keep_idx [B, keep] int64, restore [B, N] int64)``.

    ``ids_shuffle = argsort(rand(B, N))``, ``keep_idx = ids_shuffle[:, :keep]`` (a uniformly random
    subset in random order) and ``restore = argsort(ids_shuffle)``, so that
    ``torch.gather(shuffled, 1, restore)`` puts tokens listed in shuffled order back in place.
    The inverse permutation is computed with a scatter (O(N)) rather than a second sort.
    ``device`` defaults to the generator's device (CPU without a generator).
    """
    _check_count("B", B, minimum=0)
    _check_count("N", N, minimum=1)
    _check_count("keep", keep, minimum=0)
    if keep > N:
        raise ValueError(f"keep must be <= N, got keep={keep} > N={N}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but device={device}")
    noise = torch.rand(B, N, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    positions = torch.arange(N, device=device).expand(B, N)
    restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, positions)
    return ids_shuffle[:, :keep].contiguous(), restore


def topk_keep(scores: Tensor, keep: int) -> Tensor:
    """Indices ``[B, keep]`` (int64) of the ``keep`` highest ``scores[B, N]`` per row, sorted by position.

    Equals ``torch.topk(scores, keep, dim=1).indices.sort(dim=1).values``. Ties are broken as
    ``torch.topk`` breaks them; NaN scores count as the largest (``torch.topk`` semantics).
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [B, N], got {tuple(scores.shape)}")
    if not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
        raise TypeError(f"scores must be a real (floating or integer) tensor, got {scores.dtype}")
    _check_count("keep", keep, minimum=0)
    N = scores.shape[1]
    if keep > N:
        raise ValueError(f"keep must be <= N, got keep={keep} > N={N} (scores shape {tuple(scores.shape)})")
    indices = torch.topk(scores, keep, dim=1, largest=True, sorted=False).indices
    return indices.sort(dim=1).values
