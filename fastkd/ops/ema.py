"""``ema_``: in-place EMA of teacher tensors towards student tensors in one pass, optionally
returning the teacher-student gap from the same pass (the C++/CUDA op ``torch.ops.fastkd.ema_``).

For every pair ``(t, s)`` with ``w = 1 - momentum`` (computed in fp32, fp64 for fp64 teachers, and
rounded once to the teacher dtype; the student may have another floating dtype)::

    t.lerp_(s, w)            # i.e. t <- t + w * (s - t)

With ``return_gap=True``, measured before the update and accumulated in float64::

    EMAGap(diff_sq=sum ||s - t||^2, dot=sum <s, t>, teacher_sq=sum ||t||^2, student_sq=sum ||s||^2)

Kernels: ``csrc/ema.cpp`` (CPU), ``csrc/cuda/ema_cuda.cu`` (CUDA); the fallback is a per-tensor ``mul_`` / ``add_``
loop plus a separate gap pass.
"""

from __future__ import annotations

import numbers
from typing import Iterator, NamedTuple, Sequence

import torch

from fastkd.ops._dispatch import FLOAT_DTYPES, Route


class EMAGap(NamedTuple):
    """Teacher-student gap over all parameters (python floats, fp64-accumulated)."""

    diff_sq: float
    dot: float
    teacher_sq: float
    student_sq: float


def _problems(teacher, student, momentum, skip) -> Iterator[tuple[type[Exception], str]]:
    """The problems of the arguments of :func:`ema_` / :func:`ema_unless_` (``skip``: ``...`` for ema_)."""
    for name, tensors in (("teacher", teacher), ("student", student)):
        if not isinstance(tensors, (list, tuple)):
            yield TypeError, f"ema_: {name} must be a list or tuple of tensors, got {type(tensors).__name__}"
        for i, x in enumerate(tensors):
            if not isinstance(x, torch.Tensor):
                yield TypeError, f"ema_: {name}[{i}] must be a Tensor, got {type(x).__name__}"
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        yield TypeError, f"ema_: momentum must be a real number, got {type(momentum).__name__}"
    if not 0.0 <= float(momentum) <= 1.0:
        yield ValueError, f"ema_: momentum must be in [0, 1], got {momentum}"
    if len(teacher) != len(student):
        yield ValueError, f"ema_: teacher and student lists differ in length: {len(teacher)} vs {len(student)} tensors"
    for i, (t, s) in enumerate(zip(teacher, student)):
        for name, x in (("teacher", t), ("student", s)):
            if x.dtype not in FLOAT_DTYPES:
                yield TypeError, f"ema_: {name}[{i}] must be float32, float64, bfloat16 or float16, got {x.dtype}"
        if t.shape != s.shape:
            yield ValueError, f"ema_: shape mismatch at index {i}: teacher {list(t.shape)} vs student {list(s.shape)}"
        if not t.is_contiguous():
            yield ValueError, f"ema_: teacher[{i}] must be contiguous, got shape {list(t.shape)}, strides {t.stride()}"
        if t.device != teacher[0].device or s.device != teacher[0].device:
            yield ValueError, (f"ema_: all tensors must be on one device; teacher[0] is on {teacher[0].device} but "
                               f"at index {i} teacher is on {t.device} and student on {s.device}")
    if skip is not ... and (not isinstance(skip, torch.Tensor) or skip.numel() != 1):
        yield TypeError, (f"ema_unless_: skip must be a one-element tensor (0 or 1), got {type(skip).__name__} "
                          f"{tuple(getattr(skip, 'shape', ()))}")


def _check_args(teacher, student, momentum, skip: object = ...) -> None:
    for error, message in _problems(teacher, student, momentum, skip):
        raise error(message)


def _gap_pass(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """[sum (s - t)^2, sum s t, sum t^2, sum s^2] in float64 (a separate read of every tensor)."""
    gap = torch.zeros(4, dtype=torch.float64, device=teacher[0].device if teacher else None)
    for t, s in zip(teacher, student):
        t64, s64 = t.double(), s.double()
        gap += torch.stack([(s64 - t64).square().sum(), (s64 * t64).sum(), t64.square().sum(), s64.square().sum()])
    return gap


def _python_loop(teacher, student, momentum: float, return_gap: bool) -> torch.Tensor | None:
    """The per-tensor ``mul_`` / ``add_`` loop many SSL codebases use, plus a separate gap pass."""
    gap = _gap_pass(teacher, student) if return_gap else None
    for t, s in zip(teacher, student):
        t.mul_(momentum).add_(s.to(t.dtype), alpha=1.0 - momentum)
    return gap


_ROUTE = Route("ema_")


def ema_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float, *,
         return_gap: bool = False) -> EMAGap | None:
    """``teacher[i].lerp_(student[i], 1 - momentum)`` for every ``i`` (module doc); nothing is modified when
    validation fails. Returns :class:`EMAGap` (before the update) when ``return_gap``, else None."""
    _check_args(teacher, student, momentum)
    momentum = float(momentum)
    if len(teacher) == 0:  # no tensor to dispatch on
        return EMAGap(0.0, 0.0, 0.0, 0.0) if return_gap else None
    dtypes = tuple({x.dtype for x in (*teacher, *student)})
    with torch.no_grad():
        gap = _ROUTE.run(_python_loop, (list(teacher), list(student), momentum, return_gap), teacher[0].device,
                         dtypes)
    return EMAGap(*gap.tolist()) if return_gap else None


def ema_unless_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float,
                skip: torch.Tensor, *, return_gap: bool = False) -> torch.Tensor | None:
    """:func:`ema_` decided on the device: for every pair ``(t, s)``::

        w = (1 - momentum) * (1 - skip)      # fp32; skip is a 0-dim 0/1 tensor on the tensors' device
        t.lerp_(s, w)                        # skip = 1: w = 0 and t stays exactly as it was

    so a non-finite step can drop its EMA update without a host read; one ``torch._foreach_lerp_`` per teacher
    dtype. ``return_gap``: :func:`ema_`'s gap as a float64 ``[4]`` device tensor."""
    _check_args(teacher, student, momentum, skip)
    if not teacher:
        return torch.zeros(4, dtype=torch.float64, device=skip.device) if return_gap else None
    with torch.no_grad():
        gap = _gap_pass(teacher, student) if return_gap else None
        keep = 1.0 - skip.to(device=teacher[0].device, dtype=torch.float32).reshape(())
        # 1 - momentum as fp32 computes it; a Python scalar, so no host-to-device copy
        weight = keep * (1.0 - float(torch.tensor(float(momentum), dtype=torch.float32)))
        by_dtype: dict = {}
        for t, s in zip(teacher, student):
            pair = by_dtype.setdefault(t.dtype, ([], []))
            pair[0].append(t)
            pair[1].append(s if s.dtype == t.dtype else s.to(t.dtype))
        for dtype, (ts, ss) in by_dtype.items():
            w = weight.to(dtype)
            torch._foreach_lerp_(ts, ss, [w] * len(ts))
    return gap


def ema_reference(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                  momentum: float) -> tuple[list[torch.Tensor], EMAGap]:
    """Oracle: the updated teachers (new tensors, float64 math cast to each teacher's dtype) and the gap."""
    _check_args(teacher, student, momentum)
    with torch.no_grad():
        updated = [
            (t.double() + (1.0 - momentum) * (s.double() - t.double())).to(t.dtype) for t, s in zip(teacher, student)
        ]
        gap = _gap_pass(teacher, student)
    return updated, EMAGap(*gap.tolist())
