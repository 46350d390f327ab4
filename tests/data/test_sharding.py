import pytest

from fastkd.data.sharding import num_batches, shard_batches


@pytest.mark.parametrize("num_samples", [1, 17, 20])
def test_two_ranks_disjoint_and_complete(num_samples):
    shards = [
        sum(shard_batches(num_samples, 3, rank=r, world_size=2, seed=5, epoch=1, drop_last=False), [])
        for r in range(2)
    ]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(num_samples))
    for rank in range(2):
        batches = shard_batches(num_samples, 3, rank=rank, world_size=2, seed=5, epoch=1, drop_last=False)
        assert len(batches) == num_batches(num_samples, 3, world_size=2, rank=rank, drop_last=False)


def test_drop_last_gives_equal_whole_batches():
    per_rank = [shard_batches(23, 4, rank=r, world_size=2, seed=0, epoch=0) for r in range(2)]
    assert [len(b) for b in per_rank] == [2, 2] == [num_batches(23, 4, world_size=2)] * 2
    assert all(len(batch) == 4 for batches in per_rank for batch in batches)
    flat = [sum(b, []) for b in per_rank]
    assert not set(flat[0]) & set(flat[1])


def test_deterministic_per_seed_and_epoch():
    first = shard_batches(50, 5, seed=3, epoch=2)
    assert first == shard_batches(50, 5, seed=3, epoch=2)
    assert first != shard_batches(50, 5, seed=3, epoch=3)
    assert first != shard_batches(50, 5, seed=4, epoch=2)
    assert shard_batches(6, 2, shuffle=False) == [[0, 1], [2, 3], [4, 5]]


def test_errors():
    with pytest.raises(ValueError, match="rank"):
        shard_batches(10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        shard_batches(10, 0)
    with pytest.raises(ValueError, match="num_samples"):
        num_batches(0, 2)
