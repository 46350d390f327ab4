"""``feature_align``: per-row loss between student features and normalised teacher targets.

Math (``student``, ``teacher`` of shape ``[..., D]``, optional row ``mask`` ``[...]`` (bool or float
weights, no gradient), ``eps``; the teacher never receives a gradient)::

    y = F.layer_norm(t, (D,), eps=eps)           # target_norm="layernorm" (no affine)
    y = F.normalize(t, dim=-1, eps=eps)          # target_norm="l2";   y = t for "none"
    x = F.normalize(s, dim=-1, eps=eps) if student_norm else s
    l = F.smooth_l1_loss(x, y, beta=beta, reduction="none").mean(-1)         # loss="smooth_l1"
    l = F.mse_loss(x, y, reduction="none").mean(-1)                           # loss="mse"
    l = 1 - (F.normalize(x, dim=-1, eps=eps) * F.normalize(y, dim=-1, eps=eps)).sum(-1)  # "cosine"
    feature_align(s, t, mask) == l * mask       # float32, shape [...]

(``1 - cos`` equals ``1 - F.cosine_similarity(x, y)`` whenever both norms exceed ``eps``.)

The kernel ``fastkd::feature_align`` (Triton for D <= 4096, ``csrc/feature_align.cpp``) computes the loss and ``d
loss / d student`` in one pass per row; its backward scales that saved gradient. Once differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastkd.checks import check_bool, check_choice, check_number
from fastkd.ops._dispatch import Route, accumulation_dtype, check_float_tensors, register

__all__ = ["feature_align", "feature_align_reference", "TARGET_NORMS", "LOSSES"]

TARGET_NORMS = ("layernorm", "l2", "none")
LOSSES = ("smooth_l1", "mse", "cosine")


def check_options(target_norm, student_norm, loss, beta, eps) -> None:
    """Raise ValueError / TypeError naming the first invalid option of :func:`feature_align`."""
    check_choice("target_norm", target_norm, TARGET_NORMS)
    check_bool("student_norm", student_norm)
    check_choice("loss", loss, LOSSES)
    check_number("beta", beta, low=0)
    check_number("eps", eps, low=0, low_open=True)


def _arguments(student, teacher, mask, target_norm, student_norm, loss, beta, eps) -> tuple:
    """Validate; returns the kernel's arguments (teacher detached, ``beta`` and ``eps`` as floats)."""
    check_float_tensors(student=student, teacher=teacher)
    shape = tuple(student.shape[:-1])
    problems = [
        (ValueError, student.dim() < 1 or student.shape[-1] < 1,
         f"student must have shape [..., D] with D >= 1, got {tuple(student.shape)}"),
        (ValueError, teacher.shape != student.shape,
         f"teacher must have the student's shape {tuple(student.shape)}, got {tuple(teacher.shape)}"),
    ]
    if mask is not None:
        is_tensor = isinstance(mask, Tensor)
        problems += [
            (TypeError, not is_tensor, f"mask must be a torch.Tensor or None, got {type(mask).__name__}"),
            (TypeError, is_tensor and mask.dtype != torch.bool and not mask.dtype.is_floating_point,
             f"mask must be bool or floating point, got {getattr(mask, 'dtype', None)}"),
            (ValueError, is_tensor and mask.shape != shape,
             f"mask must have shape {shape} (student.shape[:-1]), got {tuple(getattr(mask, 'shape', ()))}"),
            (ValueError, is_tensor and mask.device != student.device,
             f"mask is on {getattr(mask, 'device', None)} but student is on {student.device}"),
        ]
    for error, failed, message in problems:
        if failed:
            raise error(message)
    check_options(target_norm, student_norm, loss, beta, eps)
    return student, teacher.detach(), mask, target_norm, student_norm, loss, float(beta), float(eps)


def feature_align_reference(student: Tensor, teacher: Tensor, mask: Tensor | None = None, *,
                            target_norm: str = "layernorm", student_norm: bool = False, loss: str = "smooth_l1",
                            beta: float = 2.0, eps: float = 1e-6) -> Tensor:
    """The materialised PyTorch formula of :func:`feature_align` (oracle, baseline and fallback)."""
    return _reference(*_arguments(student, teacher, mask, target_norm, student_norm, loss, beta, eps))


def _reference(student, teacher, mask, target_norm, student_norm, loss, beta, eps) -> Tensor:
    acc = accumulation_dtype(student, teacher)
    s, t = student.to(acc), teacher.detach().to(acc)
    if target_norm == "layernorm":
        y = F.layer_norm(t, t.shape[-1:], eps=eps)
    elif target_norm == "l2":
        y = F.normalize(t, dim=-1, eps=eps)
    else:
        y = t
    x = F.normalize(s, dim=-1, eps=eps) if student_norm else s
    if loss == "smooth_l1":
        rows = F.smooth_l1_loss(x, y, beta=beta, reduction="none").mean(-1)
    elif loss == "mse":
        rows = F.mse_loss(x, y, reduction="none").mean(-1)
    else:
        rows = 1 - (F.normalize(x, dim=-1, eps=eps) * F.normalize(y, dim=-1, eps=eps)).sum(-1)
    if mask is not None:
        rows = rows * mask.detach().to(acc)
    return rows.float() if acc == torch.float32 else rows


def _feature_align_triton(student, teacher, weight, target_norm, student_norm, loss, beta, eps, write_grad):
    from fastkd.kernels.feature_align import launch_feature_align_fwd

    return launch_feature_align_fwd(
        student, teacher, weight, target_norm=target_norm, student_norm=student_norm, loss=loss, beta=beta,
        eps=eps, write_grad=write_grad,
    )


def _feature_align_gpu_limit(student, *args) -> str | None:
    from fastkd.kernels.feature_align import MAX_D

    return f"D = {student.shape[-1]} > {MAX_D}" if student.shape[-1] > MAX_D else None


def _fake(student, teacher, weight, target_norm, student_norm, loss, beta, eps, write_grad):
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if write_grad else student.new_empty(0)
    return student.new_empty(student.shape[0], dtype=accumulation_dtype(student, teacher)), grad


register("feature_align", _fake, cuda=_feature_align_triton)
_ROUTE = Route("feature_align", gpu_limit=_feature_align_gpu_limit)


def _kernel(student, teacher, mask, target_norm, student_norm, loss, beta, eps) -> Tensor:
    """``torch.ops.fastkd.feature_align`` on the rows of the (validated) inputs."""
    D = student.shape[-1]
    s = student if student.dim() == 2 else student.reshape(-1, D)
    t = teacher if teacher.dim() == 2 else teacher.reshape(-1, D)
    if s.stride(-1) != 1:
        s = s.contiguous()
    if t.stride(-1) != 1:
        t = t.contiguous()
    weight = None if mask is None else mask.detach().reshape(-1).to(torch.float32).contiguous()
    write_grad = student.requires_grad and torch.is_grad_enabled()
    rows, _ = torch.ops.fastkd.feature_align.default(s, t, weight, target_norm, student_norm, loss, beta, eps,
                                                     write_grad)
    return rows if student.dim() == 2 else rows.reshape(student.shape[:-1])


def feature_align(student: Tensor, teacher: Tensor, mask: Tensor | None = None, *,
                  target_norm: str = "layernorm", student_norm: bool = False, loss: str = "smooth_l1",
                  beta: float = 2.0, eps: float = 1e-6) -> Tensor:
    """Per-row loss ``[...]`` (module docstring); gradient flows to ``student`` only (in its dtype)."""
    args = _arguments(student, teacher, mask, target_norm, student_norm, loss, beta, eps)
    return _ROUTE.run(_reference, args, student.device, (student.dtype, teacher.dtype), _kernel)
