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
