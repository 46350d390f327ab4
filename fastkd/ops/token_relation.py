"""``token_relation``: per-row KL divergence between teacher and student attention maps (token
relations), without materialising the ``N x N`` maps.

Math, for ``q_s, k_s [B, H_s, N, d_s]`` and ``q_t, k_t [B, H_t, N, d_t]`` (all statistics in fp32;
float64 inputs are computed in float64)::

    c_s = scale_s / temperature            (scale_s defaults to d_s ** -0.5; same for the teacher)
    a_s = log_softmax(c_s * q_s @ k_s^T, -1)                                  # [B, H_s, N, N]
    head_map=None  (H_t == H_s):  a_t = log_softmax(c_t * q_t @ k_t^T, -1)
    head_map="mean" (H_t == G * H_s): student head h is matched with teacher heads h*G .. h*G+G-1 and
        a_t[:, h] = log(mean_{g < G} softmax(c_t * q_t[:, h*G+g] @ k_t[:, h*G+g]^T, -1))
        (the mean of the G teacher *probability* maps, not of their logits)
    direction="teacher_to_student": kl = sum_j exp(a_t) * (a_t - a_s)     # KL(P_t || P_s) per row
    direction="student_to_teacher": kl = sum_j exp(a_s) * (a_s - a_t)     # KL(P_s || P_t) per row

Result: ``kl [B, H_s, N]`` (fp32, float64 for float64 inputs). There is no ``temperature ** 2`` factor.
Gradients flow to ``q_s`` and ``k_s`` only; the teacher inputs never receive gradients.

Registered as ``fastkd::token_relation`` (+ ``fastkd::token_relation_backward``) with
``torch.library.custom_op``; implementations are chosen by the rule of ``fastkd.ops._dispatch`` (the
same for every op). CUDA: the Triton kernels of ``fastkd.kernels.token_relation`` (online
log-sum-exp over key blocks, extra memory O(B·H·N)). CPU: the C++ kernels
``fastkd::token_relation_cpu`` / ``token_relation_backward_cpu`` of ``fastkd._C`` (csrc/token_relation.cpp:
one parallel region over tiles of (heads x query rows) whose teacher logits hold at most
``CPU_TILE_ELEMENTS`` values, two ``bmm`` per tile and one fused vectorised pass per row, so extra
memory is O(threads · tile) and small ``N`` batches many heads per tile); float64 on CUDA, other
devices or a missing extension: a PyTorch path over tiles of (heads x query rows) within the same element budget (extra memory
O(tile) <= O(B·H·block·N)). Both backwards recompute each tile from the saved per-row statistics
(``lse_s``, ``lse_t``, per-teacher-head lse, ``kl``) and accumulate ``dk_s`` per head (chunk).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastkd.ops._dispatch import OpImplementations
from fastkd.ops.reference_mode import cpu_reference, reference_ops_enabled, small_on_cpu

__all__ = ["token_relation", "token_relation_reference", "DIRECTIONS", "HEAD_MAPS", "CPU_TILE_ELEMENTS"]

DIRECTIONS = ("teacher_to_student", "student_to_teacher")
HEAD_MAPS = (None, "mean")
CPU_TILE_ELEMENTS = 1 << 17
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _stats_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------- PyTorch path (any device)


def _cpu_tiles(B: int, H_s: int, G: int, N: int):
    """Yield ``(heads, rows)`` slices over the flattened ``B * H_s`` heads and the query rows, so
    that one tile's teacher logits (``heads * G * rows * N`` elements) stay within the budget."""
    rows_per_tile = max(1, min(N, CPU_TILE_ELEMENTS // (N * G)))
    heads_per_tile = max(1, CPU_TILE_ELEMENTS // (rows_per_tile * N * G))
    for h0 in range(0, B * H_s, heads_per_tile):
        heads = slice(h0, min(h0 + heads_per_tile, B * H_s))
        yield heads, [slice(r0, min(r0 + rows_per_tile, N)) for r0 in range(0, N, rows_per_tile)]


def _teacher_log_probs(
    q_t: Tensor, k_t: Tensor, c_t: float, G: int, lse_heads: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Teacher tile ``a_t`` before its final normalisation: logits when ``G == 1``, else
    ``log(mean_g P_g)`` from the ``[h*G, rows, N]`` teacher logits (per-head lse computed when
    ``lse_heads`` is None, returned for saving)."""
    t = torch.bmm(q_t, k_t.transpose(1, 2)).mul_(c_t)
    if G == 1:
        return t, None
    if lse_heads is None:
        lse_heads = torch.logsumexp(t, -1)
    t.sub_(lse_heads.unsqueeze(-1))
    mixed = torch.logsumexp(t.view(-1, G, *t.shape[1:]), 1).sub_(math.log(G))
    return mixed, lse_heads


def _torch_forward(q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student):
    B, H_s, N, _ = q_s.shape
    H_t = q_t.shape[1]
    G = H_t // H_s
    dtype = _stats_dtype(q_s, k_s, q_t, k_t)
    qs, ks = q_s.reshape(B * H_s, N, -1), k_s.reshape(B * H_s, N, -1)
    qt, kt = q_t.reshape(B * H_t, N, -1), k_t.reshape(B * H_t, N, -1)
    kl, lse_s, lse_t = (q_s.new_empty((B * H_s, N), dtype=dtype) for _ in range(3))
    lse_heads = q_s.new_empty((B * H_t, N) if G > 1 else (0,), dtype=dtype)
    for heads, row_blocks in _cpu_tiles(B, H_s, G, N):
        theads = slice(heads.start * G, heads.stop * G)
        ks_tile, kt_tile = ks[heads].to(dtype), kt[theads].to(dtype)
        for rows in row_blocks:
            s = torch.bmm(qs[heads, rows].to(dtype), ks_tile.transpose(1, 2)).mul_(c_s)
            t, tile_lse_heads = _teacher_log_probs(qt[theads, rows].to(dtype), kt_tile, c_t, G, None)
            if G > 1:
                lse_heads[theads, rows] = tile_lse_heads
            tile_lse_s, tile_lse_t = torch.logsumexp(s, -1), torch.logsumexp(t, -1)
            lse_s[heads, rows], lse_t[heads, rows] = tile_lse_s, tile_lse_t
            a_s, a_t = s.sub_(tile_lse_s.unsqueeze(-1)), t.sub_(tile_lse_t.unsqueeze(-1))
            diff = a_t - a_s
            weights = a_t.exp_() if teacher_to_student else a_s.exp_().neg_()
            kl[heads, rows] = torch.linalg.vecdot(weights, diff)
    shape = (B, H_s, N)
    lse_heads = lse_heads.view(B, H_t, N) if G > 1 else lse_heads
    return kl.view(shape), lse_s.view(shape), lse_t.view(shape), lse_heads


def _torch_backward(grad_kl, q_s, k_s, q_t, k_t, kl, lse_s, lse_t, lse_heads, c_s, c_t, teacher_to_student):
    B, H_s, N, d_s = q_s.shape
    H_t = q_t.shape[1]
    G = H_t // H_s
    dtype = _stats_dtype(q_s, k_s, q_t, k_t)
    qs, ks = q_s.reshape(B * H_s, N, d_s), k_s.reshape(B * H_s, N, d_s)
    qt, kt = q_t.reshape(B * H_t, N, -1), k_t.reshape(B * H_t, N, -1)
    kl, lse_s, lse_t = (x.reshape(B * H_s, N) for x in (kl, lse_s, lse_t))
    lse_heads = lse_heads.reshape(B * H_t, N) if G > 1 else None
    # grad * c_s folds the logit scale of both dq and dk into ds.
    row_scale = grad_kl.reshape(B * H_s, N).to(dtype) * c_s
    dq = q_s.new_empty((B * H_s, N, d_s))
    dk = k_s.new_empty((B * H_s, N, d_s))
    for heads, row_blocks in _cpu_tiles(B, H_s, G, N):
        theads = slice(heads.start * G, heads.stop * G)
        ks_tile, kt_tile = ks[heads].to(dtype), kt[theads].to(dtype)
        dk_tile = ks_tile.new_zeros(ks_tile.shape)
        for rows in row_blocks:
            q_tile = qs[heads, rows].to(dtype)
            a_s = torch.bmm(q_tile, ks_tile.transpose(1, 2)).mul_(c_s).sub_(lse_s[heads, rows].unsqueeze(-1))
            t, _ = _teacher_log_probs(
                qt[theads, rows].to(dtype), kt_tile, c_t, G, None if lse_heads is None else lse_heads[theads, rows]
            )
            a_t = t.sub_(lse_t[heads, rows].unsqueeze(-1))
            if teacher_to_student:
                ds = a_s.exp_().sub_(a_t.exp_())
            else:
                ds = (a_s - a_t).sub_(kl[heads, rows].unsqueeze(-1)).mul_(a_s.exp_())
            ds.mul_(row_scale[heads, rows].unsqueeze(-1))
            dq[heads, rows] = torch.bmm(ds, ks_tile)
            dk_tile.baddbmm_(ds.transpose(1, 2), q_tile)
        dk[heads] = dk_tile
    return dq.view(B, H_s, N, d_s), dk.view(B, H_s, N, d_s)


# ----------------------------------------------------------------------------- forward op


def _token_relation_native(q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student):
    return torch.ops.fastkd.token_relation_cpu(q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student, CPU_TILE_ELEMENTS)


def _token_relation_triton(q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student):
    from fastkd.kernels.token_relation import launch_token_relation_fwd

    return launch_token_relation_fwd(q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student)


_FORWARD = OpImplementations(
    "token_relation", torch=_torch_forward, native="token_relation_cpu",
    call_native=_token_relation_native, triton=_token_relation_triton
)


@torch.library.custom_op("fastkd::token_relation", mutates_args=())
def _token_relation_op(
    q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, c_s: float, c_t: float, teacher_to_student: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(kl, lse_s, lse_t, lse_heads)``: ``[B, H_s, N]`` each, ``lse_t`` the lse of the
    (head-mapped) teacher tile; ``lse_heads [B, H_t, N]`` per teacher head when ``H_t > H_s``, else ``[0]``
    (custom ops cannot return None)."""
    return _FORWARD(q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student)


@_token_relation_op.register_fake
def _(q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student):
    B, H_s, N, _ = q_s.shape
    H_t = q_t.shape[1]
    dtype = _stats_dtype(q_s, k_s, q_t, k_t)
    stats = tuple(q_s.new_empty((B, H_s, N), dtype=dtype) for _ in range(3))
    return (*stats, q_s.new_empty((B, H_t, N) if H_t > H_s else (0,), dtype=dtype))


# ----------------------------------------------------------------------------- backward op


def _token_relation_backward_native(*args):
    return torch.ops.fastkd.token_relation_backward_cpu(*args, CPU_TILE_ELEMENTS)


def _token_relation_backward_triton(*args):
    from fastkd.kernels.token_relation import launch_token_relation_bwd

    return launch_token_relation_bwd(*args)


_BACKWARD = OpImplementations(
    "token_relation_backward", torch=_torch_backward, native="token_relation_backward_cpu",
    call_native=_token_relation_backward_native, triton=_token_relation_backward_triton,
)


@torch.library.custom_op("fastkd::token_relation_backward", mutates_args=())
def _token_relation_backward_op(
    grad_kl: Tensor, q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, kl: Tensor, lse_s: Tensor,
    lse_t: Tensor, lse_heads: Tensor, c_s: float, c_t: float, teacher_to_student: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Returns ``(dq_s, dk_s)`` in the dtypes of ``q_s`` and ``k_s``."""
    return _BACKWARD(grad_kl, q_s, k_s, q_t, k_t, kl, lse_s, lse_t, lse_heads, c_s, c_t, teacher_to_student)


@_token_relation_backward_op.register_fake
def _(grad_kl, q_s, k_s, q_t, k_t, kl, lse_s, lse_t, lse_heads, c_s, c_t, teacher_to_student):
    return torch.empty_like(q_s, memory_format=torch.contiguous_format), torch.empty_like(
        k_s, memory_format=torch.contiguous_format
    )


# ----------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output) -> None:
    q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student = inputs
    kl, lse_s, lse_t, lse_heads = output
    ctx.save_for_backward(q_s, k_s, q_t, k_t, kl, lse_s, lse_t, lse_heads)
    ctx.mark_non_differentiable(lse_s, lse_t, lse_heads)
    ctx.c_s, ctx.c_t, ctx.teacher_to_student = c_s, c_t, teacher_to_student


def _backward(ctx, grad_kl, _grad_lse_s, _grad_lse_t, _grad_lse_heads):
    q_s, k_s, q_t, k_t, kl, lse_s, lse_t, lse_heads = ctx.saved_tensors
    dq, dk = _token_relation_backward_op(
        grad_kl, q_s, k_s, q_t, k_t, kl, lse_s, lse_t, lse_heads, ctx.c_s, ctx.c_t, ctx.teacher_to_student
    )
    return dq, dk, None, None, None, None, None


_token_relation_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def check_options(temperature, direction, head_map) -> None:
    """Raise ValueError naming the first invalid option of :func:`token_relation`."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if head_map not in HEAD_MAPS:
        raise ValueError(f"head_map must be None or 'mean', got {head_map!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def _check_inputs(q_s, k_s, q_t, k_t, temperature, direction, head_map) -> int:
    """Validate; returns the number ``G`` of teacher heads per student head."""
    named = {"q_s": q_s, "k_s": k_s, "q_t": q_t, "k_t": k_t}
    for name, x in named.items():
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, d], got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if q_s.shape != k_s.shape or q_s.dtype != k_s.dtype:
        raise ValueError(f"q_s and k_s must match, got {tuple(q_s.shape)} {q_s.dtype} and {tuple(k_s.shape)} {k_s.dtype}")
    if q_t.shape != k_t.shape or q_t.dtype != k_t.dtype:
        raise ValueError(f"q_t and k_t must match, got {tuple(q_t.shape)} {q_t.dtype} and {tuple(k_t.shape)} {k_t.dtype}")
    if q_s.shape[0] != q_t.shape[0] or q_s.shape[2] != q_t.shape[2]:
        raise ValueError(
            f"student and teacher must have the same batch and tokens [B, *, N, *], got q_s {tuple(q_s.shape)} "
            f"and q_t {tuple(q_t.shape)}"
        )
    if min(q_s.shape) == 0 or min(q_t.shape) == 0:
        raise ValueError(f"inputs must be non-empty, got q_s {tuple(q_s.shape)} and q_t {tuple(q_t.shape)}")
    if len({x.device for x in named.values()}) != 1:
        raise ValueError(f"all inputs must be on one device, got {[str(x.device) for x in named.values()]}")
    check_options(temperature, direction, head_map)
    H_s, H_t = q_s.shape[1], q_t.shape[1]
    if head_map is None and H_t != H_s:
        raise ValueError(f"teacher and student head counts differ ({H_t} vs {H_s}): pass head_map='mean' or matching heads")
    if head_map == "mean" and H_t % H_s != 0:
        raise ValueError(f"head_map='mean' needs teacher heads to be a multiple of student heads, got {H_t} and {H_s}")
    return H_t // H_s


def _logit_scale(scale: float | None, head_dim: int, temperature: float, name: str) -> float:
    if scale is None:
        scale = head_dim**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"{name} must be a positive number or None, got {scale!r}")
    return float(scale) / float(temperature)


def token_relation(
    q_s: Tensor,
    k_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    *,
    scale_s: float | None = None,
    scale_t: float | None = None,
    temperature: float = 1.0,
    direction: str = "teacher_to_student",
    head_map: str | None = None,
) -> Tensor:
    """Per-row KL between teacher and student token relations, ``[B, H_s, N]`` (see module doc).
    Inside ``reference_ops()``, and for a small CPU input (see :mod:`fastkd.ops.reference_mode`), it is
    the materialising :func:`token_relation_reference`."""
    if reference_ops_enabled():
        return token_relation_reference(
            q_s, k_s, q_t, k_t, scale_s=scale_s, scale_t=scale_t, temperature=temperature,
            direction=direction, head_map=head_map,
        )
    _check_inputs(q_s, k_s, q_t, k_t, temperature, direction, head_map)
    B, H, N, _ = q_s.shape
    if small_on_cpu("token_relation", q_s.device, B * H * N * N):
        return cpu_reference(token_relation_reference, q_s, k_s, q_t.detach(), k_t.detach(), scale_s=scale_s,
                             scale_t=scale_t, temperature=temperature, direction=direction, head_map=head_map)
    c_s = _logit_scale(scale_s, q_s.shape[-1], temperature, "scale_s")
    c_t = _logit_scale(scale_t, q_t.shape[-1], temperature, "scale_t")
    kl, _, _, _ = _token_relation_op(
        q_s, k_s, q_t.detach(), k_t.detach(), c_s, c_t, direction == "teacher_to_student"
    )
    return kl


def token_relation_reference(
    q_s: Tensor,
    k_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    *,
    scale_s: float | None = None,
    scale_t: float | None = None,
    temperature: float = 1.0,
    direction: str = "teacher_to_student",
    head_map: str | None = None,
) -> Tensor:
    """Materialised oracle: full ``[B, H, N, N]`` maps, ``log_softmax`` and ``F.kl_div``."""
    G = _check_inputs(q_s, k_s, q_t, k_t, temperature, direction, head_map)
    c_s = _logit_scale(scale_s, q_s.shape[-1], temperature, "scale_s")
    c_t = _logit_scale(scale_t, q_t.shape[-1], temperature, "scale_t")
    dtype = _stats_dtype(q_s, k_s, q_t, k_t)
    a_s = F.log_softmax((q_s.to(dtype) @ k_s.to(dtype).transpose(-1, -2)) * c_s, dim=-1)
    with torch.no_grad():
        a_t = F.log_softmax((q_t.to(dtype) @ k_t.to(dtype).transpose(-1, -2)) * c_t, dim=-1)
        if G > 1:
            B, H_t, N, _ = a_t.shape
            a_t = torch.logsumexp(a_t.view(B, H_t // G, G, N, N), dim=2) - math.log(G)
    if direction == "teacher_to_student":
        return F.kl_div(a_s, a_t, log_target=True, reduction="none").sum(-1)
    return F.kl_div(a_t, a_s, log_target=True, reduction="none").sum(-1)
