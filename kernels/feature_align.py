"""Triton kernel of ``feature_align``: computes ``fastkd.ops.feature_align`` (see its docstring for the
formula) as per-row loss and ``d loss / d student`` in one read of each row.

For rows ``s[i]``, ``t[i]`` of the ``[M, D]`` inputs and row weight ``w_i`` (1 without weights) it writes
``loss[i] = w_i * l_i`` (fp32) and ``grad[i, :] = w_i * d l_i / d s[i]`` (student dtype). One program per row
(grid ``(M,)``, int64 row offsets) holds the whole row (``BLOCK_D >= D``), reduces in fp32 and skips ``w_i == 0``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compile_configs import register_compile_config

TARGET_NORMS = {"none": 0, "layernorm": 1, "l2": 2}
LOSSES = {"smooth_l1": 0, "mse": 1, "cosine": 2}
MAX_D = 4096


@triton.jit
def feature_align_fwd_kernel(
    s_ptr, t_ptr, w_ptr, loss_ptr, grad_ptr, D, stride_s, stride_t, stride_g, beta, eps, TARGET_NORM: tl.constexpr,
    STUDENT_NORM: tl.constexpr, LOSS: tl.constexpr, HAS_WEIGHT: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program = one row: ``loss[row] = w * l(norm_s(s[row]), norm_t(t[row]))`` and, with
    ``WRITE_GRAD``, ``grad[row] = w * d l / d s[row]`` (the module docstring's formula)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    if HAS_WEIGHT:
        w = tl.load(w_ptr + row).to(tl.float32)
        live = in_row & ((tl.zeros([BLOCK_D], tl.float32) + w) != 0.0)
    else:
        w = 1.0
        live = in_row
    s = tl.load(s_ptr + row * stride_s + cols, mask=live, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + row * stride_t + cols, mask=live, other=0.0).to(tl.float32)
    inv_d = 1.0 / D

    if TARGET_NORM == 1:
        mean = tl.sum(t, axis=0) * inv_d
        centred = tl.where(in_row, t - mean, 0.0)
        y = centred / tl.sqrt(tl.sum(centred * centred, axis=0) * inv_d + eps)
    elif TARGET_NORM == 2:
        y = t / tl.maximum(tl.sqrt(tl.sum(t * t, axis=0)), eps)
    else:
        y = t

    if STUDENT_NORM:
        s_norm = tl.sqrt(tl.sum(s * s, axis=0))
        s_inv = 1.0 / tl.maximum(s_norm, eps)
        x = s * s_inv
    else:
        x = s

    if LOSS == 0:
        d = x - y
        ad = tl.abs(d)
        quadratic = ad < beta
        elem = tl.where(quadratic, 0.5 * d * d / beta, ad - 0.5 * beta)
        loss = tl.sum(tl.where(in_row, elem, 0.0), axis=0) * inv_d
        sign = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
        gx = tl.where(quadratic, d / beta, sign) * inv_d
    elif LOSS == 1:
        d = x - y
        loss = tl.sum(d * d, axis=0) * inv_d
        gx = 2.0 * d * inv_d
    else:
        x_norm = tl.sqrt(tl.sum(x * x, axis=0))
        x_den = tl.maximum(x_norm, eps)
        y_hat = y / tl.maximum(tl.sqrt(tl.sum(y * y, axis=0)), eps)
        x_hat = x / x_den
        cos = tl.sum(x_hat * y_hat, axis=0)
        loss = 1.0 - cos
        projection = tl.where(x_norm > eps, cos, 0.0)
        gx = (x_hat * projection - y_hat) / x_den

    tl.store(loss_ptr + row, loss * w)
    if WRITE_GRAD:
        if STUDENT_NORM:
            radial = tl.where(s_norm > eps, tl.sum(x * gx, axis=0), 0.0)
            gs = (gx - x * radial) * s_inv
        else:
            gs = gx
        gs = tl.where(in_row, gs * w, 0.0)
        tl.store(grad_ptr + row * stride_g + cols, gs.to(grad_ptr.dtype.element_ty), mask=in_row)


def num_warps_for(block_d: int) -> int:
    """Warps per row so that each thread holds at most 16 elements of each operand."""
    return max(1, min(16, block_d // 128))


def launch_feature_align_fwd(
    student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None, *, target_norm: str,
    student_norm: bool, loss: str, beta: float, eps: float, write_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel on ``student``/``teacher`` ``[M, D]`` (unit stride along D, validated by the op)
    and an optional contiguous ``weight [M]``; returns ``(loss [M] fp32, grad [M, D] in student's dtype
    or an empty tensor)``. ``ValueError`` for ``D`` outside ``[1, MAX_D]``."""
    assert student.dim() == 2 and teacher.shape == student.shape and student.stride(1) == teacher.stride(1) == 1
    M, D = student.shape
    if not 1 <= D <= MAX_D:
        raise ValueError(f"feature dimension D must be in [1, {MAX_D}] for the Triton kernel, got {D}")
    out_loss = torch.empty(M, dtype=torch.float32, device=student.device)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if write_grad else student.new_empty(0)
    if M == 0:
        return out_loss, grad
    block_d = triton.next_power_of_2(D)
    feature_align_fwd_kernel[(M,)](
        student, teacher, out_loss if weight is None else weight, out_loss, grad if write_grad else student, D,
        student.stride(0), teacher.stride(0), D, float(beta), float(eps), TARGET_NORM=TARGET_NORMS[target_norm],
        STUDENT_NORM=bool(student_norm), LOSS=LOSSES[loss], HAS_WEIGHT=weight is not None,
        WRITE_GRAD=bool(write_grad), BLOCK_D=block_d, num_warps=num_warps_for(block_d))
    return out_loss, grad


def _register_compile_configs() -> None:
    """ViT-S/B/L widths (384, 768, 1024) and the largest supported D, for the default recipe
    (layernorm target, smooth-L1, bf16) and the heaviest one (layernorm, l2 student, cosine)."""
    variants = [
        ("bf16", "smooth_l1", False, (384, 768, 1024, MAX_D)),
        ("bf16", "cosine", True, (384, 768, 1024, MAX_D)),
        ("fp32", "cosine", True, (768, MAX_D)),
    ]
    for dtype, loss, student_norm, widths in variants:
        signature = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "w_ptr": "*fp32", "loss_ptr": "*fp32",
                     "grad_ptr": f"*{dtype}", **dict.fromkeys(["D", "stride_s", "stride_t", "stride_g"], "i32"),
                     "beta": "fp32", "eps": "fp32"}
        for d in widths:
            block_d = triton.next_power_of_2(d)
            constexprs = {"TARGET_NORM": TARGET_NORMS["layernorm"], "STUDENT_NORM": student_norm,
                          "LOSS": LOSSES[loss], "HAS_WEIGHT": True, "WRITE_GRAD": True, "BLOCK_D": block_d}
            register_compile_config("feature_align_fwd", feature_align_fwd_kernel, signature, constexprs,
                                    num_warps=num_warps_for(block_d),
                                    label=f"{dtype} D={d} {loss}{' l2-student' if student_norm else ''}")


_register_compile_configs()
