"""Triton kernels of ``gather_tokens``: compute ``fastkd.ops.gather_tokens`` (a row gather fused with
the positional-embedding add, ``out[b, k] = x[b, keep[b, k]] + pos[keep[b, k]]``) and its backward
(``grad_x[b, n] = sum_{k: keep[b, k] = n} grad_out[b, k]``, ``grad_pos = sum_b grad_x[b]``). Sums in fp32.

Forward: one program per kept row ``(b, k)`` and feature block. Backward: one program per (batch group, position
``n``, feature block) writes ``grad_x[b, n]`` once for every batch of its group (no zero fill, no atomics,
deterministic), summing the ``grad_out`` rows ``order[b, starts[b, n] : starts[b, n + 1]]`` of the launcher's
counting sort (``order[b] = argsort(keep[b])`` stable, ``starts[b, n] = #{k : keep[b, k] < n}``). With a positional
embedding each group adds into an fp32 ``pos_partial[group, n]`` that the launcher sums.

Rows and (group, position) pairs go on grid axis 0 (axes 1, 2 allow only 65535), feature blocks on axis 1; batch
and token offsets are int64. Launchers take contiguous-last-dim tensors and validated indices.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .compile_configs import register_compile_config
from .loop_bounds import loop_bound

MAX_BLOCK_D = 1024
# backward batch groups with a positional embedding: at least this many (see bwd_batch_groups)
MAX_BATCH_GROUPS = 8
MAX_GRID_X = 2**31 - 1  # programs on grid axis 0
MAX_GRID_YZ = 65535  # programs on grid axes 1 and 2


@triton.jit
def gather_tokens_fwd_kernel(
    x_ptr, keep_ptr, pos_ptr, out_ptr, K, D, stride_xb, stride_xn, stride_keep_b, stride_pos_n, stride_out_b,
    stride_out_k, HAS_POS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program = one kept row ``(b, k)`` x one block of ``BLOCK_D`` features."""
    row = tl.program_id(0)
    b = (row // K).to(tl.int64)
    k = (row % K).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    token = tl.load(keep_ptr + b * stride_keep_b + k).to(tl.int64)
    value = tl.load(x_ptr + b * stride_xb + token * stride_xn + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_POS:
        value += tl.load(pos_ptr + token * stride_pos_n + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * stride_out_b + k * stride_out_k + offs, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gather_tokens_bwd_kernel(
    grad_out_ptr, order_ptr, starts_ptr, grad_x_ptr, pos_partial_ptr, B, N, K, D, batches_per_group,
    stride_go_b, stride_go_k, stride_gx_b, stride_gx_n, HAS_POS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program = one group of batches x one position ``n`` (both on axis 0, ``pid = group * N + n``)
    x one feature block (axis 1)."""
    pid = tl.program_id(0)
    group = (pid // N).to(tl.int64)
    n = (pid % N).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    b_begin = group * batches_per_group
    num_batches = tl.minimum(b_begin + batches_per_group, B) - b_begin
    pos_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, loop_bound(num_batches)):
        b64 = b_begin + i
        lo = tl.load(starts_ptr + b64 * (N + 1) + n)
        hi = tl.load(starts_ptr + b64 * (N + 1) + n + 1)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(loop_bound(lo), loop_bound(hi)):
            k = tl.load(order_ptr + b64 * K + j).to(tl.int64)
            row = tl.load(grad_out_ptr + b64 * stride_go_b + k * stride_go_k + offs, mask=mask, other=0.0)
            acc += row.to(tl.float32)
        out = grad_x_ptr + b64 * stride_gx_b + n * stride_gx_n + offs
        tl.store(out, acc.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if HAS_POS:
            pos_acc += acc
    if HAS_POS:
        tl.store(pos_partial_ptr + (group * N + n) * D + offs, pos_acc, mask=mask)


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_D)


def _num_warps(block_d: int) -> int:
    return 4 if block_d >= 512 else (2 if block_d >= 128 else 1)


def bwd_batch_groups(B: int, with_pos: bool) -> tuple[int, int]:
    """``(groups, batches_per_group)``, no group empty: ``B`` groups without a positional embedding, else
    ``max(min(B, MAX_BATCH_GROUPS), ceil(sqrt(B)))`` (B = 4096: 64 groups of 64 batches)."""
    if B <= 0:
        return 0, 1
    if not with_pos:
        return B, 1
    groups = max(min(B, MAX_BATCH_GROUPS), math.isqrt(B - 1) + 1)
    batches_per_group = triton.cdiv(B, groups)
    return triton.cdiv(B, batches_per_group), batches_per_group


def _check_grid(grid: tuple[int, ...]) -> tuple[int, ...]:
    if grid[0] > MAX_GRID_X or any(axis > MAX_GRID_YZ for axis in grid[1:]):
        raise ValueError(f"grid {grid} exceeds the launch limits ({MAX_GRID_X}, {MAX_GRID_YZ}, {MAX_GRID_YZ})")
    return grid


def fwd_grid(B: int, K: int, D: int) -> tuple[int, int]:
    """Grid of the forward: ``(B * K kept rows, feature blocks)``."""
    return _check_grid((B * K, triton.cdiv(D, _block_d(D))))


def bwd_grid(groups: int, N: int, D: int) -> tuple[int, int]:
    """Grid of the backward: ``(groups * N (group, position) pairs, feature blocks)``."""
    return _check_grid((groups * N, triton.cdiv(D, _block_d(D))))


def launch_gather_tokens_fwd(x: torch.Tensor, keep: torch.Tensor, pos: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out[b, k] = x[b, keep[b, k]] (+ pos[keep[b, k]])``; ``pos`` is ``[N, D]``, ``out`` is ``[B, K, D]``."""
    B, K = keep.shape
    D = x.shape[2]
    if B * K == 0 or D == 0:
        return
    block_d = _block_d(D)
    pos_arg = pos if pos is not None else x
    gather_tokens_fwd_kernel[fwd_grid(B, K, D)](
        x, keep, pos_arg, out, K, D, x.stride(0), x.stride(1), keep.stride(0), pos_arg.stride(0), out.stride(0),
        out.stride(1), HAS_POS=pos is not None, BLOCK_D=block_d, num_warps=_num_warps(block_d))


def launch_gather_tokens_bwd(grad_out: torch.Tensor, keep: torch.Tensor, grad_x: torch.Tensor,
                             with_pos: bool) -> torch.Tensor | None:
    """Write ``grad_x[B, N, D]`` (every element) and return the fp32 positional gradient ``[N, D]``
    when ``with_pos`` (else ``None``)."""
    B, N, D = grad_x.shape
    K = keep.shape[1]
    if B * N == 0 or D == 0:
        return torch.zeros(N, D, dtype=torch.float32, device=grad_x.device) if with_pos else None
    order = torch.argsort(keep, dim=1, stable=True)
    counts = torch.zeros(B, N + 1, dtype=torch.int64, device=keep.device)
    counts[:, 1:].scatter_add_(1, keep, torch.ones_like(keep))
    starts = counts.cumsum_(dim=1)
    groups, batches_per_group = bwd_batch_groups(B, with_pos)
    pos_partial = torch.empty(groups, N, D, dtype=torch.float32, device=grad_x.device) if with_pos else grad_x
    block_d = _block_d(D)
    gather_tokens_bwd_kernel[bwd_grid(groups, N, D)](
        grad_out, order, starts, grad_x, pos_partial, B, N, K, D, batches_per_group, grad_out.stride(0),
        grad_out.stride(1), grad_x.stride(0), grad_x.stride(1), HAS_POS=with_pos, BLOCK_D=block_d,
        num_warps=_num_warps(block_d))
    return pos_partial.sum(dim=0) if with_pos else None


def _register_vit_configs() -> None:
    """ViT-S/B/L widths (N, B are runtime); (x, pos, out) dtypes incl. an fp32 pos-embed under autocast and none
    (x / grad_x then stand in for the unused pos pointers)."""
    dtype_cases = [("fp32", "fp32", "fp32"), ("fp32", None, "fp32"), ("bf16", "bf16", "bf16"),
                   ("bf16", "fp32", "fp32"), ("bf16", None, "bf16")]
    for model, D in (("vit_small", 384), ("vit_base", 768), ("vit_large", 1024)):
        for x, pos, out in dtype_cases:
            meta, warps = {"HAS_POS": pos is not None, "BLOCK_D": _block_d(D)}, _num_warps(_block_d(D))
            label = f"{model} D={D} N=197/257 x={x} pos={pos} out={out}"
            fwd = dict(x_ptr=f"*{x}", keep_ptr="*i64", pos_ptr=f"*{pos or x}", out_ptr=f"*{out}")
            bwd = dict(grad_out_ptr=f"*{out}", order_ptr="*i64", starts_ptr="*i64", grad_x_ptr=f"*{x}",
                       pos_partial_ptr="*fp32" if pos else f"*{x}")
            fwd.update(dict.fromkeys(["K", "D", "stride_xb", "stride_xn", "stride_keep_b", "stride_pos_n",
                                      "stride_out_b", "stride_out_k"], "i32"))
            bwd.update(dict.fromkeys(["B", "N", "K", "D", "batches_per_group", "stride_go_b", "stride_go_k",
                                      "stride_gx_b", "stride_gx_n"], "i32"))
            register_compile_config("gather_tokens_fwd", gather_tokens_fwd_kernel, fwd, meta, num_warps=warps,
                                    label=label)
            register_compile_config("gather_tokens_bwd", gather_tokens_bwd_kernel, bwd, meta, num_warps=warps,
                                    label=label)


_register_vit_configs()
