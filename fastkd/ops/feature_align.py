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

Registered as ``fastkd::feature_align`` with ``torch.library.custom_op``. One pass over each row
computes the loss and ``d loss / d student`` together (in fp32, fp64 for fp64 inputs); the backward
only scales that saved gradient by the incoming per-row gradient: in place when the graph is not
retained, skipped on CPU when the incoming gradient is exactly one. No normalised copy of either
input is stored. Implementations (chosen by the rule of ``fastkd.ops._dispatch``, the same for every op):
CUDA -> the Triton kernel of ``fastkd.kernels.feature_align`` (D <= 4096); CPU -> the C++ kernel
``fastkd::feature_align_cpu`` of the ``fastkd._C`` extension; float64 on CUDA, D > 4096 on CUDA, other
devices, or a missing extension -> a PyTorch path chunked over rows whose temporaries are one chunk
large. The op is once differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastkd.ops._dispatch import OpImplementations
from fastkd.ops.reference_mode import cpu_reference, reference_ops_enabled, small_on_cpu

__all__ = ["feature_align", "feature_align_reference", "TARGET_NORMS", "LOSSES"]

TARGET_NORMS = ("layernorm", "l2", "none")
LOSSES = ("smooth_l1", "mse", "cosine")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Elements per chunk of the PyTorch path: its ~10 temporaries stay a few MiB.
_CHUNK_ELEMENTS = 1 << 17


def check_options(target_norm, student_norm, loss, beta, eps) -> None:
    """Raise ValueError / TypeError naming the first invalid option of :func:`feature_align`."""
    if target_norm not in TARGET_NORMS:
        raise ValueError(f"target_norm must be one of {TARGET_NORMS}, got {target_norm!r}")
    if not isinstance(student_norm, bool):
        raise TypeError(f"student_norm must be a bool, got {type(student_norm).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
        raise ValueError(f"beta must be a number >= 0, got {beta!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a number > 0, got {eps!r}")


def _validate(student, teacher, mask, target_norm, student_norm, loss, beta, eps) -> None:
    for name, value in (("student", student), ("teacher", teacher)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if student.dim() < 1 or student.shape[-1] < 1:
        raise ValueError(f"student must have shape [..., D] with D >= 1, got {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher must have the student's shape {tuple(student.shape)}, got {tuple(teacher.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"teacher is on {teacher.device} but student is on {student.device}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise TypeError(f"mask must be bool or floating point, got {mask.dtype}")
        if mask.shape != student.shape[:-1]:
            raise ValueError(f"mask must have shape {tuple(student.shape[:-1])} (student.shape[:-1]), got {tuple(mask.shape)}")
        if mask.device != student.device:
            raise ValueError(f"mask is on {mask.device} but student is on {student.device}")
    check_options(target_norm, student_norm, loss, beta, eps)


def feature_align_reference(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None = None,
    *,
    target_norm: str = "layernorm",
    student_norm: bool = False,
    loss: str = "smooth_l1",
    beta: float = 2.0,
    eps: float = 1e-6,
) -> Tensor:
    """The plain PyTorch formula of :func:`feature_align` (fp32, fp64 for fp64 inputs), materialising
    every intermediate; the test oracle and benchmark baseline."""
    _validate(student, teacher, mask, target_norm, student_norm, loss, beta, eps)
    acc = _loss_dtype(student, teacher)
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


def _loss_dtype(s: Tensor, t: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32


def _align_rows_torch(s, t, w, target_norm, student_norm, loss, beta, eps):
    """Loss ``[R]`` and weighted ``d loss / d s`` ``[R, D]`` of a chunk of rows, in closed form
    (the same formulas as the kernels), in fp32 (fp64 for fp64 inputs)."""
    acc = _loss_dtype(s, t)
    s, t = s.to(acc), t.to(acc)
    D = s.shape[-1]
    if target_norm == "layernorm":
        y = F.layer_norm(t, (D,), eps=eps)
    elif target_norm == "l2":
        y = t / torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min(eps)
    else:
        y = t
    if student_norm:
        s_norm = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
        s_den = s_norm.clamp_min(eps)
        x = s / s_den
    else:
        x = s
    if loss == "cosine":
        x_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        x_den = x_norm.clamp_min(eps)
        x_hat = x / x_den
        y_hat = y / torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min(eps)
        cos = (x_hat * y_hat).sum(-1, keepdim=True)
        rows = (1 - cos).squeeze(-1)
        gx = (x_hat * torch.where(x_norm > eps, cos, 0.0) - y_hat) / x_den
    else:
        d = x - y
        if loss == "mse":
            rows = (d * d).mean(-1)
            gx = d * (2.0 / D)
        else:
            ad = d.abs()
            quadratic = ad < beta
            rows = torch.where(quadratic, 0.5 * d * d / beta, ad - 0.5 * beta).mean(-1)
            gx = torch.where(quadratic, d / beta, d.sign()) / D
    if student_norm:
        radial = torch.where(s_norm > eps, (x * gx).sum(-1, keepdim=True), 0.0)
        gx = (gx - x * radial) / s_den
    if w is not None:
        rows = rows * w
        gx = gx * w[:, None]
    return rows, gx


def _feature_align_chunked(s, t, w, target_norm, student_norm, loss, beta, eps, write_grad):
    """Any-device PyTorch path of the op, chunked over rows."""
    M, D = s.shape
    out_loss = s.new_empty(M, dtype=_loss_dtype(s, t))
    grad = torch.empty_like(s, memory_format=torch.contiguous_format) if write_grad else s.new_empty(0)
    step = max(1, _CHUNK_ELEMENTS // D)
    for start in range(0, M, step):
        rows = slice(start, start + step)
        chunk_loss, chunk_grad = _align_rows_torch(
            s[rows], t[rows], None if w is None else w[rows], target_norm, student_norm, loss, beta, eps
        )
        out_loss[rows] = chunk_loss
        if write_grad:
            grad[rows] = chunk_grad
    return out_loss, grad


def _feature_align_triton(student, teacher, weight, target_norm, student_norm, loss, beta, eps, write_grad):
    from fastkd.kernels.feature_align import launch_feature_align_fwd

    return launch_feature_align_fwd(
        student, teacher, weight, target_norm=target_norm, student_norm=student_norm, loss=loss, beta=beta,
        eps=eps, write_grad=write_grad,
    )


def _feature_align_gpu_limit(student, *args) -> str | None:
    from fastkd.kernels.feature_align import MAX_D

    return f"D = {student.shape[1]} > {MAX_D}" if student.shape[1] > MAX_D else None


_IMPLEMENTATIONS = OpImplementations(
    "feature_align", torch=_feature_align_chunked, native="feature_align_cpu", triton=_feature_align_triton,
    gpu_limit=_feature_align_gpu_limit,
)


@torch.library.custom_op("fastkd::feature_align", mutates_args=())
def _feature_align_op(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor | None,
    target_norm: str,
    student_norm: bool,
    loss: str,
    beta: float,
    eps: float,
    write_grad: bool,
) -> tuple[Tensor, Tensor]:
    return _IMPLEMENTATIONS(student, teacher, weight, target_norm, student_norm, loss, beta, eps, write_grad)


@_feature_align_op.register_fake
def _(student, teacher, weight, target_norm, student_norm, loss, beta, eps, write_grad):
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if write_grad else student.new_empty(0)
    return student.new_empty(student.shape[0], dtype=_loss_dtype(student, teacher)), grad


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.set_materialize_grads(False)  # the gradient output never gets a gradient: no [M, D] of zeros


def _backward(ctx, grad_rows, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    if grad_rows is None or not ctx.needs_input_grad[0]:
        return (None,) * 9
    if grad.numel() == 0 and grad_rows.numel() != 0:
        raise RuntimeError("fastkd::feature_align was called with write_grad=False, so it has no student gradient")
    scale = grad_rows[:, None]
    if torch.compiler.is_compiling() or type(grad) is not torch.Tensor:
        return ((grad * scale).to(grad.dtype),) + (None,) * 8
    if grad.device.type == "cpu" and bool((grad_rows == 1).all()):
        return (grad,) + (None,) * 8
    if torch._C._autograd._get_current_graph_task_keep_graph():
        return (torch.mul(grad, scale, out=torch.empty_like(grad)),) + (None,) * 8
    # The graph is freed after this backward: nobody else reads the saved gradient, reuse it.
    return (grad.mul_(scale),) + (None,) * 8


_feature_align_op.register_autograd(_backward, setup_context=_setup_context)


def feature_align(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None = None,
    *,
    target_norm: str = "layernorm",
    student_norm: bool = False,
    loss: str = "smooth_l1",
    beta: float = 2.0,
    eps: float = 1e-6,
) -> Tensor:
    """Per-row loss ``[...]`` (float32; float64 for float64 inputs) of ``student`` against the
    normalised ``teacher``, times ``mask``: see the module docstring for the formula. Gradient flows
    to ``student`` only (in its dtype). Inside ``reference_ops()``, and for a small CPU input (see
    :mod:`fastkd.ops.reference_mode`), it is :func:`feature_align_reference`."""
    if reference_ops_enabled():
        return feature_align_reference(
            student, teacher, mask, target_norm=target_norm, student_norm=student_norm, loss=loss, beta=beta, eps=eps
        )
    _validate(student, teacher, mask, target_norm, student_norm, loss, beta, eps)
    if small_on_cpu("feature_align", student.device, student.numel()):
        return cpu_reference(feature_align_reference, student, teacher.detach(), mask, target_norm=target_norm,
                             student_norm=student_norm, loss=loss, beta=beta, eps=eps)
    D = student.shape[-1]
    s = student.reshape(-1, D)
    t = teacher.detach().reshape(-1, D)
    if s.stride(-1) != 1:
        s = s.contiguous()
    if t.stride(-1) != 1:
        t = t.contiguous()
    weight = None if mask is None else mask.detach().reshape(-1).to(torch.float32).contiguous()
    write_grad = student.requires_grad and torch.is_grad_enabled()
    rows, _ = _feature_align_op(s, t, weight, target_norm, student_norm, loss, float(beta), float(eps), write_grad)
    return rows.reshape(student.shape[:-1])
