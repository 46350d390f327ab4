import pytest
import torch

import fastkd.models.attention as attention_module
from fastkd.models.attention import attention, default_backend, resolve_backend

TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _reference(q, k, v, scale):
    attn = torch.softmax((q.double() @ k.double().transpose(-2, -1)) * scale, dim=-1)
    return attn @ v.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("shape", [(2, 3, 17, 8), (1, 1, 1, 5), (3, 2, 197, 16)])
def test_backend_matches_reference_forward_and_backward(backend, dtype, shape):
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    scale = shape[-1] ** -0.5
    out = attention(q, k, v, backend=backend)
    ref = _reference(q, k, v, scale)
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[dtype])
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), **TOLERANCES[dtype])


def test_sdpa_and_math_agree_with_custom_scale_and_cross_lengths():
    q = torch.randn(2, 4, 7, 8, requires_grad=True)
    k, v = torch.randn(2, 4, 11, 8, requires_grad=True), torch.randn(2, 4, 11, 6, requires_grad=True)
    a = attention(q, k, v, backend="sdpa", scale=0.3)
    b = attention(q, k, v, backend="math", scale=0.3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), (q, k, v))
    gb = torch.autograd.grad(b.square().sum(), (q, k, v))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_explicit_xformers_on_cpu_raises():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="xformers"):
        attention(q, q, q, backend="xformers")


def test_xformers_backend_passes_bmhk_layout_and_scale(monkeypatch):
    """xformers takes [B, N, H, d]; a stand-in with that contract checks fastkd's layout and scale."""
    calls = []

    class FakeXformersOps:
        @staticmethod
        def memory_efficient_attention(q, k, v, p=0.0, scale=None):
            calls.append((tuple(q.shape), p, scale))
            attn = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) * scale, dim=-1)
            return torch.einsum("bhnm,bmhd->bnhd", attn, v)

    monkeypatch.setattr(attention_module, "_xformers_ops", lambda: FakeXformersOps)
    monkeypatch.setattr(attention_module, "_xformers_unavailable_reason", lambda device: None)
    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)
    out = attention(q, k, v, backend="xformers", scale=0.2)
    torch.testing.assert_close(out, attention(q, k, v, backend="math", scale=0.2))
    assert calls == [((2, 9, 4, 8), 0.0, 0.2)]


def test_auto_equals_the_backend_it_resolves_to():
    """``auto`` is measured on the running machine (tests/test_measured_choice.py); whatever it
    picks computes the same attention as that backend named explicitly."""
    cpu = torch.device("cpu")
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
    for dtype in (torch.float32, torch.bfloat16):
        qd, kd, vd = (t.to(dtype) for t in (q, k, v))
        name = resolve_backend("auto", cpu, dtype, tokens=5, grad=False)
        assert torch.equal(attention(qd, kd, vd, backend="auto"), attention(qd, kd, vd, backend=name))


def test_environment_variable_sets_default(monkeypatch):
    monkeypatch.setenv("FASTKD_ATTENTION", "math")
    assert default_backend() == "math"
    monkeypatch.setenv("FASTKD_ATTENTION", "nonsense")
    with pytest.raises(ValueError, match="FASTKD_ATTENTION"):
        default_backend()
    monkeypatch.delenv("FASTKD_ATTENTION")
    assert default_backend() == "auto"


def test_input_validation():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="backend"):
        attention(q, q, q, backend="flash")
    with pytest.raises(ValueError, match="q"):
        attention(q[0], q, q)
    with pytest.raises(ValueError, match="do not match"):
        attention(q, torch.randn(1, 2, 4, 4), q)
    with pytest.raises(TypeError, match="dtype"):
        attention(q, q.double(), q)
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, q, q, dropout_p=1.0)
