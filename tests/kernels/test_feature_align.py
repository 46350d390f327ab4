"""Triton kernel of fastkd.kernels.feature_align under TRITON_INTERPRET=1 against
feature_align_reference: every mode, widths, row offsets beyond int32, the launcher's checks."""

import pytest
import torch

from fastkd.kernels.feature_align import launch_feature_align_fwd
from fastkd.ops import feature_align_reference
from tests.ops.test_feature_align import MODES, TOL, _assert_close, _inputs, _kw  # noqa: F401 - shared cases


def _reference(student, teacher, weight, kw):
    student = student.detach().contiguous().requires_grad_()
    rows = feature_align_reference(student, teacher.contiguous(), weight, **kw)
    (grad,) = torch.autograd.grad(rows.sum(), student)
    return rows.detach(), grad


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
