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

Kernels ``fastkd::token_relation`` (+ ``_backward``): Triton (online log-sum-exp, extra memory O(B·H·N)) and C++
(``csrc/token_relation.cpp``: tiles of at most ``CPU_TILE_ELEMENTS`` teacher logits, extra memory O(threads ·
tile)); both backwards recompute each tile from the saved per-row lse and ``kl``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastkd.checks import check_choice, check_number
from fastkd.ops._dispatch import Route, accumulation_dtype, check_float_tensors, register

__all__ = ["token_relation", "token_relation_reference", "DIRECTIONS", "HEAD_MAPS", "CPU_TILE_ELEMENTS"]

DIRECTIONS = ("teacher_to_student", "student_to_teacher")
HEAD_MAPS = (None, "mean")
CPU_TILE_ELEMENTS = 1 << 17


# ----------------------------------------------------------------------------- kernels


def _token_relation_triton(q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student, tile_elements=None):
    from fastkd.kernels.token_relation import launch_token_relation_fwd

    return launch_token_relation_fwd(q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student)


def _fake(q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student, tile_elements=None):
    """``(kl, lse_s, lse_t [B, H_s, N], lse_heads [B, H_t, N] when H_t > H_s else [0])``."""
    B, H_s, N, _ = q_s.shape
    H_t = q_t.shape[1]
    dtype = accumulation_dtype(q_s, k_s, q_t, k_t)
    stats = tuple(q_s.new_empty((B, H_s, N), dtype=dtype) for _ in range(3))
    return (*stats, q_s.new_empty((B, H_t, N) if H_t > H_s else (0,), dtype=dtype))


register("token_relation", _fake, cuda=_token_relation_triton)


def _token_relation_backward_triton(*args):
    from fastkd.kernels.token_relation import launch_token_relation_bwd

    return launch_token_relation_bwd(*args[:12])  # without the CPU tile budget


def _fake_backward(grad_kl, q_s, k_s, q_t, k_t, kl, lse_s, lse_t, lse_heads, c_s, c_t, teacher_to_student,
                   tile_elements=None):
    """``(dq_s, dk_s)`` in the dtypes of ``q_s`` and ``k_s``."""
    return (torch.empty_like(q_s, memory_format=torch.contiguous_format),
            torch.empty_like(k_s, memory_format=torch.contiguous_format))


register("token_relation_backward", _fake_backward, cuda=_token_relation_backward_triton)
_ROUTE = Route("token_relation")


# ----------------------------------------------------------------------------- public API


def check_options(temperature, direction, head_map) -> None:
    """Raise ValueError naming the first invalid option of :func:`token_relation`."""
    check_choice("direction", direction, DIRECTIONS)
    check_choice("head_map", head_map, HEAD_MAPS)
    check_number("temperature", temperature, low=0, low_open=True)


def _arguments(q_s, k_s, q_t, k_t, scale_s, scale_t, temperature, direction, head_map) -> tuple:
    """Validate; the kernel's ``(q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student, G)``, teacher detached."""
    check_float_tensors("[B, H, N, d]", 4, q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t)
    check_options(temperature, direction, head_map)
    for name, scale in (("scale_s", scale_s), ("scale_t", scale_t)):
        if scale is not None:
            check_number(name, scale, low=0, low_open=True)
    H_s, H_t = q_s.shape[1], q_t.shape[1]
    problems = (
        (q_s.shape != k_s.shape or q_s.dtype != k_s.dtype,
         f"q_s and k_s must match, got {tuple(q_s.shape)} {q_s.dtype} and {tuple(k_s.shape)} {k_s.dtype}"),
        (q_t.shape != k_t.shape or q_t.dtype != k_t.dtype,
         f"q_t and k_t must match, got {tuple(q_t.shape)} {q_t.dtype} and {tuple(k_t.shape)} {k_t.dtype}"),
        (q_s.shape[0] != q_t.shape[0] or q_s.shape[2] != q_t.shape[2],
         f"student and teacher must have the same batch and tokens [B, *, N, *], got q_s {tuple(q_s.shape)} "
         f"and q_t {tuple(q_t.shape)}"),
        (min(q_s.shape) == 0 or min(q_t.shape) == 0,
         f"inputs must be non-empty, got q_s {tuple(q_s.shape)} and q_t {tuple(q_t.shape)}"),
        (head_map is None and H_t != H_s,
         f"teacher and student head counts differ ({H_t} vs {H_s}): pass head_map='mean' or matching heads"),
        (head_map == "mean" and H_t % H_s != 0,
         f"head_map='mean' needs teacher heads to be a multiple of student heads, got {H_t} and {H_s}"),
    )
    for failed, message in problems:
        if failed:
            raise ValueError(message)
    c_s, c_t = (float(d**-0.5 if c is None else c) / float(temperature)
                for c, d in ((scale_s, q_s.shape[-1]), (scale_t, q_t.shape[-1])))
    return q_s, k_s, q_t.detach(), k_t.detach(), c_s, c_t, direction == "teacher_to_student", H_t // H_s


def token_relation(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, *, scale_s: float | None = None,
                   scale_t: float | None = None, temperature: float = 1.0,
                   direction: str = "teacher_to_student", head_map: str | None = None) -> Tensor:
    """Per-row KL between teacher and student token relations, ``[B, H_s, N]`` (module docstring)."""
    args = _arguments(q_s, k_s, q_t, k_t, scale_s, scale_t, temperature, direction, head_map)
    return _ROUTE.run(_reference, args, q_s.device, (q_s.dtype, q_t.dtype), _kernel)


def _kernel(q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student, G) -> Tensor:
    return torch.ops.fastkd.token_relation.default(q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student,
                                                   CPU_TILE_ELEMENTS)[0]


def token_relation_reference(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, *, scale_s: float | None = None,
                             scale_t: float | None = None, temperature: float = 1.0,
                             direction: str = "teacher_to_student", head_map: str | None = None) -> Tensor:
    """Materialised ``[B, H, N, N]`` maps, ``log_softmax`` and ``F.kl_div``: oracle, baseline and fallback."""
    return _reference(*_arguments(q_s, k_s, q_t, k_t, scale_s, scale_t, temperature, direction, head_map))


def _reference(q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student, G) -> Tensor:
    dtype = accumulation_dtype(q_s, k_s, q_t, k_t)
    a_s = F.log_softmax((q_s.to(dtype) @ k_s.to(dtype).transpose(-1, -2)) * c_s, dim=-1)
    with torch.no_grad():
        a_t = F.log_softmax((q_t.to(dtype) @ k_t.to(dtype).transpose(-1, -2)) * c_t, dim=-1)
        if G > 1:
            B, H_t, N, _ = a_t.shape
            a_t = torch.logsumexp(a_t.view(B, H_t // G, G, N, N), dim=2) - math.log(G)
    if teacher_to_student:
        return F.kl_div(a_s, a_t, log_target=True, reduction="none").sum(-1)
    return F.kl_div(a_t, a_s, log_target=True, reduction="none").sum(-1)
