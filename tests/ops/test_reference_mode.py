"""``reference_ops()`` routes every public fused op to its plain reference, with equal results."""

import importlib

import pytest
import torch

import fastkd.ops as ops
from fastkd.ops.reference_mode import reference_ops, reference_ops_enabled


def _spy(monkeypatch, module_name, function_name):
    module = importlib.import_module(module_name)
    calls = []
    original = getattr(module, function_name)

    def spy(*args, **kwargs):
        calls.append(function_name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, function_name, spy)
    return calls


def test_switch_nests_and_restores():
    assert not reference_ops_enabled()
    with reference_ops():
        assert reference_ops_enabled()
        with reference_ops(False):
            assert not reference_ops_enabled()
        assert reference_ops_enabled()
    assert not reference_ops_enabled()


def test_feature_align_routes_to_reference(monkeypatch):
    s, t = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7)
    fast = ops.feature_align(s, t)
    calls = _spy(monkeypatch, "fastkd.ops.feature_align", "feature_align_reference")
    with reference_ops():
        plain = ops.feature_align(s, t)
    assert calls == ["feature_align_reference"]
    torch.testing.assert_close(plain, fast)


def test_gather_tokens_routes_to_reference(monkeypatch):
    x, pos = torch.randn(2, 9, 4), torch.randn(9, 4)
    keep = torch.tensor([[0, 3, 8], [1, 2, 5]])
    fast = ops.gather_tokens(x, keep, pos)
    calls = _spy(monkeypatch, "fastkd.ops.gather_tokens", "gather_tokens_reference")
    with reference_ops():
        plain = ops.gather_tokens(x, keep, pos)
    assert calls == ["gather_tokens_reference"]
    torch.testing.assert_close(plain, fast)


def test_token_relation_routes_to_reference(monkeypatch):
    q_s, k_s, q_t, k_t = (torch.randn(1, 2, 7, 8) for _ in range(4))
    fast = ops.token_relation(q_s, k_s, q_t, k_t)
    calls = _spy(monkeypatch, "fastkd.ops.token_relation", "token_relation_reference")
    with reference_ops():
        plain = ops.token_relation(q_s, k_s, q_t, k_t)
    assert calls == ["token_relation_reference"]
    torch.testing.assert_close(plain, fast, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("return_gap", [False, True])
def test_ema_python_loop_matches_fused(return_gap):
    teacher = [torch.randn(33), torch.randn(4, 5)]
    student = [torch.randn(33), torch.randn(4, 5, dtype=torch.bfloat16)]
    fused = [t.clone() for t in teacher]
    fast_gap = ops.ema_(fused, student, 0.9, return_gap=return_gap)
    with reference_ops():
        plain_gap = ops.ema_(teacher, student, 0.9, return_gap=return_gap)
    for a, b in zip(teacher, fused):
        torch.testing.assert_close(a, b)
    if return_gap:
        for a, b in zip(plain_gap, fast_gap):
            assert a == pytest.approx(b, rel=1e-6)
    else:
        assert plain_gap is None and fast_gap is None


# ---------------------------------------------------------------- the CPU size rule

from fastkd.ops import CPU_REFERENCE_BELOW, fused_kernels_always  # noqa: E402
feature_align_module = importlib.import_module("fastkd.ops.feature_align")
gather_tokens_module = importlib.import_module("fastkd.ops.gather_tokens")
token_relation_module = importlib.import_module("fastkd.ops.token_relation")
from fastkd.ops.reference_mode import small_on_cpu  # noqa: E402


def _feature_align_case(rows):
    s = torch.randn(rows, 96, requires_grad=True)
    return s, lambda: ops.feature_align(s, torch.randn(rows, 96, generator=torch.Generator().manual_seed(1)))


def _gather_case(batch):
    x = torch.randn(batch, 16, 96, requires_grad=True)
    keep = torch.argsort(torch.rand(batch, 16, generator=torch.Generator().manual_seed(2)), 1)[:, :8]
    return x, lambda: ops.gather_tokens(x, keep)


def _relation_case(batch):
    q_s = torch.randn(batch, 3, 17, 32, requires_grad=True)
    t = [torch.randn(batch, 3, 17, 32) for _ in range(3)]
    return q_s, lambda: ops.token_relation(q_s, t[0], t[1], t[2])


# (op module, its custom op's attribute, case, (a size below the threshold, one above))
RULE_CASES = {
    "feature_align": (feature_align_module, "_feature_align_op", _feature_align_case, (64, 4096)),
    "gather_tokens": (gather_tokens_module, "_gather_tokens_op", _gather_case, (16, 256)),
    "token_relation": (token_relation_module, "_token_relation_op", _relation_case, (8, 1024)),
}


@pytest.mark.parametrize("op", sorted(RULE_CASES))
def test_small_cpu_problems_take_the_reference_and_match_the_kernel(op, monkeypatch):
    module, attribute, case, sizes = RULE_CASES[op]
    calls = []
    kernel = getattr(module, attribute)

    def counting(*args):
        calls.append(1)
        return kernel(*args)

    monkeypatch.setattr(module, attribute, counting)
    for size, fused in zip(sizes, (False, True)):
        leaf, run = case(size)
        with fused_kernels_always(False):
            calls.clear()
            out = run()
            assert bool(calls) is fused, (op, size)
            out.sum().backward()
        grad, leaf.grad = leaf.grad.clone(), None
        with fused_kernels_always():
            calls.clear()
            expected = run()
            assert calls
            expected.sum().backward()
        assert out.dtype == expected.dtype
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-4, atol=1e-5)


def test_the_rule_keeps_the_op_dtype_contract_under_cpu_autocast():
    q_s, run = _relation_case(8)
    with fused_kernels_always(False), torch.autocast("cpu", dtype=torch.bfloat16):
        small = run()
    with fused_kernels_always():
        kernel = run()
    assert small.dtype == kernel.dtype == torch.float32
    torch.testing.assert_close(small, kernel, rtol=1e-4, atol=1e-5)  # no bf16 matmul inside


def test_the_rule_is_for_cpu_below_the_threshold_only():
    cpu, meta = torch.device("cpu"), torch.device("cuda")
    for op, threshold in CPU_REFERENCE_BELOW.items():
        with fused_kernels_always(False):
            assert small_on_cpu(op, cpu, threshold - 1) and not small_on_cpu(op, cpu, threshold)
            assert not small_on_cpu(op, meta, 1)
        with fused_kernels_always():
            assert not small_on_cpu(op, cpu, 1)
