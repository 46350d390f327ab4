"""Triton kernels of fastkd.kernels.token_relation under TRITON_INTERPRET=1 against the op's reference:
values and statistics, grids (batch x heads on axis 0), 64-bit offsets, fp16 gradients of a
mean-reduced loss, the dot input precision (TF32 for fp32) and the compile configurations."""

import pytest
import torch

from fastkd.kernels import token_relation as kernels
from fastkd.kernels.compile_configs import all_compile_configs
from fastkd.kernels.token_relation import (
    MAX_GRID_X,
    dot_input_precision,
    launch_token_relation_bwd,
    launch_token_relation_fwd,
    row_block_grid,
)
from fastkd.ops import DIRECTIONS, token_relation_reference
from tests.ops.test_token_relation import _assert_close, _inputs  # shared cases

# B, H_s, H_t, N, d_s, d_t
KERNEL_CASES = [
    (2, 2, 2, 7, 32, 32),
    (1, 2, 2, 50, 64, 32),
    (1, 1, 1, 1, 32, 32),
    (1, 1, 2, 37, 32, 80),
]


def _scales(d_s, d_t, temperature=0.7):
    return d_s**-0.5 / temperature, d_t**-0.5 / temperature


def _reference(q_s, k_s, q_t, k_t, grad, direction, *, dtype=None, temperature=0.7):
    """``(kl, dq_s, dk_s)`` of token_relation_reference (in ``dtype`` when given, e.g. float64)."""
    head_map = "mean" if q_t.shape[1] > q_s.shape[1] else None
    q_s, k_s, q_t, k_t = (x.detach().contiguous().to(dtype or x.dtype) for x in (q_s, k_s, q_t, k_t))
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    kl = token_relation_reference(q_s, k_s, q_t, k_t, direction=direction, head_map=head_map, temperature=temperature)
    kl.backward(grad.to(kl.dtype))
    return kl.detach(), q_s.grad, k_s.grad


def _kernels(q_s, k_s, q_t, k_t, grad, direction, **blocks):
    c_s, c_t = _scales(q_s.shape[-1], q_t.shape[-1])
    t2s = direction == "teacher_to_student"
    kl, lse_s, lse_t, lse_heads = launch_token_relation_fwd(q_s, k_s, q_t, k_t, c_s, c_t, t2s, **blocks)
    dq, dk = launch_token_relation_bwd(grad, q_s, k_s, q_t, k_t, kl, lse_s, lse_t, lse_heads, c_s, c_t, t2s, **blocks)
    return (kl, dq, dk), (lse_s, lse_t, lse_heads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernels_match_reference(case, direction, dtype):
    B, H_s, H_t, N, d_s, d_t = case
    q_s, k_s, q_t, k_t = _inputs(*case, dtype=dtype)
    grad = torch.randn(B, H_s, N)
    ours, stats = _kernels(q_s, k_s, q_t, k_t, grad, direction, block_m=16, block_n=16)
    assert ours[1].dtype == ours[2].dtype == dtype
    _assert_close(ours, _reference(q_s, k_s, q_t, k_t, grad, direction), dtype)
    c_s, c_t = _scales(d_s, d_t)
    cpu_stats = torch.ops.fastkd.token_relation(q_s, k_s, q_t, k_t, c_s, c_t, direction == "teacher_to_student")
    for got, want in zip(stats, cpu_stats[1:]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_identical_student_and_teacher_give_zero():
    q, k = _inputs(1, 2, 2, 20, 32, 32)[:2]
    c = 32**-0.5
    kl, lse_s, lse_t, lse_heads = launch_token_relation_fwd(q, k, q, k, c, c, True, block_m=16, block_n=16)
    dq, dk = launch_token_relation_bwd(torch.ones_like(kl), q, k, q, k, kl, lse_s, lse_t, lse_heads, c, c, True)
    assert kl.abs().max().item() < 1e-5
    assert dq.abs().max().item() == 0.0 and dk.abs().max().item() == 0.0


# ----------------------------------------------------------------------------- grids


def test_grid_keeps_batch_times_heads_on_axis_0():
    """B * H = 70 000 (> 65535, the limit of grid axes 1 and 2): every program is on axis 0."""
    grid = row_block_grid(70_000, 197, 64)
    grid = (*grid, 1, 1)[:3]
    assert grid[0] == 70_000 * 4 <= MAX_GRID_X
    assert grid[1] <= 65535 and grid[2] <= 65535
    assert row_block_grid(4096 * 16, 257, 32)[1:] == ()
    with pytest.raises(ValueError, match="exceed"):
        row_block_grid(2**30, 197, 64)


def test_every_launch_takes_its_grid_from_row_block_grid(monkeypatch):
    """The four kernels (row lse for a head-mapped teacher, forward, dq, dk) launch on the grid of
    row_block_grid, with the heads they cover."""
    calls = []

    def spy(num_heads, N, block):
        calls.append((num_heads, N, block))
        return row_block_grid(num_heads, N, block)

    monkeypatch.setattr(kernels, "row_block_grid", spy)
    q_s, k_s, q_t, k_t = _inputs(2, 1, 2, 9, 16, 16)
    _kernels(q_s, k_s, q_t, k_t, torch.randn(2, 1, 9), "teacher_to_student", block_m=16, block_n=16)
    assert calls == [(4, 9, 16), (2, 9, 16), (2, 9, 16), (2, 9, 16)]


# ----------------------------------------------------------------------------- 64-bit offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H_s,H_t", [(2, 2), (1, 2)])
def test_offsets_beyond_int32(huge_strided, H_s, H_t, dtype):
    """Sequence-first q/k views (as of a fused qkv tensor) whose token stride times the row index
    exceeds 2**31 elements while the stride itself fits in int32 (as at B = 4096 for ViT-B). The
    views start 2**31 elements into their storage so that int32-wrapped offsets would still read
    mapped (wrong) memory instead of crashing."""
    N, d = 5, 16
    token_stride = 2**30 + 64  # row 2 is at 2**31 + 128, row 4 at 2**32 + 256
    slots = 2 * H_s + 2 * H_t  # q_s, k_s, q_t, k_t heads side by side in each token
    qkv = huge_strided((N, slots, d), (token_stride, d, 1), dtype, offset=2**31)
    bounds = [0, H_s, 2 * H_s, 2 * H_s + H_t, slots]
    q_s, k_s, q_t, k_t = (qkv[:, lo:hi].unsqueeze(0).transpose(1, 2) for lo, hi in zip(bounds, bounds[1:]))
    assert q_s.stride(2) == token_stride and (N - 1) * token_stride > 2**32
    grad = torch.randn(1, H_s, N)
    for direction in DIRECTIONS:
        ours, _ = _kernels(q_s, k_s, q_t, k_t, grad, direction, block_m=16, block_n=16)
        _assert_close(ours, _reference(q_s, k_s, q_t, k_t, grad, direction), dtype)


# ----------------------------------------------------------------------------- fp16 gradients


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("weights", ["mean", "weighted mean"])
def test_fp16_gradient_of_a_mean_reduced_loss(direction, weights):
    """With a mean over a training batch (ViT-S: 256 x 6 heads x 197 rows) the upstream gradient is
    ~3e-6, and ``g * ds`` (~1e-8 for the attention probabilities of 64 keys) flushes to zero in fp16.
    Against the float64 reference, the fp16 gradients may lose no more than storing the exact result
    in fp16 loses (such small gradients are fp16 subnormals) plus 2e-3 of the largest gradient."""
    B, H, N, d = 2, 2, 64, 32
    q_s, k_s, q_t, k_t = _inputs(B, H, H, N, d, d, dtype=torch.float16, spread=1.0)
    grad = torch.full((B, H, N), 1.0 / (256 * 6 * 197))
    if weights == "weighted mean":
        grad *= torch.rand(B, H, N) * 2
    ours, _ = _kernels(q_s, k_s, q_t, k_t, grad, direction, block_m=16, block_n=16)
    ref = _reference(q_s, k_s, q_t, k_t, grad, direction, dtype=torch.float64)
    for got, want in zip(ours[1:], ref[1:]):
        assert got.dtype == torch.float16
        scale = want.abs().max().item()
        storage_error = (want.half().double() - want).abs().max().item()
        error = (got.double() - want).abs().max().item()
        assert error <= storage_error + 2e-3 * scale, (error / scale, storage_error / scale)


# ----------------------------------------------------------------------------- dot precision


def test_dot_input_precision_follows_torch_tf32_setting():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_input_precision(torch.float32, cuda) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_input_precision(torch.float32, cuda) == "tf32"
        assert dot_input_precision(torch.float32, cpu) == "ieee"  # the interpreter: exact dots
        for dtype in (torch.float16, torch.bfloat16):
            assert dot_input_precision(dtype, cuda) == "ieee"
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_input_precision(torch.float32, cuda) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision(previous)


def test_compile_configs_cover_fp32_tf32_and_every_kernel():
    configs = [c for c in all_compile_configs() if c.name.startswith("token_relation")]
    assert {c.constexprs["INPUT_PRECISION"] for c in configs} == {"ieee", "tf32"}
    tf32 = [c for c in configs if c.constexprs["INPUT_PRECISION"] == "tf32"]
    assert {c.name for c in tf32} == {"token_relation_fwd", "token_relation_bwd_dq", "token_relation_bwd_dk",
                                      "token_relation_row_lse"}
    for config in tf32:
        pointer = "qs_ptr" if "qs_ptr" in config.signature else "q_ptr"
        assert config.signature[pointer] == "*fp32"
    for config in configs:
        if config.constexprs["INPUT_PRECISION"] == "ieee":
            assert config.signature.get("qs_ptr", config.signature.get("q_ptr")) in ("*bf16", "*fp16")
