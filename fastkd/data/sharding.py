"""Per-rank sharding of a dataset's indices for one epoch.

Epoch order: ``perm = randperm(n, generator=seed(seed, epoch))`` when shuffling, else
``arange(n)``; rank ``r`` of ``w`` takes ``perm[r::w]``. Shards are disjoint and together cover
all ``n`` indices. With ``drop_last`` every rank keeps the same whole number of batches,
``(n // w) // batch_size`` (so DDP ranks step in lock-step); the few dropped indices are a
different random subset each epoch when shuffling. Without ``drop_last`` the last batch may be
short and ranks may differ by one sample (use it for evaluation, not for DDP training).
"""

from __future__ import annotations

import torch

from fastkd.checks import check_number


def _check_int(name: str, value, minimum: int) -> int:
    check_number(name, value, low=minimum, integer=True)
    return value


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator every rank uses for ``epoch``'s order (same on all ranks)."""
    return torch.Generator().manual_seed(_check_int("seed", seed, 0) * 1_000_003 + _check_int("epoch", epoch, 0))


def shard_batches(
    num_samples: int,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> list[list[int]]:
    """Index batches of ``rank`` for ``epoch`` (see module docstring)."""
    _check_int("num_samples", num_samples, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("world_size", world_size, 1)
    check_number(f"rank (world_size={world_size})", rank, low=0, high=world_size - 1, integer=True)
    order = torch.randperm(num_samples, generator=epoch_generator(seed, epoch)) if shuffle else torch.arange(num_samples)
    shard = order[rank::world_size].tolist()
    if drop_last:
        shard = shard[: num_batches(num_samples, batch_size, world_size=world_size, drop_last=True) * batch_size]
    return [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]


def num_batches(num_samples: int, batch_size: int, *, world_size: int = 1, rank: int = 0, drop_last: bool = True) -> int:
    """Number of batches ``shard_batches`` yields for ``rank``."""
    _check_int("num_samples", num_samples, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("world_size", world_size, 1)
    if drop_last:
        return (num_samples // world_size) // batch_size
    shard_size = len(range(rank, num_samples, world_size))
    return -(-shard_size // batch_size)
