"""Triton kernels of fastkd.kernels.gather_tokens under TRITON_INTERPRET=1 against the reference:
forward and backward (every element of grad_x written, exact positional gradient), the batch groups
of the backward sized to the batch, grids (batch on axis 0) and offsets beyond int32."""

import importlib
import math

import pytest
import torch

from fastkd.kernels import gather_tokens as kernels
from fastkd.kernels.gather_tokens import (
    MAX_BATCH_GROUPS,
    MAX_GRID_X,
    bwd_batch_groups,
    bwd_grid,
    fwd_grid,
    launch_gather_tokens_bwd,
    launch_gather_tokens_fwd,
)
from fastkd.ops import gather_tokens_reference

# the package attribute ``fastkd.ops.gather_tokens`` is the function, so fetch the module itself
op_module = importlib.import_module("fastkd.ops.gather_tokens")


def _scatter_reference(grad_out, keep, N):
    """float64 ``grad_x`` of the gather: the rows of ``grad_out`` summed into the positions they picked."""
    B, K, D = grad_out.shape
    return torch.zeros(B, N, D, dtype=torch.float64).scatter_add_(1, keep[..., None].expand(-1, -1, D), grad_out.double())


def test_fwd_mixed_dtype_and_strided_rows():
    x = torch.randn(3, 9, 2, 24)[:, :, 1]  # rows strided, feature dim contiguous
    keep = torch.tensor([[8, 0], [4, 4], [1, 2]])
    pos = torch.randn(9, 24, dtype=torch.float32)
    out = op_module._gather_tokens_triton(x.bfloat16(), keep, pos)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, gather_tokens_reference(x.bfloat16(), keep, pos))
    raw = torch.empty(3, 2, 24)
    launch_gather_tokens_fwd(x, keep, None, raw)
    torch.testing.assert_close(raw, gather_tokens_reference(x, keep))
    grad = torch.randn(3, 2, 24)  # fp32 gradient of the promoted output, bf16 x
    grad_x, grad_pos = op_module._gather_tokens_backward_triton(grad, keep, 9, torch.bfloat16, True)
    want_x = torch.zeros(3, 9, 24).scatter_add_(1, keep[..., None].expand(-1, -1, 24), grad)
    assert grad_x.dtype == torch.bfloat16 and grad_pos.dtype == torch.float32
    torch.testing.assert_close(grad_x, want_x.bfloat16())
    torch.testing.assert_close(grad_pos, want_x.sum(0))


def test_bwd_writes_every_element_of_grad_x():
    grad_x = torch.full((2, 7, 5), float("nan"))
    keep = torch.tensor([[1, 3], [6, 6]])
    grad = torch.ones(2, 2, 5)
    grad_pos = launch_gather_tokens_bwd(grad, keep, grad_x, True)
    assert not grad_x.isnan().any()
    assert grad_x.sum().item() == 20.0 and grad_x[1, 6].eq(2.0).all()
    assert grad_pos[6].eq(2.0).all() and grad_pos[0].eq(0.0).all()


# ----------------------------------------------------------------------------- batch groups and grids


@pytest.mark.parametrize("B", [1, 5, 8, 9, 37, 300, 4096, 70_000])
def test_bwd_batch_groups_cover_the_batch(B):
    groups, per_group = bwd_batch_groups(B, True)
    assert groups * per_group >= B and (groups - 1) * per_group < B  # every batch once, no empty group
    if B <= MAX_BATCH_GROUPS:
        assert (groups, per_group) == (B, 1)
    else:
        assert per_group <= math.isqrt(B) + 1 and groups <= max(MAX_BATCH_GROUPS, math.isqrt(B) + 1)
    assert bwd_batch_groups(B, False) == (B, 1)


def test_bwd_batch_groups_at_batch_4096():
    """Each program used to walk B / 8 = 512 batches serially; now about sqrt(B) = 64, with 64 fp32
    partial positional gradients (for ViT-B, 64 x 197 x 768 x 4 B = 39 MB next to the 1.2 GB grad_x)."""
    assert bwd_batch_groups(4096, True) == (64, 64)


@pytest.mark.parametrize("with_pos", [True, False])
def test_grids_keep_the_batch_on_axis_0(with_pos):
    """B = 70 000 (> 65535, the limit of grid axes 1 and 2), ViT-B rows: batches only on axis 0."""
    B, N, K, D = 70_000, 197, 49, 768
    groups, _ = bwd_batch_groups(B, with_pos)
    for grid in (fwd_grid(B, K, D), bwd_grid(groups, N, D)):
        grid = (*grid, 1, 1)[:3]
        assert grid[0] <= MAX_GRID_X and grid[1] <= 65535 and grid[2] <= 65535
    assert bwd_grid(groups, N, D)[0] == groups * N and fwd_grid(B, K, D)[0] == B * K
    with pytest.raises(ValueError, match="exceeds"):
        fwd_grid(2**26, 64, 768)


def test_launchers_take_their_grids_from_the_grid_functions(monkeypatch):
    calls = []
    for name in ("fwd_grid", "bwd_grid"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args, _f=original, _n=name: calls.append((_n, args)) or _f(*args))
    x, keep = torch.randn(20, 6, 8), torch.randint(0, 6, (20, 3))
    launch_gather_tokens_fwd(x, keep, None, torch.empty(20, 3, 8))
    launch_gather_tokens_bwd(torch.randn(20, 3, 8), keep, torch.empty(20, 6, 8), True)
    assert calls == [("fwd_grid", (20, 3, 8)), ("bwd_grid", (bwd_batch_groups(20, True)[0], 6, 8))]


# ----------------------------------------------------------------------------- backward at larger batches


@pytest.mark.parametrize("B,N,D,K", [(20, 6, 5, 4), (37, 3, 33, 5), (300, 4, 8, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bwd_many_batches_per_group_match_reference(B, N, D, K, dtype):
    """Several batches per group (the last group partial), duplicate indices: grad_x equals the
    scatter-sum (in the gradient's dtype) and the positional gradient equals its fp32 batch sum."""
    groups, per_group = bwd_batch_groups(B, True)
    assert per_group > 1 and groups * per_group > B
    keep = torch.randint(0, N, (B, K))
    grad = torch.randn(B, K, D).to(dtype)
    grad_x = torch.full((B, N, D), float("nan"), dtype=dtype)
    grad_pos = launch_gather_tokens_bwd(grad, keep, grad_x, True)
    want = _scatter_reference(grad, keep, N)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(grad_x, want.to(dtype), **tol)
    assert grad_pos.dtype == torch.float32
    torch.testing.assert_close(grad_pos.double(), want.sum(0), atol=1e-5, rtol=1e-6)
    grad_x_only = torch.full((B, N, D), float("nan"), dtype=dtype)
    assert launch_gather_tokens_bwd(grad, keep, grad_x_only, False) is None
    torch.testing.assert_close(grad_x_only, grad_x, atol=0, rtol=0)


# ----------------------------------------------------------------------------- 64-bit offsets


def test_offsets_beyond_int32(huge_strided):
    """Sequence-first ``[B, N, D]`` views whose token stride times the token index exceeds 2**31
    elements (the stride itself fits in int32): x, out, grad_out and grad_x all strided so."""
    B, N, K, D = 2, 5, 5, 16
    token_stride = 2**30 + 64
    rows = huge_strided((N, 4 * B, D), (token_stride, D, 1), torch.float32, offset=2**31)
    x, out, grad_out, grad_x = (rows[:, i * B:(i + 1) * B].transpose(0, 1) for i in range(4))
    assert x.stride(1) == token_stride and (N - 1) * token_stride > 2**32
    keep = torch.tensor([[4, 0, 2, 4, 3], [1, 3, 3, 0, 4]])
    pos = torch.randn(N, D)
    launch_gather_tokens_fwd(x, keep, pos, out)
    torch.testing.assert_close(out, gather_tokens_reference(x.contiguous(), keep, pos))
    grad_pos = launch_gather_tokens_bwd(grad_out, keep, grad_x, True)
    want = _scatter_reference(grad_out.contiguous(), keep, N)
    torch.testing.assert_close(grad_x.double(), want)
    torch.testing.assert_close(grad_pos.double(), want.sum(0))
