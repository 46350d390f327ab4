import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastkd.models import linear
from fastkd.models.linear import MeasuredLinear, adopt_measured_linear, backend_for, onednn_linear
from fastkd.ops import reference_ops

pytestmark = pytest.mark.skipif(not linear.onednn_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 5, 33), (70, 129)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear_forward_and_backward(shape, bias):
    g = torch.Generator().manual_seed(1)
    fan_out = 19
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(fan_out, shape[-1], generator=g, requires_grad=True)
    b = torch.randn(fan_out, generator=g, requires_grad=True) if bias else None
    inputs = (x, w) + ((b,) if bias else ())
    y, ref = onednn_linear(x, w, b), F.linear(x, w, b)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn(ref.shape, generator=g)
    for got, want in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(ref, inputs, dy)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_onednn_linear_passes_opcheck_and_compiles_in_one_graph():
    x, w, b = torch.randn(4, 6, 10, requires_grad=True), torch.randn(7, 10, requires_grad=True), torch.randn(7)
    torch.library.opcheck(onednn_linear, (x, w, b))
    compiled = torch.compile(lambda x: onednn_linear(x, w, b).square().sum(), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), F.linear(x, w, b).square().sum(), rtol=1e-5, atol=1e-4)


def test_decision_follows_faked_timings_per_class(fake_timings, monkeypatch):
    monkeypatch.delenv("FASTKD_LINEAR", raising=False)
    w = torch.randn(8, 4)
    fake_timings.seconds = {"blas": 1.0, "onednn": 2.0}
    assert backend_for(torch.randn(3, 4), w) == "blas"
    assert fake_timings.calls == [["blas", "onednn"]]
    assert backend_for(torch.randn(5, 4), w) == "blas"  # same class (few rows, grad): no new measurement
    assert len(fake_timings.calls) == 1
    fake_timings.seconds = {"blas": 2.0, "onednn": 1.0}
    assert backend_for(torch.randn(linear.FEW_ROWS + 1, 4), w) == "onednn"  # many rows: its own class
    with torch.no_grad():
        assert backend_for(torch.randn(3, 4), w) == "onednn"  # no-grad: its own class
    assert len(fake_timings.calls) == 3
    assert "linear | float32 train few rows" in (fake_timings.cache / "measured_choices.json").read_text()


def test_explicit_setting_wins_and_other_inputs_run_f_linear(fake_timings, monkeypatch):
    w = torch.randn(8, 4)
    fake_timings.seconds = {"blas": 2.0, "onednn": 1.0}
    monkeypatch.setenv("FASTKD_LINEAR", "blas")
    assert backend_for(torch.randn(3, 4), w) == "blas"
    monkeypatch.setenv("FASTKD_LINEAR", "onednn")
    assert backend_for(torch.randn(3, 4), w) == "onednn"
    assert fake_timings.calls == []
    assert backend_for(torch.randn(3, 4, dtype=torch.bfloat16), w.bfloat16()) == "blas"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert backend_for(torch.randn(3, 4), w) == "blas"
    with reference_ops():
        assert backend_for(torch.randn(3, 4), w) == "blas"
    monkeypatch.setenv("FASTKD_LINEAR", "mkl")
    with pytest.raises(ValueError, match="FASTKD_LINEAR"):
        backend_for(torch.randn(3, 4), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("choice", ["blas", "onednn"])
def test_adopted_module_keeps_state_and_matches_nn_linear(dtype, choice, monkeypatch):
    monkeypatch.setenv("FASTKD_LINEAR", choice)
    plain = nn.Sequential(nn.Linear(13, 31), nn.GELU(), nn.Sequential(nn.Linear(31, 5, bias=False))).to(dtype)
    measured = adopt_measured_linear(nn.Sequential(nn.Linear(13, 31), nn.GELU(),
                                                   nn.Sequential(nn.Linear(31, 5, bias=False)))).to(dtype)
    measured.load_state_dict(plain.state_dict())
    assert [type(m) for m in measured.modules() if isinstance(m, nn.Linear)] == [MeasuredLinear] * 2
    assert measured.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(3, 9, 13, dtype=dtype)
    out, ref = measured(x), plain(x)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    out.float().square().sum().backward()
    ref.float().square().sum().backward()
    for a, b in zip(measured.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **({"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else tol))
