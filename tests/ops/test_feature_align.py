"""fastkd.ops.feature_align against feature_align_reference: C++ CPU kernel and the fallback (the
reference through the dispatch), forward and gradients, fp32 / bf16 / fp64 (the Triton kernel:
tests/kernels/test_feature_align.py)."""

import itertools

import pytest
import torch

from fastkd.ops import feature_align, feature_align_reference
from fastkd.ops._dispatch import native_op
from fastkd.ops.feature_align import LOSSES, TARGET_NORMS
from tests.ops.conftest import force_torch_path
MODES = list(itertools.product(TARGET_NORMS, (False, True), LOSSES))
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=1e-2)}


def _kw(mode, beta=0.7):
    target_norm, student_norm, loss = mode
    return dict(target_norm=target_norm, student_norm=student_norm, loss=loss, beta=beta, eps=1e-6)


def _inputs(shape, dtype, *, teacher_scale=2.0):
    student = torch.randn(shape).to(dtype).requires_grad_()
    teacher = (torch.randn(shape) * teacher_scale + 0.5).to(dtype)
    return student, teacher


def _reference(student, teacher, mask, kw, upstream):
    rows = feature_align_reference(student, teacher, mask, **kw)
    (grad,) = torch.autograd.grad((rows * upstream).sum(), student)
    return rows.detach(), grad


def _assert_close(rows, grad, ref_rows, ref_grad, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(rows, ref_rows, rtol=1e-5 if dtype == torch.float32 else 1e-4, atol=1e-6)
    scale = ref_grad.float().abs().max().clamp_min(1e-30)
    torch.testing.assert_close(grad.float() / scale, ref_grad.float() / scale, rtol=tol["rtol"], atol=tol["atol"])


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(map(str, m)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_op_matches_reference(mode, dtype):
    student, teacher = _inputs((2, 13, 100), dtype)
    mask = torch.rand(2, 13) > 0.3
    upstream = torch.rand(2, 13) + 0.5
    rows = feature_align(student, teacher, mask, **_kw(mode))
    (grad,) = torch.autograd.grad((rows * upstream).sum(), student)
    assert rows.shape == (2, 13) and rows.dtype == torch.float32 and grad.dtype == dtype
    _assert_close(rows.detach(), grad, *_reference(student, teacher, mask, _kw(mode), upstream), dtype)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(map(str, m)))
def test_fallback_matches_reference(mode, monkeypatch):
    force_torch_path(monkeypatch)
    student, teacher = _inputs((5, 33), torch.float32)
    weight = torch.rand(5)
    with pytest.warns(RuntimeWarning, match="fastkd.ops.feature_align: .*using its PyTorch reference"):
        rows = feature_align(student, teacher, weight, **_kw(mode))
    (grad,) = torch.autograd.grad(rows.sum(), student)
    _assert_close(rows.detach(), grad, *_reference(student, teacher, weight, _kw(mode), 1.0), torch.float32)


@pytest.mark.parametrize("D", [1, 3, 384, 768, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_widths_and_single_row(D, dtype):
    mode = ("layernorm", False, "smooth_l1")
    for M in (1, 7):
        student, teacher = _inputs((M, D), dtype)
        rows = feature_align(student, teacher, **_kw(mode, beta=2.0))
        (grad,) = torch.autograd.grad(rows.sum(), student)
        _assert_close(rows.detach(), grad, *_reference(student, teacher, None, _kw(mode, beta=2.0), 1.0), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vit_b_tokens_with_masks(dtype):
    student, teacher = _inputs((2, 197, 768), dtype)
    kw = _kw(("layernorm", False, "smooth_l1"), beta=2.0)
    masks = {
        "all_true": torch.ones(2, 197, dtype=torch.bool),
        "all_false": torch.zeros(2, 197, dtype=torch.bool),
        "mixed": torch.rand(2, 197) > 0.9,
        "float": torch.rand(2, 197),
    }
    for name, mask in masks.items():
        rows = feature_align(student, teacher, mask, **kw)
        (grad,) = torch.autograd.grad(rows.sum(), student)
        _assert_close(rows.detach(), grad, *_reference(student, teacher, mask, kw, 1.0), dtype)
        if name == "all_false":
            assert rows.abs().sum() == 0 and grad.abs().sum() == 0


def test_non_contiguous_and_mixed_dtypes():
    student = torch.randn(2, 40, 24).transpose(0, 1)[::3][:7].requires_grad_()  # [7, 2, 24], strided rows
    teacher = torch.randn(7, 2, 48).to(torch.bfloat16)[..., ::2]  # stride 2 along D
    mask = torch.rand(2, 7).t()
    assert not student.is_contiguous() and teacher.stride(-1) == 2 and not mask.is_contiguous()
    for mode in [("layernorm", False, "smooth_l1"), ("l2", True, "cosine")]:
        rows = feature_align(student, teacher, mask, **_kw(mode))
        (grad,) = torch.autograd.grad(rows.sum(), student)
        _assert_close(rows.detach(), grad, *_reference(student, teacher, mask, _kw(mode), 1.0), torch.float32)


def test_gradcheck_float64():
    student, teacher = _inputs((4, 9), torch.float64)
    mask = torch.tensor([1.0, 0.5, 0.0, 2.0], dtype=torch.float64)
    for mode in MODES:
        fn = lambda s: feature_align(s, teacher, mask, **_kw(mode, beta=5.0))  # noqa: E731
        assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-6)


def test_cpu_path_is_the_cpp_kernel():
    assert native_op("feature_align") is not None, "fastkd._C must be built with feature_align"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_scaling_retain_graph_and_teacher_without_grad(dtype):
    student, teacher = _inputs((6, 20), dtype)
    teacher.requires_grad_()
    kw = _kw(("layernorm", False, "mse"))
    ref_rows, ref_grad = _reference(student, teacher, None, kw, 3.0)
    rows = feature_align(student, teacher, **kw)
    (rows.sum() * 3.0).backward(retain_graph=True)
    first = student.grad.clone()
    student.grad = None
    (rows.sum() * 3.0).backward()  # the retained graph still holds the unscaled gradient
    assert first.dtype == student.grad.dtype == dtype and teacher.grad is None
    _assert_close(rows.detach(), first, ref_rows, ref_grad, dtype)
    _assert_close(rows.detach(), student.grad, ref_rows, ref_grad, dtype)
    with torch.no_grad():
        torch.testing.assert_close(feature_align(student, teacher, **kw), ref_rows)


def test_autocast_bf16():
    layer = torch.nn.Linear(16, 32)
    x, teacher = torch.randn(5, 16), torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = layer(x)
        rows = feature_align(student, teacher)
    assert student.dtype == torch.bfloat16 and rows.dtype == torch.float32
    rows.sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_torch_compile_fullgraph():
    def fn(s, t, m):
        return feature_align(s, t, m, target_norm="l2", loss="cosine").sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    student, teacher = _inputs((3, 5, 16), torch.float32)
    mask = torch.rand(3, 5) > 0.5
    out = compiled(student, teacher, mask)
    (grad,) = torch.autograd.grad(out, student)
    ref = fn(student, teacher, mask)
    (ref_grad,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((torch.randn(2, 3), torch.randn(2, 4)), {}, ValueError, "teacher must have"),
        ((torch.randn(2, 3), torch.randn(2, 3).long()), {}, TypeError, "teacher must be float"),
        (([1.0], torch.randn(1)), {}, TypeError, "student must be a torch.Tensor"),
        ((torch.randn(2, 0), torch.randn(2, 0)), {}, ValueError, "D >= 1"),
        ((torch.randn(2, 3), torch.randn(2, 3), torch.ones(3)), {}, ValueError, "mask must have shape"),
        ((torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, dtype=torch.long)), {}, TypeError, "mask must be bool"),
        ((torch.randn(2, 3), torch.randn(2, 3)), {"target_norm": "batchnorm"}, ValueError, "target_norm"),
        ((torch.randn(2, 3), torch.randn(2, 3)), {"loss": "l1"}, ValueError, "loss must be"),
        ((torch.randn(2, 3), torch.randn(2, 3)), {"beta": -1.0}, ValueError, "beta"),
        ((torch.randn(2, 3), torch.randn(2, 3)), {"eps": 0.0}, ValueError, "eps"),
        ((torch.randn(2, 3), torch.randn(2, 3)), {"student_norm": 1}, TypeError, "student_norm"),
    ],
)
def test_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        feature_align(*args, **kwargs)
    with pytest.raises(error, match=match):
        feature_align_reference(*args, **kwargs)
