"""Triton kernels of ``gather_tokens``: a row gather fused with the positional-embedding add, and
its backward (scatter into a dense gradient plus the positional-embedding gradient).

Forward, with ``x[B, N, D]``, ``keep[B, K]`` (int64) and optional ``pos[N, D]``::

    out[b, k] = x[b, keep[b, k]] + pos[keep[b, k]]        # fp32 math, stored in out's dtype

i.e. ``torch.gather(x + pos, 1, keep[..., None].expand(-1, -1, D))`` without materialising ``x + pos``.

Backward, with ``grad_out[B, K, D]``::

    grad_x[b, n] = sum_{k : keep[b, k] == n} grad_out[b, k]     # zero for tokens not kept
    grad_pos[n]  = sum_b grad_x[b, n]                           # fp32

i.e. ``torch.zeros(B, N, D).scatter_add_(1, keep[..., None].expand(-1, -1, D), grad_out)`` and its
sum over the batch. The backward kernel runs over *positions*, not over kept rows: program
``(n, d-block, batch-group)`` writes ``grad_x[b, n]`` for every batch of its group, either zeros or
the sum of the ``grad_out`` rows that picked ``n``. So ``grad_x`` is written exactly once (no
separate zero fill, no atomics, deterministic, duplicate indices summed correctly). The rows that
picked ``n`` are found through a counting sort of ``keep`` done by the launcher:
``order[b] = argsort(keep[b])`` (stable) and ``starts[b, n] = #{k : keep[b, k] < n}``, so they are
``order[b, starts[b, n] : starts[b, n + 1]]``. Each batch group writes its partial positional
gradient to ``pos_partial[group, n]``; the launcher sums the (few) groups.

Launch helpers take plain tensors (CUDA, or CPU under ``TRITON_INTERPRET=1``) and assume the
last dimension of every tensor is contiguous; indices must already be validated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import register_compile_config

MAX_BLOCK_D = 1024
MAX_BATCH_GROUPS = 8


@triton.jit
def gather_tokens_fwd_kernel(
    x_ptr,
    keep_ptr,
    pos_ptr,
    out_ptr,
    K,
    D,
    stride_xb,
    stride_xn,
    stride_keep_b,
    stride_pos_n,
    stride_out_b,
    stride_out_k,
    HAS_POS: tl.constexpr,
    BLOCK_D: tl.constexpr,
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
    grad_out_ptr,
    order_ptr,
    starts_ptr,
    grad_x_ptr,
    pos_partial_ptr,
    B,
    N,
    K,
    D,
    batches_per_group,
    stride_go_b,
    stride_go_k,
    stride_gx_b,
    stride_gx_n,
    HAS_POS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program = one position ``n`` x one feature block x one group of batches."""
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    group = tl.program_id(2)
    b_begin = group.to(tl.int64) * batches_per_group
    num_batches = tl.minimum(b_begin + batches_per_group, B) - b_begin
    pos_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, num_batches):
        b64 = b_begin + i
        lo = tl.load(starts_ptr + b64 * (N + 1) + n)
        hi = tl.load(starts_ptr + b64 * (N + 1) + n + 1)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(lo, hi):
            k = tl.load(order_ptr + b64 * K + j).to(tl.int64)
            acc += tl.load(grad_out_ptr + b64 * stride_go_b + k * stride_go_k + offs, mask=mask, other=0.0).to(
                tl.float32
            )
        tl.store(grad_x_ptr + b64 * stride_gx_b + n * stride_gx_n + offs, acc.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if HAS_POS:
            pos_acc += acc
    if HAS_POS:
        tl.store(pos_partial_ptr + (group.to(tl.int64) * N + n) * D + offs, pos_acc, mask=mask)


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_D)


def _num_warps(block_d: int) -> int:
    return 4 if block_d >= 512 else (2 if block_d >= 128 else 1)


def launch_gather_tokens_fwd(x: torch.Tensor, keep: torch.Tensor, pos: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out[b, k] = x[b, keep[b, k]] (+ pos[keep[b, k]])``; ``pos`` is ``[N, D]``, ``out`` is ``[B, K, D]``."""
    B, K = keep.shape
    D = x.shape[2]
    if B * K == 0 or D == 0:
        return
    block_d = _block_d(D)
    pos_arg = pos if pos is not None else x
    grid = (B * K, triton.cdiv(D, block_d))
    gather_tokens_fwd_kernel[grid](
        x, keep, pos_arg, out, K, D,
        x.stride(0), x.stride(1), keep.stride(0), pos_arg.stride(0), out.stride(0), out.stride(1),
        HAS_POS=pos is not None, BLOCK_D=block_d, num_warps=_num_warps(block_d),
    )  # fmt: skip


def launch_gather_tokens_bwd(
    grad_out: torch.Tensor, keep: torch.Tensor, grad_x: torch.Tensor, with_pos: bool
) -> torch.Tensor | None:
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
    groups = min(B, MAX_BATCH_GROUPS) if with_pos else B
    batches_per_group = triton.cdiv(B, groups)
    groups = triton.cdiv(B, batches_per_group)
    pos_partial = torch.empty(groups, N, D, dtype=torch.float32, device=grad_x.device) if with_pos else grad_x
    block_d = _block_d(D)
    grid = (N, triton.cdiv(D, block_d), groups)
    gather_tokens_bwd_kernel[grid](
        grad_out, order, starts, grad_x, pos_partial, B, N, K, D, batches_per_group,
        grad_out.stride(0), grad_out.stride(1), grad_x.stride(0), grad_x.stride(1),
        HAS_POS=with_pos, BLOCK_D=block_d, num_warps=_num_warps(block_d),
    )  # fmt: skip
    return pos_partial.sum(dim=0) if with_pos else None


def _register_vit_configs() -> None:
    """ViT-S/B/L widths (D = 384, 768, 1024). N (197 or 257 tokens) and B are runtime arguments,
    so both token counts launch the same compiled binary per width. Dtypes (x, pos, out): fp32,
    bf16 with a bf16 or an fp32 pos-embed (autocast: the sum promotes to fp32), and no pos-embed
    (the launchers then pass x / grad_x as the unused pos pointers)."""
    dtype_cases = [("fp32", "fp32", "fp32"), ("fp32", None, "fp32"), ("bf16", "bf16", "bf16"),
                   ("bf16", "fp32", "fp32"), ("bf16", None, "bf16")]  # fmt: skip
    for model, D in (("vit_small", 384), ("vit_base", 768), ("vit_large", 1024)):
        block_d = _block_d(D)
        for x_dtype, pos_dtype, out_dtype in dtype_cases:
            has_pos = pos_dtype is not None
            label = f"{model} D={D} N=197/257 x={x_dtype} pos={pos_dtype} out={out_dtype}"
            register_compile_config(
                "gather_tokens_fwd",
                gather_tokens_fwd_kernel,
                {
                    "x_ptr": f"*{x_dtype}", "keep_ptr": "*i64", "pos_ptr": f"*{pos_dtype or x_dtype}",
                    "out_ptr": f"*{out_dtype}", "K": "i32", "D": "i32", "stride_xb": "i32", "stride_xn": "i32",
                    "stride_keep_b": "i32", "stride_pos_n": "i32", "stride_out_b": "i32", "stride_out_k": "i32",
                },
                {"HAS_POS": has_pos, "BLOCK_D": block_d},
                num_warps=_num_warps(block_d),
                label=label,
            )  # fmt: skip
            register_compile_config(
                "gather_tokens_bwd",
                gather_tokens_bwd_kernel,
                {
                    "grad_out_ptr": f"*{out_dtype}", "order_ptr": "*i64", "starts_ptr": "*i64",
                    "grad_x_ptr": f"*{x_dtype}", "pos_partial_ptr": "*fp32" if has_pos else f"*{x_dtype}",
                    "B": "i32", "N": "i32", "K": "i32", "D": "i32", "batches_per_group": "i32",
                    "stride_go_b": "i32", "stride_go_k": "i32", "stride_gx_b": "i32", "stride_gx_n": "i32",
                },
                {"HAS_POS": has_pos, "BLOCK_D": block_d},
                num_warps=_num_warps(block_d),
                label=label,
            )  # fmt: skip


_register_vit_configs()
