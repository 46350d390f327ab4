"""Triton kernels of ``fastkd.ops.token_relation`` (its docstring has the formula), streamed over key blocks so
that no ``N x N`` tensor reaches global memory. ``s``/``t``: student/teacher logit tiles (scales ``c_s``, ``c_t``
``= scale / temperature``), ``a_s``/``a_t`` their log-softmax, ``G = H_t // H_s``.

Forward (one program per (b, student head, query block)): online log-sum-exp of both sides and ``acc = sum_j
exp(x_j - m_x) (x_j - y_j)`` (``x`` the weighting side: teacher for teacher_to_student, else student), rescaled as
``m_x`` grows; ``kl = acc / l_x - lse_x + lse_y``. Writes only fp32 ``kl``, ``lse_s``, ``lse_t`` ``[B, H_s, N]``.
For ``G > 1`` the teacher tile is ``log(mean_g P_g)``, a running ``logaddexp`` over the group minus ``log G``, from
the per-head lse ``[B, H_t, N]`` of ``row_lse_kernel``.

Backward, upstream gradient ``g``: ``ds = g * (P_s - P_t)`` (teacher_to_student) or ``g * P_s * (a_s - a_t - kl)``
(student_to_teacher); ``dq_s = c_s * ds @ k_s``, ``dk_s = c_s * ds^T @ q_s``, probabilities recomputed from the
saved lse as in FlashAttention. Against 16-bit underflow (a mean-reduced loss has ``g`` ~1e-6) dq scales its fp32
rows by ``c_s * g`` after the dots, and dk feeds the dots ``(ds / g) * (g / g_max)`` and scales by ``c_s * g_max``.
dk is a separate key-block-major pass instead of atomics: deterministic, no fp32 scratch, one more recompute. Extra
memory: ``O(B * H * N)``. Prior art: StreamKL (arXiv 2606.20005) streams the same KL over key blocks.

Launch: a 1-D grid of ``B * H * cdiv(N, BLOCK)`` programs (axes 1 and 2 allow only 65535), int64 offsets for
batch/head/sequence strides (sequence-first q/k views of a fused qkv). Tiles and warps keep every registered
configuration free of register spills. Launchers take ``[B, H, N, d]`` tensors (CUDA, or CPU under
``TRITON_INTERPRET=1``); 16-bit dots accumulate in fp32, fp32 dots use TF32 where PyTorch allows it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compile_configs import register_compile_config
from .loop_bounds import loop_bound

MAX_GRID_X = 2**31 - 1  # programs on grid axis 0 (axes 1 and 2: 65535)


@triton.jit
def _load_rows(base, stride_n, offs_rows, n_rows, offs_d, d):
    """Tile ``base[offs_rows, offs_d]`` of a ``[n_rows, d]`` matrix (zero outside); row offsets in int64."""
    mask = (offs_rows < n_rows)[:, None] & (offs_d < d)[None, :]
    rows = offs_rows.to(tl.int64)
    return tl.load(base + rows[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _split_program_id(N, BLOCK: tl.constexpr):
    """``(head, row offsets)`` of this program; consecutive programs walk one head's row blocks (shared L2)."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(N, BLOCK)
    return pid // num_blocks, (pid % num_blocks) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _head_pair(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, lse_heads_ptr, N, H_S, stride_qs_b, stride_qs_h, stride_ks_b, stride_ks_h,
    stride_qt_b, stride_qt_h, stride_kt_b, stride_kt_h, G: tl.constexpr, BLOCK: tl.constexpr,
):
    """``(pid_bh = b * H_s + h, row offsets, bases of q_s[b, h], k_s[b, h], q_t[b, h*G], k_t[b, h*G], group lse)``;
    teacher head ``g`` is ``g * stride_*t_h`` further. (Offsets computed last: fp32 dk, G = 2 spills otherwise.)"""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(N, BLOCK)
    pid_bh = pid // num_blocks
    b = (pid_bh // H_S).to(tl.int64)
    h = (pid_bh % H_S).to(tl.int64)
    qs_base = qs_ptr + b * stride_qs_b + h * stride_qs_h
    ks_base = ks_ptr + b * stride_ks_b + h * stride_ks_h
    qt_base = qt_ptr + b * stride_qt_b + h * G * stride_qt_h
    kt_base = kt_ptr + b * stride_kt_b + h * G * stride_kt_h
    lse_heads_base = lse_heads_ptr + (pid_bh.to(tl.int64) * G) * N
    offs = (pid % num_blocks) * BLOCK + tl.arange(0, BLOCK)
    return pid_bh, offs, qs_base, ks_base, qt_base, kt_base, lse_heads_base


@triton.jit
def _logit_tiles(
    q_s, k_s, q_t0, qt_base, kt_base, lse_heads_base, stride_qt_h, stride_qt_n, stride_kt_h, stride_kt_n,
    offs_m, offs_n, offs_dt, N, D_T, c_s, c_t, G: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Unmasked fp32 tiles ``s = c_s * q_s @ k_s^T`` and ``t = c_t * q_t @ k_t^T`` (``G == 1``), else ``log(mean_g
    P_g)`` over the group (``q_t0``: the first teacher head's query tile)."""
    s = tl.dot(q_s, tl.trans(k_s), input_precision=INPUT_PRECISION) * c_s
    k_t = _load_rows(kt_base, stride_kt_n, offs_n, N, offs_dt, D_T)
    t = tl.dot(q_t0, tl.trans(k_t), input_precision=INPUT_PRECISION) * c_t
    if G > 1:
        row_mask = offs_m < N
        t = t - tl.load(lse_heads_base + offs_m, mask=row_mask, other=0.0)[:, None]
        for g in tl.static_range(1, G):
            head = tl.full([], g, tl.int64)
            q_g = _load_rows(qt_base + head * stride_qt_h, stride_qt_n, offs_m, N, offs_dt, D_T)
            k_g = _load_rows(kt_base + head * stride_kt_h, stride_kt_n, offs_n, N, offs_dt, D_T)
            a_g = tl.dot(q_g, tl.trans(k_g), input_precision=INPUT_PRECISION) * c_t
            a_g = a_g - tl.load(lse_heads_base + head * N + offs_m, mask=row_mask, other=0.0)[:, None]
            top = tl.maximum(t, a_g)
            t = top + tl.log(tl.exp(t - top) + tl.exp(a_g - top))
        t = t - tl.log(tl.full([], G, tl.float32))
    return s, t


@triton.jit
def _load_row_stats(kl_ptr, lse_s_ptr, lse_t_ptr, grad_ptr, stats_base, offs_m, N):
    """Saved ``(lse_s, lse_t, kl, grad)`` of rows ``offs_m`` (0 past ``N``), head pair rows from ``stats_base``."""
    row_mask = offs_m < N
    lse_s = tl.load(lse_s_ptr + stats_base + offs_m, mask=row_mask, other=0.0)
    lse_t = tl.load(lse_t_ptr + stats_base + offs_m, mask=row_mask, other=0.0)
    kl = tl.load(kl_ptr + stats_base + offs_m, mask=row_mask, other=0.0)
    grad = tl.load(grad_ptr + stats_base + offs_m, mask=row_mask, other=0.0)
    return lse_s, lse_t, kl, grad


@triton.jit
def _ds_tile(
    q_s, k_s, q_t0, qt_base, kt_base, lse_heads_base, stride_qt_h, stride_qt_n, stride_kt_h, stride_kt_n,
    offs_m, offs_n, offs_dt, N, D_T, c_s, c_t, lse_s, lse_t, kl,
    G: tl.constexpr, TEACHER_TO_STUDENT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Recomputed ``ds / g = d kl / d s`` (zero outside ``N``), ``a = logits - saved lse``: ``P_s - P_t``
    (teacher_to_student) or ``P_s * (a_s - a_t - kl)`` (student_to_teacher)."""
    s, t = _logit_tiles(q_s, k_s, q_t0, qt_base, kt_base, lse_heads_base, stride_qt_h, stride_qt_n, stride_kt_h,
                        stride_kt_n, offs_m, offs_n, offs_dt, N, D_T, c_s, c_t, G, INPUT_PRECISION)
    valid = (offs_m < N)[:, None] & (offs_n < N)[None, :]
    a_s = s - lse_s[:, None]
    a_t = t - lse_t[:, None]
    p_s = tl.exp(a_s)
    if TEACHER_TO_STUDENT:
        ds = p_s - tl.exp(a_t)
    else:
        ds = p_s * (a_s - a_t - kl[:, None])
    return tl.where(valid, ds, 0.0)


@triton.jit
def row_lse_kernel(
    q_ptr, k_ptr, lse_ptr, N, H, D, c,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``lse[b, h, i] = logsumexp_j(c * <q[b, h, i], k[b, h, j]>)``, streamed over key blocks."""
    pid_bh, offs_m = _split_program_id(N, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr + b * stride_qb + h * stride_qh, stride_qn, offs_m, N, offs_d, D)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, loop_bound(N), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, stride_kn, offs_n, N, offs_d, D)
        x = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * c
        x = tl.where((offs_n < N)[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
        m = m_new
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N + offs_m, m + tl.log(l), mask=offs_m < N)


@triton.jit
def token_relation_fwd_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, lse_heads_ptr, kl_ptr, lse_s_ptr, lse_t_ptr, N, H_S, D_S, D_T, c_s, c_t,
    stride_qs_b, stride_qs_h, stride_qs_n, stride_ks_b, stride_ks_h, stride_ks_n,
    stride_qt_b, stride_qt_h, stride_qt_n, stride_kt_b, stride_kt_h, stride_kt_n,
    G: tl.constexpr, TEACHER_TO_STUDENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program = one block of query rows of one (b, student head); streams over key blocks."""
    pid_bh, offs_m, qs_base, ks_base, qt_base, kt_base, lse_heads_base = _head_pair(
        qs_ptr, ks_ptr, qt_ptr, kt_ptr, lse_heads_ptr, N, H_S, stride_qs_b, stride_qs_h, stride_ks_b, stride_ks_h,
        stride_qt_b, stride_qt_h, stride_kt_b, stride_kt_h, G, BLOCK_M)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    q_s = _load_rows(qs_base, stride_qs_n, offs_m, N, offs_ds, D_S)
    q_t0 = _load_rows(qt_base, stride_qt_n, offs_m, N, offs_dt, D_T)

    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, loop_bound(N), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = (offs_n < N)[None, :]
        k_s = _load_rows(ks_base, stride_ks_n, offs_n, N, offs_ds, D_S)
        s, t = _logit_tiles(q_s, k_s, q_t0, qt_base, kt_base, lse_heads_base, stride_qt_h, stride_qt_n, stride_kt_h,
                            stride_kt_n, offs_m, offs_n, offs_dt, N, D_T, c_s, c_t, G, INPUT_PRECISION)
        diff = tl.where(col_ok, t - s, 0.0)
        s = tl.where(col_ok, s, float("-inf"))
        t = tl.where(col_ok, t, float("-inf"))
        m_s_new = tl.maximum(m_s, tl.max(s, 1))
        m_t_new = tl.maximum(m_t, tl.max(t, 1))
        alpha_s = tl.exp(m_s - m_s_new)
        alpha_t = tl.exp(m_t - m_t_new)
        e_s = tl.exp(s - m_s_new[:, None])
        e_t = tl.exp(t - m_t_new[:, None])
        l_s = l_s * alpha_s + tl.sum(e_s, 1)
        l_t = l_t * alpha_t + tl.sum(e_t, 1)
        if TEACHER_TO_STUDENT:
            acc = acc * alpha_t + tl.sum(e_t * diff, 1)
        else:
            acc = acc * alpha_s - tl.sum(e_s * diff, 1)
        m_s = m_s_new
        m_t = m_t_new
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    if TEACHER_TO_STUDENT:
        kl = acc / l_t - lse_t + lse_s
    else:
        kl = acc / l_s - lse_s + lse_t
    out = pid_bh.to(tl.int64) * N + offs_m
    row_mask = offs_m < N
    tl.store(kl_ptr + out, kl, mask=row_mask)
    tl.store(lse_s_ptr + out, lse_s, mask=row_mask)
    tl.store(lse_t_ptr + out, lse_t, mask=row_mask)


@triton.jit
def token_relation_bwd_dq_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, lse_heads_ptr, kl_ptr, lse_s_ptr, lse_t_ptr, grad_ptr, dq_ptr,
    N, H_S, D_S, D_T, c_s, c_t, stride_qs_b, stride_qs_h, stride_qs_n, stride_ks_b, stride_ks_h, stride_ks_n,
    stride_qt_b, stride_qt_h, stride_qt_n, stride_kt_b, stride_kt_h, stride_kt_n,
    G: tl.constexpr, TEACHER_TO_STUDENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``dq_s[rows] = c_s * g[rows] * sum_j (ds / g)[rows, j] k_s[j]``, contiguous ``[B, H_s, N, d_s]``."""
    pid_bh, offs_m, qs_base, ks_base, qt_base, kt_base, lse_heads_base = _head_pair(
        qs_ptr, ks_ptr, qt_ptr, kt_ptr, lse_heads_ptr, N, H_S, stride_qs_b, stride_qs_h, stride_ks_b, stride_ks_h,
        stride_qt_b, stride_qt_h, stride_kt_b, stride_kt_h, G, BLOCK_M)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    q_s = _load_rows(qs_base, stride_qs_n, offs_m, N, offs_ds, D_S)
    q_t0 = _load_rows(qt_base, stride_qt_n, offs_m, N, offs_dt, D_T)
    stats_base = pid_bh.to(tl.int64) * N
    lse_s, lse_t, kl, grad = _load_row_stats(kl_ptr, lse_s_ptr, lse_t_ptr, grad_ptr, stats_base, offs_m, N)

    dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    for start_n in range(0, loop_bound(N), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_s = _load_rows(ks_base, stride_ks_n, offs_n, N, offs_ds, D_S)
        ds = _ds_tile(q_s, k_s, q_t0, qt_base, kt_base, lse_heads_base, stride_qt_h, stride_qt_n, stride_kt_h,
                      stride_kt_n, offs_m, offs_n, offs_dt, N, D_T, c_s, c_t, lse_s, lse_t, kl, G,
                      TEACHER_TO_STUDENT, INPUT_PRECISION)
        dq += tl.dot(ds.to(k_s.dtype), k_s, input_precision=INPUT_PRECISION)
    dq = dq * (grad * c_s)[:, None]
    out = dq_ptr + (stats_base + offs_m)[:, None] * D_S + offs_ds[None, :]
    tl.store(out, dq.to(dq_ptr.dtype.element_ty), mask=(offs_m < N)[:, None] & (offs_ds < D_S)[None, :])


@triton.jit
def token_relation_bwd_dk_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, lse_heads_ptr, kl_ptr, lse_s_ptr, lse_t_ptr, grad_ptr, dk_ptr,
    N, H_S, D_S, D_T, c_s, c_t, stride_qs_b, stride_qs_h, stride_qs_n, stride_ks_b, stride_ks_h, stride_ks_n,
    stride_qt_b, stride_qt_h, stride_qt_n, stride_kt_b, stride_kt_h, stride_kt_n,
    G: tl.constexpr, TEACHER_TO_STUDENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``dk_s[keys] = c_s * sum_i ds[i, keys] q_s[i]``, contiguous; ``g_max`` from a first pass over ``g``."""
    pid_bh, offs_n, qs_base, ks_base, qt_base, kt_base, lse_heads_base = _head_pair(
        qs_ptr, ks_ptr, qt_ptr, kt_ptr, lse_heads_ptr, N, H_S, stride_qs_b, stride_qs_h, stride_ks_b, stride_ks_h,
        stride_qt_b, stride_qt_h, stride_kt_b, stride_kt_h, G, BLOCK_N)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    k_s = _load_rows(ks_base, stride_ks_n, offs_n, N, offs_ds, D_S)
    stats_base = pid_bh.to(tl.int64) * N
    g_max = tl.zeros([BLOCK_M], tl.float32)
    for start_m in range(0, loop_bound(N), BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        g_max = tl.maximum(g_max, tl.abs(tl.load(grad_ptr + stats_base + offs_m, mask=offs_m < N, other=0.0)))
    g_max = tl.max(g_max, 0)
    g_inv = tl.where(g_max > 0.0, 1.0 / g_max, 1.0)

    dk = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    for start_m in range(0, loop_bound(N), BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_s = _load_rows(qs_base, stride_qs_n, offs_m, N, offs_ds, D_S)
        q_t0 = _load_rows(qt_base, stride_qt_n, offs_m, N, offs_dt, D_T)
        lse_s, lse_t, kl, grad = _load_row_stats(kl_ptr, lse_s_ptr, lse_t_ptr, grad_ptr, stats_base, offs_m, N)
        ds = _ds_tile(q_s, k_s, q_t0, qt_base, kt_base, lse_heads_base, stride_qt_h, stride_qt_n, stride_kt_h,
                      stride_kt_n, offs_m, offs_n, offs_dt, N, D_T, c_s, c_t, lse_s, lse_t, kl, G,
                      TEACHER_TO_STUDENT, INPUT_PRECISION)
        ds = ds * (grad * g_inv)[:, None]
        dk += tl.dot(tl.trans(ds.to(q_s.dtype)), q_s, input_precision=INPUT_PRECISION)
    dk = dk * (c_s * g_max)
    out = dk_ptr + (stats_base + offs_n)[:, None] * D_S + offs_ds[None, :]
    tl.store(out, dk.to(dk_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_ds < D_S)[None, :])


# ----------------------------------------------------------------------------- launch helpers


def default_blocks(d: int, G: int, dtype: torch.dtype = torch.bfloat16, *, backward: bool = False) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` for head dim ``d``; with :func:`default_num_warps`, spill-free on sm_80 and sm_90."""
    if dtype == torch.float32:
        return (64, 32) if d <= 64 and G == 1 else (32, 32)
    if backward:
        return (64, 32)
    return (64, 64) if d <= 64 and G == 1 else (64, 32)


def default_num_warps(G: int, dtype: torch.dtype = torch.bfloat16, *, backward: bool = False) -> int:
    """Warps per program: 4, and 8 for the backward kernels with fp32 operands or ``G > 1``."""
    return 8 if backward and (G > 1 or dtype == torch.float32) else 4


def dot_input_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``"tf32"`` for fp32 CUDA operands when PyTorch allows TF32 fp32 matmuls (``matmul.fp32_precision``, also set
    by ``set_float32_matmul_precision`` / ``allow_tf32``), else ``"ieee"`` (16-bit: no effect; interpreter)."""
    if dtype != torch.float32 or device.type != "cuda":
        return "ieee"
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch without the fp32_precision API
        return "tf32" if matmul.allow_tf32 else "ieee"
    return "tf32" if precision == "tf32" else "ieee"


def row_block_grid(num_heads: int, N: int, block: int) -> tuple[int]:
    """``(num_heads * cdiv(N, block),)`` on axis 0; raises ``ValueError`` beyond ``2**31 - 1`` programs."""
    programs = num_heads * triton.cdiv(N, block)
    if programs > MAX_GRID_X:
        raise ValueError(f"{num_heads} heads x {triton.cdiv(N, block)} row blocks exceed the {MAX_GRID_X} programs "
                         "of a grid")
    return (programs,)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _launch_args(q_s, k_s, q_t, k_t, block_m, block_n, backward):
    q_s, k_s, q_t, k_t = (_rows_contiguous(x) for x in (q_s, k_s, q_t, k_t))
    B, H_s, N, d_s = q_s.shape
    H_t, d_t = q_t.shape[1], q_t.shape[3]
    G = H_t // H_s
    default_m, default_n = default_blocks(max(d_s, d_t), G, q_s.dtype, backward=backward)
    meta = dict(
        G=G,
        BLOCK_M=block_m or default_m,
        BLOCK_N=block_n or default_n,
        BLOCK_DS=_block_d(d_s),
        BLOCK_DT=_block_d(d_t),
        INPUT_PRECISION=dot_input_precision(q_s.dtype, q_s.device),
        num_warps=default_num_warps(G, q_s.dtype, backward=backward),
    )
    strides = (*_strides(q_s), *_strides(k_s), *_strides(q_t), *_strides(k_t))
    return (q_s, k_s, q_t, k_t), (B, H_s, H_t, N, d_s, d_t), strides, meta


def launch_token_relation_fwd(
    q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, c_s: float, c_t: float,
    teacher_to_student: bool, *, block_m: int | None = None, block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``(kl, lse_s, lse_t, lse_heads)``, ``lse_heads`` ``[B, H_t, N]`` if ``H_t > H_s`` else ``[0]``; shapes
    must be validated already."""
    (q_s, k_s, q_t, k_t), (B, H_s, H_t, N, d_s, d_t), strides, meta = _launch_args(
        q_s, k_s, q_t, k_t, block_m, block_n, backward=False)
    kl, lse_s, lse_t = (torch.empty((B, H_s, N), device=q_s.device, dtype=torch.float32) for _ in range(3))
    lse_heads = torch.empty((B, H_t, N) if meta["G"] > 1 else (0,), device=q_s.device, dtype=torch.float32)
    if meta["G"] > 1:
        row_lse_kernel[row_block_grid(B * H_t, N, meta["BLOCK_M"])](
            q_t, k_t, lse_heads, N, H_t, d_t, c_t, *strides[6:], BLOCK_M=meta["BLOCK_M"], BLOCK_N=meta["BLOCK_N"],
            BLOCK_D=meta["BLOCK_DT"], INPUT_PRECISION=meta["INPUT_PRECISION"], num_warps=meta["num_warps"])
    token_relation_fwd_kernel[row_block_grid(B * H_s, N, meta["BLOCK_M"])](
        q_s, k_s, q_t, k_t, lse_heads, kl, lse_s, lse_t, N, H_s, d_s, d_t, c_s, c_t, *strides,
        TEACHER_TO_STUDENT=teacher_to_student, **meta)
    return kl, lse_s, lse_t, lse_heads


def launch_token_relation_bwd(
    grad_kl: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
    kl: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor, lse_heads: torch.Tensor, c_s: float, c_t: float,
    teacher_to_student: bool, *, block_m: int | None = None, block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the two backward passes; returns ``(dq_s, dk_s)`` in the student's dtype."""
    (q_s, k_s, q_t, k_t), (B, H_s, H_t, N, d_s, d_t), strides, meta = _launch_args(
        q_s, k_s, q_t, k_t, block_m, block_n, backward=True)
    grad_kl = grad_kl.to(torch.float32).contiguous()
    stats = tuple(x.contiguous() for x in (lse_heads, kl, lse_s, lse_t))
    dq, dk = (torch.empty((B, H_s, N, d_s), device=q_s.device, dtype=x.dtype) for x in (q_s, k_s))
    for kernel, out, block in ((token_relation_bwd_dq_kernel, dq, "BLOCK_M"),
                               (token_relation_bwd_dk_kernel, dk, "BLOCK_N")):
        kernel[row_block_grid(B * H_s, N, meta[block])](
            q_s, k_s, q_t, k_t, *stats, grad_kl, out, N, H_s, d_s, d_t, c_s, c_t, *strides,
            TEACHER_TO_STUDENT=teacher_to_student, **meta)
    return dq, dk


# ----------------------------------------------------------------------------- compile check


def _register_compile_configs() -> None:
    """ViT-S/B/L all have d = 64 (heads, N are runtime): bf16 for every shape, fp16 plain only (CI compile time),
    fp32 (TF32 dots) plain and G = 2, each direction, the launchers' tiles and warps."""
    strides = [f"stride_{t}_{a}" for t in ("qs", "ks", "qt", "kt") for a in ("b", "h", "n")]
    shapes = [  # label, student d, teacher d, G
        ("ViT-S/B/L d=64", 64, 64, 1),
        ("ViT-B teacher -> ViT-S student, head_map=mean", 64, 64, 2),
        ("d=64 student, d=128 teacher", 64, 128, 1),
    ]
    variants = (  # operand dtype, its torch dtype, shapes, dot input precision
        ("bf16", torch.bfloat16, shapes, "ieee"),
        ("fp16", torch.float16, shapes[:1], "ieee"),
        ("fp32", torch.float32, shapes[:2], "tf32"),
    )
    for dtype, torch_dtype, dtype_shapes, precision in variants:
        dtype_label = f"{dtype} ({precision} dots)" if dtype == "fp32" else dtype
        inputs = {**dict.fromkeys(("qs_ptr", "ks_ptr", "qt_ptr", "kt_ptr"), f"*{dtype}"),
                  **dict.fromkeys(("lse_heads_ptr", "kl_ptr", "lse_s_ptr", "lse_t_ptr"), "*fp32")}
        scalars = {**dict.fromkeys(["N", "H_S", "D_S", "D_T"], "i32"), "c_s": "fp32", "c_t": "fp32",
                   **dict.fromkeys(strides, "i32")}  # in the kernels' argument order
        for label, d_s, d_t, G in dtype_shapes:
            meta = {backward: dict(zip(("BLOCK_M", "BLOCK_N"), default_blocks(max(d_s, d_t), G, torch_dtype,
                                                                              backward=backward)),
                                   G=G, BLOCK_DS=_block_d(d_s), BLOCK_DT=_block_d(d_t), INPUT_PRECISION=precision)
                    for backward in (False, True)}
            warps = {backward: default_num_warps(G, torch_dtype, backward=backward) for backward in (False, True)}
            for t2s in (True, False):
                label_ = f"{label}, {dtype_label}, {'teacher_to_student' if t2s else 'student_to_teacher'}"
                register_compile_config("token_relation_fwd", token_relation_fwd_kernel, {**inputs, **scalars},
                                        {"TEACHER_TO_STUDENT": t2s, **meta[False]}, num_warps=warps[False],
                                        label=label_)
                for name, kernel, out in (("token_relation_bwd_dq", token_relation_bwd_dq_kernel, "dq_ptr"),
                                          ("token_relation_bwd_dk", token_relation_bwd_dk_kernel, "dk_ptr")):
                    signature = {**inputs, "grad_ptr": "*fp32", out: f"*{dtype}", **scalars}
                    register_compile_config(name, kernel, signature, {"TEACHER_TO_STUDENT": t2s, **meta[True]},
                                            num_warps=warps[True], label=label_)
            if G > 1:
                signature = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "lse_ptr": "*fp32",
                             **dict.fromkeys(["N", "H", "D"], "i32"), "c": "fp32",
                             **dict.fromkeys([f"stride_{t}{a}" for t in "qk" for a in "bhn"], "i32")}
                register_compile_config(
                    "token_relation_row_lse", row_lse_kernel, signature,
                    {"BLOCK_M": meta[False]["BLOCK_M"], "BLOCK_N": meta[False]["BLOCK_N"], "BLOCK_D": _block_d(d_t),
                     "INPUT_PRECISION": precision}, num_warps=warps[False], label=f"{label}, {dtype_label}")


_register_compile_configs()
