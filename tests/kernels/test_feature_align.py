"""Triton kernel of fastkd.kernels.feature_align under TRITON_INTERPRET=1 against
feature_align_reference: every mode, widths, row offsets beyond int32, the launcher's checks."""

import itertools

import pytest
import torch

from fastkd.kernels.feature_align import launch_feature_align_fwd
from fastkd.ops import feature_align_reference
from fastkd.ops.feature_align import LOSSES, TARGET_NORMS

MODES = list(itertools.product(TARGET_NORMS, (False, True), LOSSES))
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=1e-2)}


def _kw(mode, beta=0.7):
    target_norm, student_norm, loss = mode
    return dict(target_norm=target_norm, student_norm=student_norm, loss=loss, beta=beta, eps=1e-6)


def _inputs(shape, dtype, *, teacher_scale=2.0):
    student = torch.randn(shape).to(dtype).requires_grad_()
    teacher = (torch.randn(shape) * teacher_scale + 0.5).to(dtype)
    return student, teacher


def _reference(student, teacher, weight, kw):
    student = student.detach().contiguous().requires_grad_()
    rows = feature_align_reference(student, teacher.contiguous(), weight, **kw)
    (grad,) = torch.autograd.grad(rows.sum(), student)
    return rows.detach(), grad


def _assert_close(rows, grad, ref_rows, ref_grad, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(rows, ref_rows, rtol=1e-5 if dtype == torch.float32 else 1e-4, atol=1e-6)
    scale = ref_grad.float().abs().max().clamp_min(1e-30)
    torch.testing.assert_close(grad.float() / scale, ref_grad.float() / scale, rtol=tol["rtol"], atol=tol["atol"])


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(map(str, m)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_matches_reference(mode, dtype):
    student, teacher = _inputs((3, 37), dtype)
    weight = torch.tensor([1.0, 0.0, 0.25])
    rows, grad = launch_feature_align_fwd(student.detach(), teacher, weight, **_kw(mode), write_grad=True)
    _assert_close(rows, grad, *_reference(student, teacher, weight, _kw(mode)), dtype)


@pytest.mark.parametrize("D", [1, 3, 384])
def test_widths(D):
    mode = ("layernorm", True, "cosine")
    student, teacher = _inputs((2, D), torch.float32)
    rows, grad = launch_feature_align_fwd(student.detach(), teacher, None, **_kw(mode), write_grad=True)
    _assert_close(rows, grad, *_reference(student, teacher, None, _kw(mode)), torch.float32)


def test_row_offsets_beyond_int32(huge_strided):
    """Rows whose index times the row stride exceeds 2**31 elements (the stride fits in int32)."""
    M, D = 5, 16
    row_stride = 2**30 + 64
    both = huge_strided((M, 2, D), (row_stride, D, 1), torch.float32, offset=2**31)
    student, teacher = both[:, 0], both[:, 1]
    assert student.stride(0) == row_stride and (M - 1) * row_stride > 2**32
    weight = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0])
    for mode in [("layernorm", False, "smooth_l1"), ("l2", True, "cosine")]:
        rows, grad = launch_feature_align_fwd(student, teacher, weight, **_kw(mode), write_grad=True)
        _assert_close(rows, grad, *_reference(student, teacher, weight, _kw(mode)), torch.float32)


def test_launcher_rejects_too_wide_rows():
    with pytest.raises(ValueError, match="D must be in"):
        launch_feature_align_fwd(torch.randn(2, 4097), torch.randn(2, 4097), None, target_norm="none",
                                 student_norm=False, loss="mse", beta=1.0, eps=1e-6, write_grad=True)
