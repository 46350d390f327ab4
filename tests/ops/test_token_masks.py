"""random_keep (MAE argsort-of-noise masking) and topk_keep (highest scores, in position order)."""

import pytest
import torch

from fastkd.ops import random_keep, topk_keep


@pytest.mark.parametrize("B,N,keep", [(4, 197, 49), (1, 1, 1), (3, 10, 0), (2, 7, 7), (0, 5, 2)])
def test_random_keep_is_mae_argsort_of_noise(B, N, keep):
    keep_idx, restore = random_keep(B, N, keep, generator=torch.Generator().manual_seed(3))
    noise = torch.rand(B, N, generator=torch.Generator().manual_seed(3))
    ids_shuffle = torch.argsort(noise, dim=1)
    assert keep_idx.dtype == restore.dtype == torch.int64
    assert keep_idx.shape == (B, keep) and restore.shape == (B, N)
    torch.testing.assert_close(keep_idx, ids_shuffle[:, :keep])
    torch.testing.assert_close(restore, torch.argsort(ids_shuffle, dim=1))
    # restore un-shuffles: tokens listed in shuffled order go back to their positions
    tokens = torch.arange(N).expand(B, N)
    torch.testing.assert_close(torch.gather(torch.gather(tokens, 1, ids_shuffle), 1, restore), tokens)


def test_random_keep_rows_differ_and_generator_is_reproducible():
    a, _ = random_keep(8, 50, 10, generator=torch.Generator().manual_seed(0))
    b, _ = random_keep(8, 50, 10, generator=torch.Generator().manual_seed(0))
    c, _ = random_keep(8, 50, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 8
    assert all(len(set(row.tolist())) == 10 for row in a)  # no repeats within a row


def test_random_keep_device_argument():
    keep_idx, restore = random_keep(2, 5, 3, device="cpu")
    assert keep_idx.device.type == restore.device.type == "cpu"


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((2, 5, 6), {}, ValueError, "keep must be <= N"),
        ((2, 5, -1), {}, ValueError, "keep must be >= 0"),
        ((2, 0, 0), {}, ValueError, "N must be >= 1"),
        ((-1, 5, 2), {}, ValueError, "B must be >= 0"),
        ((2, 5, 2.5), {}, TypeError, "keep must be an int"),
        ((2, 5, True), {}, TypeError, "keep must be an int"),
        ((2.0, 5, 2), {}, TypeError, "B must be an int"),
        ((2, 5, 2), {"generator": 0}, TypeError, "generator must be a torch.Generator"),
        ((2, 5, 2), {"generator": torch.Generator(), "device": "meta"}, ValueError, "generator is on cpu"),
    ],
)
def test_random_keep_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        random_keep(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("B,N,keep", [(3, 197, 20), (1, 1, 1), (2, 9, 0), (4, 6, 6)])
def test_topk_keep_highest_scores_in_position_order(B, N, keep, dtype):
    scores = torch.argsort(torch.rand(B, N), dim=1).to(dtype)  # distinct per row (exact in bf16)
    got = topk_keep(scores, keep)
    assert got.dtype == torch.int64 and got.shape == (B, keep)
    want = torch.tensor(
        [sorted(sorted(range(N), key=lambda n: -row[n].item())[:keep]) for row in scores.float()], dtype=torch.int64
    ).view(B, keep)
    torch.testing.assert_close(got, want)


def test_topk_keep_non_contiguous_scores_and_compile():
    scores = torch.randn(12, 5).t()  # [5, 12]
    want = torch.topk(scores, 4, dim=1).indices.sort(dim=1).values
    torch.testing.assert_close(topk_keep(scores, 4), want)
    compiled = torch.compile(topk_keep, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(scores, 4), want)


@pytest.mark.parametrize(
    "scores,keep,error,match",
    [
        (torch.randn(2, 5), 6, ValueError, "keep must be <= N"),
        (torch.randn(2, 5), -2, ValueError, "keep must be >= 0"),
        (torch.randn(2, 5), 1.0, TypeError, "keep must be an int"),
        (torch.randn(10), 2, ValueError, r"scores must have shape \[B, N\]"),
        (torch.ones(2, 5, dtype=torch.bool), 2, TypeError, "scores must be a real"),
        ([[1.0, 2.0]], 1, TypeError, "scores must be a Tensor"),
    ],
)
def test_topk_keep_bad_arguments(scores, keep, error, match):
    with pytest.raises(error, match=match):
        topk_keep(scores, keep)
