"""``reference_ops()`` routes every public fused op to its plain reference, with equal results; the
reference is also each op's fallback (here: the native kernel reported missing), and the kernel runs
at every CPU size."""

import importlib

import pytest
import torch

import fastkd.ops as ops
from fastkd.ops._dispatch import reference_ops, reference_ops_enabled
from tests.ops.conftest import force_torch_path


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
    calls = _spy(monkeypatch, "fastkd.ops.feature_align", "_reference")  # feature_align_reference, validated once
    with reference_ops():
        plain = ops.feature_align(s, t)
    assert calls == ["_reference"]
    torch.testing.assert_close(plain, fast)


def test_gather_tokens_routes_to_reference(monkeypatch):
    x, pos = torch.randn(2, 9, 4), torch.randn(9, 4)
    keep = torch.tensor([[0, 3, 8], [1, 2, 5]])
    fast = ops.gather_tokens(x, keep, pos)
    calls = _spy(monkeypatch, "fastkd.ops.gather_tokens", "_reference")  # gather_tokens_reference, validated once
    with reference_ops():
        plain = ops.gather_tokens(x, keep, pos)
    assert calls == ["_reference"]
    torch.testing.assert_close(plain, fast)


def test_token_relation_routes_to_reference(monkeypatch):
    q_s, k_s, q_t, k_t = (torch.randn(1, 2, 7, 8) for _ in range(4))
    fast = ops.token_relation(q_s, k_s, q_t, k_t)
    calls = _spy(monkeypatch, "fastkd.ops.token_relation", "_reference")  # token_relation_reference, validated once
    with reference_ops():
        plain = ops.token_relation(q_s, k_s, q_t, k_t)
    assert calls == ["_reference"]
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


# ---------------------------------------------------------------- the fallback, and no size rule

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


# case, (a small size, a large one)
CASES = {
    "feature_align": (_feature_align_case, (64, 4096)),
    "gather_tokens": (_gather_case, (16, 256)),
    "token_relation": (_relation_case, (8, 1024)),
}


@pytest.mark.parametrize("op", sorted(CASES))
def test_every_cpu_size_takes_the_kernel_and_the_fallback_matches_it(op, monkeypatch):
    case, sizes = CASES[op]
    references = _spy(monkeypatch, f"fastkd.ops.{op}", "_reference")
    for size in sizes:
        leaf, run = case(size)
        expected = run()
        assert references == [], (op, size)  # no size rule: the kernel at every size
        expected.sum().backward()
        grad, leaf.grad = leaf.grad.clone(), None
        with monkeypatch.context() as patch:
            force_torch_path(patch)
            with pytest.warns(RuntimeWarning, match=f"fastkd.ops.{op}: .*using its PyTorch reference"):
                out = run()
            assert references == ["_reference"]
            out.sum().backward()
        references.clear()
        assert out.dtype == expected.dtype
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-4, atol=1e-5)


def test_the_fallback_keeps_the_op_dtype_contract_under_cpu_autocast(monkeypatch):
    q_s, run = _relation_case(8)
    kernel = run()
    force_torch_path(monkeypatch)
    monkeypatch.setattr(ops._dispatch, "_warn_once", lambda op, reason: None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fallback = run()
    assert fallback.dtype == kernel.dtype == torch.float32
    torch.testing.assert_close(fallback, kernel, rtol=1e-4, atol=1e-5)  # no bf16 matmul inside
