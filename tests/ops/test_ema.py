"""fastkd.ops.ema_ (C++ op torch.ops.fastkd.ema_ and its fallback, the mul_ / add_ loop) against ema_reference."""

import math
import warnings

import pytest
import torch

import fastkd.ops.ema as ema_module
from fastkd.ops import EMAGap, build_info, ema_, ema_reference
from tests.ops.conftest import force_torch_path

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol) of the updated teacher per teacher dtype: one rounding of an fp32 result
TOL = {
    torch.float32: (2e-6, 1e-6),
    torch.float64: (1e-12, 1e-12),
    torch.bfloat16: (8e-3, 1e-5),
    torch.float16: (1e-3, 1e-5),
}
SIZES = [0, 1, 3, 1023, 2**20 + 7]


def make_pairs(sizes, teacher_dtype, student_dtype):
    teacher = [torch.randn(n, dtype=torch.float64).to(teacher_dtype) for n in sizes]
    student = [(t.double() + 0.5 * torch.randn(t.shape, dtype=torch.float64)).to(student_dtype) for t in teacher]
    return teacher, student


def assert_gap_close(gap, expected):
    assert isinstance(gap, EMAGap)
    for name, got, want in zip(EMAGap._fields, gap, expected):
        assert isinstance(got, float), name
        assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), (name, got, want)


def assert_teachers_close(teacher, expected):
    for i, (t, e) in enumerate(zip(teacher, expected)):
        rtol, atol = TOL[t.dtype]
        torch.testing.assert_close(t, e, rtol=rtol, atol=atol, msg=lambda m, i=i: f"tensor {i}: {m}")


def test_extension_is_built():
    info = build_info()
    assert info["built"] and info["cpu_isa_supported"]
    assert info["cpu_isa"] in ("AVX512", "AVX2", "DEFAULT")


@pytest.mark.parametrize("teacher_dtype", FLOATS + [torch.float64])
@pytest.mark.parametrize("student_dtype", FLOATS)
def test_matches_reference_all_dtype_pairs(teacher_dtype, student_dtype):
    teacher, student = make_pairs(SIZES, teacher_dtype, student_dtype)
    expected, expected_gap = ema_reference(teacher, student, 0.996)
    gap = ema_(teacher, student, 0.996, return_gap=True)
    assert_teachers_close(teacher, expected)
    assert_gap_close(gap, expected_gap)


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.996, 0.3])
def test_momentum_edges(momentum):
    teacher, student = make_pairs([1023, 5], torch.float32, torch.float32)
    before = [t.clone() for t in teacher]
    expected, _ = ema_reference(teacher, student, momentum)
    assert ema_(teacher, student, momentum) is None
    assert_teachers_close(teacher, expected)
    if momentum == 0.0:
        assert all(torch.equal(t, s) for t, s in zip(teacher, student))
    if momentum == 1.0:
        assert all(torch.equal(t, b) for t, b in zip(teacher, before))


def test_three_hundred_tensors_mixed_dtypes():
    gen = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 3000, (300,), generator=gen).tolist()
    teacher, student = [], []
    for i, n in enumerate(sizes):
        pair = make_pairs([n], FLOATS[i % 3], FLOATS[(i // 3) % 3])
        teacher += pair[0]
        student += pair[1]
    expected, expected_gap = ema_reference(teacher, student, 0.9)
    gap = ema_(teacher, student, 0.9, return_gap=True)
    assert_teachers_close(teacher, expected)
    assert_gap_close(gap, expected_gap)


def test_non_contiguous_student_and_shapes():
    teacher = [torch.randn(37, 19), torch.randn(3, 5, 7)]
    student = [torch.randn(19, 37).t(), torch.randn(3, 7, 5).transpose(1, 2)]
    assert not student[0].is_contiguous()
    expected, expected_gap = ema_reference(teacher, student, 0.7)
    gap = ema_(teacher, student, 0.7, return_gap=True)
    assert_teachers_close(teacher, expected)
    assert_gap_close(gap, expected_gap)


def test_gap_with_cancellation_is_fp64_accurate():
    # <s, t> sums to ~1e-3 from terms of +-1e8: an fp32 accumulation loses every digit, fp64 keeps
    # the error within a few ulp of the terms' magnitude
    t = torch.tensor([1e4, -1e4, 1e-3] * 1000, dtype=torch.float32)
    s = torch.tensor([1e4, 1e4, 1e-3] * 1000, dtype=torch.float32)
    products = (s.double() * t.double()).tolist()
    exact = math.fsum(products)
    gap = ema_([t], [s], 0.5, return_gap=True)
    assert abs(gap.dot - exact) <= 1e-13 * math.fsum(abs(p) for p in products)
    assert abs(float((s * t).sum()) - exact) > 1e3 * abs(gap.dot - exact)  # what fp32 would give


def test_student_requiring_grad_and_tuple_inputs():
    teacher = (torch.randn(10),)
    student = (torch.randn(10, requires_grad=True),)
    expected, _ = ema_reference(teacher, student, 0.5)
    ema_(teacher, student, 0.5)
    assert_teachers_close(teacher, expected)
    assert not teacher[0].requires_grad


def test_empty_lists():
    assert ema_([], [], 0.5) is None
    assert ema_([], [], 0.5, return_gap=True) == EMAGap(0.0, 0.0, 0.0, 0.0)


def _bad_inputs():
    good_t, good_s = torch.randn(4), torch.randn(4)
    yield "differ in length", ValueError, [good_t.clone(), torch.randn(3)], [good_s], 0.5
    yield r"shape mismatch at index 1: teacher \[3\] vs student \[4\]", ValueError, \
        [good_t.clone(), torch.randn(3)], [good_s, torch.randn(4)], 0.5
    yield r"teacher\[1\] must be float32", TypeError, \
        [good_t.clone(), torch.zeros(4, dtype=torch.int64)], [good_s, torch.randn(4)], 0.5
    yield r"student\[1\] must be float32", TypeError, \
        [good_t.clone(), torch.randn(4)], [good_s, torch.zeros(4, dtype=torch.int32)], 0.5
    yield r"teacher\[1\] must be contiguous", ValueError, \
        [good_t.clone(), torch.randn(4, 3).t()], [good_s, torch.randn(3, 4)], 0.5
    yield "momentum must be in", ValueError, [good_t.clone()], [good_s], 1.5
    yield "momentum must be in", ValueError, [good_t.clone()], [good_s], float("nan")
    yield "momentum must be a real number", TypeError, [good_t.clone()], [good_s], "0.9"
    yield r"student\[0\] must be a Tensor", TypeError, [good_t.clone()], [[1.0] * 4], 0.5
    yield "on one device", ValueError, [good_t.clone()], [torch.empty(4, device="meta")], 0.5


@pytest.mark.parametrize("match,error,teacher,student,momentum", list(_bad_inputs()))
def test_bad_inputs_raise_and_modify_nothing(match, error, teacher, student, momentum):
    before = [t.clone() for t in teacher]
    with pytest.raises(error, match=match):
        ema_(teacher, student, momentum, return_gap=True)
    assert all(torch.equal(t, b) for t, b in zip(teacher, before))


def test_native_op_validates_too():
    teacher = [torch.randn(4), torch.randn(3)]
    before = [t.clone() for t in teacher]
    with pytest.raises(ValueError, match="shape mismatch at index 1"):
        torch.ops.fastkd.ema_(teacher, [torch.randn(4), torch.randn(4)], 0.5, True)
    with pytest.raises(TypeError, match=r"teacher\[0\] must be"):
        torch.ops.fastkd.ema_([torch.zeros(2, dtype=torch.int64)], [torch.randn(2)], 0.5, False)
    assert all(torch.equal(t, b) for t, b in zip(teacher, before))


def test_torch_compile_fullgraph():
    teacher, student = make_pairs([33, 1023], torch.float32, torch.bfloat16)
    eager = [t.clone() for t in teacher]
    ema_(eager, student, 0.9)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(teacher, student):
        ema_(teacher, student, 0.9)
        return teacher[0] * 2

    out = step(teacher, student)
    assert_teachers_close(teacher, eager)
    torch.testing.assert_close(out, eager[0] * 2)


def test_fallback_warns_once_and_matches(monkeypatch):
    force_torch_path(monkeypatch)
    teacher, student = make_pairs([1023, 7], torch.float32, torch.bfloat16)
    expected, expected_gap = ema_reference(teacher, student, 0.996)
    with pytest.warns(RuntimeWarning, match="not built"):
        gap = ema_(teacher, student, 0.996, return_gap=True)
    assert_teachers_close(teacher, expected)
    assert_gap_close(gap, expected_gap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema_(teacher, student, 0.996)
