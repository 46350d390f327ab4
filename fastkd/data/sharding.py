"""Per-rank sharding of a dataset's indices for one epoch.

``perm = randperm(n, generator=seed(seed, epoch))`` (``arange(n)`` without shuffling); rank ``r`` of ``w`` takes
``perm[r::w]``. With ``drop_last`` every rank keeps ``(n // w) // batch_size`` batches (DDP lock-step); without,
the last batch may be short and ranks differ by one sample (evaluation only).
"""

from __future__ import annotations

import torch

from fastkd.checks import check_number, check_positive_ints


def shard_batches(num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                  epoch: int = 0, shuffle: bool = True, drop_last: bool = True) -> list[list[int]]:
    """Index batches of ``rank`` for ``epoch`` (see module docstring)."""
    count = num_batches(num_samples, batch_size, world_size=world_size, rank=rank, drop_last=drop_last)
    check_number("seed", seed, low=0, integer=True)
    check_number("epoch", epoch, low=0, integer=True)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # the same on every rank
    order = torch.randperm(num_samples, generator=generator) if shuffle else torch.arange(num_samples)
    shard = order[rank::world_size].tolist()[: count * batch_size]
    return [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]


def num_batches(num_samples: int, batch_size: int, *, world_size: int = 1, rank: int = 0, drop_last: bool = True) -> int:
    """Number of batches ``shard_batches`` yields for ``rank``."""
    check_positive_ints(num_samples=num_samples, batch_size=batch_size, world_size=world_size)
    check_number(f"rank (world_size={world_size})", rank, low=0, high=world_size - 1, integer=True)
    if drop_last:
        return (num_samples // world_size) // batch_size
    return -(-len(range(rank, num_samples, world_size)) // batch_size)


class EpochShard:
    """Rank ``rank``'s index batches (:func:`shard_batches`) for the current ``epoch``, and their count."""

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        self.num_samples, self.batch_size, self.epoch = num_samples, batch_size, 0
        self.options = dict(rank=rank, world_size=world_size, seed=seed, shuffle=shuffle, drop_last=drop_last)

    def batches(self) -> list[list[int]]:
        return shard_batches(self.num_samples, self.batch_size, epoch=self.epoch, **self.options)

    def __len__(self) -> int:
        options = self.options
        return num_batches(self.num_samples, self.batch_size, world_size=options["world_size"], rank=options["rank"],
                           drop_last=options["drop_last"])
