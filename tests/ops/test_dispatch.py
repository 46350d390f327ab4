"""The one dispatch rule of the ops: kernel or reference, the one warning, autocast off around the
fallback and the CUDA kernels, the inputs' CUDA device around every CUDA kernel."""

import contextlib
import warnings

import pytest
import torch

from fastkd.ops import _dispatch, ema_, feature_align, gather_tokens, random_keep, token_relation
from fastkd.ops import feature_align_reference, gather_tokens_reference, token_relation_reference
from fastkd.ops._dispatch import Route, implementation_context
from tests.ops.conftest import force_torch_path


def _run(route=None, device=torch.device("cpu"), dtypes=(torch.float32,), args=()):
    """What ``route`` (default: the ema_ route) runs for these inputs: "kernel" or "reference"."""
    route = route or Route("ema_")
    return route.run(lambda *a: "reference", args, device, dtypes, lambda *a: "kernel")


CUDA, CPU, META = torch.device("cuda", 0), torch.device("cpu"), torch.device("meta")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_training_dtypes_run_the_triton_kernel(dtype):
    assert _run(device=CUDA, dtypes=(dtype,)) == "kernel"


def test_float64_on_cuda_runs_the_reference_for_every_op():
    assert _run(device=CUDA, dtypes=(torch.float32, torch.float64)) == "reference"
    assert _run(Route("feature_align"), CUDA, (torch.float64,)) == "reference"


def test_gpu_size_limit_runs_the_reference_silently():
    route = Route("ema_", gpu_limit=lambda n: "too wide" if n > 4 else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _run(route, CUDA, args=(5,)) == "reference"
    assert _run(route, CUDA, args=(4,)) == "kernel"


def test_cpu_runs_the_native_kernel_and_other_devices_the_reference():
    assert _run(device=CPU) == "kernel"
    assert _run(device=META) == "reference"
    assert Route("ema_").native is torch.ops.fastkd.ema_.default


def test_reference_ops_route_every_device_to_the_reference():
    with _dispatch.reference_ops():
        assert _run(device=CPU) == _run(device=CUDA) == "reference"


def test_missing_native_kernel_warns_once_per_op_and_reason(monkeypatch):
    force_torch_path(monkeypatch, reason="fastkd._C is missing (test)")
    with pytest.warns(RuntimeWarning, match=r"fastkd.ops.ema_: fastkd._C is missing \(test\); using its PyTorch reference"):
        assert _run() == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _run() == "reference"
    with pytest.warns(RuntimeWarning, match="fastkd.ops.other"):
        assert _run(Route("other")) == "reference"


def test_the_fallback_runs_with_autocast_off(monkeypatch):
    force_torch_path(monkeypatch)
    monkeypatch.setattr(_dispatch, "_warn_once", lambda op, reason: None)
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Route("ema_").run(lambda: seen.append(torch.is_autocast_enabled("cpu")), (), CPU, (torch.float32,))
        with _dispatch.reference_ops():  # a user's plain code: under the autocast the user chose
            Route("ema_").run(lambda: seen.append(torch.is_autocast_enabled("cpu")), (), CPU, (torch.float32,))
    assert seen == [False, True]


def _run_all_ops():
    """One call of each of the four ops (forward and, where differentiable, backward)."""
    s = torch.randn(5, 16, requires_grad=True)
    feature_align(s, torch.randn(5, 16)).sum().backward()
    x = torch.randn(2, 6, 8, requires_grad=True)
    gather_tokens(x, random_keep(2, 6, 3)[0]).sum().backward()
    q = torch.randn(1, 2, 7, 4, requires_grad=True)
    token_relation(q, q.detach() * 1.0, torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)).sum().backward()
    ema_([torch.zeros(3)], [torch.ones(3)], 0.5)


def test_every_op_warns_once_without_the_extension(monkeypatch):
    force_torch_path(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_all_ops()
        _run_all_ops()
    ops = sorted(str(w.message).split(":")[0] for w in caught if issubclass(w.category, RuntimeWarning))
    assert ops == sorted(f"fastkd.ops.{op}" for op in ("feature_align", "gather_tokens", "token_relation", "ema_"))


def test_implementation_context_disables_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with implementation_context(CPU):
            assert not torch.is_autocast_enabled("cpu")
            assert torch.mm(torch.randn(2, 2), torch.randn(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")


def test_implementation_context_sets_the_inputs_cuda_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())
    with implementation_context(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    if request.param == "torch":
        force_torch_path(monkeypatch)
        monkeypatch.setattr(_dispatch, "_warn_once", lambda op, reason: None)
    return request.param


def _grads(fn, *inputs, autocast=False):
    """Forward (under CPU bf16 autocast with ``autocast``) and backward outside it, as torch
    recommends (the fallback's own backward would otherwise run under the caller's autocast)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*inputs)
    out.backward(torch.ones_like(out))
    return out.detach(), [x.grad.clone() for x in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ops_under_cpu_autocast_match_their_reference(path, dtype):
    """Under torch.autocast(cpu, bf16) each op keeps its dtype contract and its values."""
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    q_s, k_s = (torch.randn(2, 3, 19, 8, dtype=dtype, requires_grad=True) for _ in range(2))
    q_t, k_t = torch.randn(2, 6, 19, 8, dtype=dtype), torch.randn(2, 6, 19, 8, dtype=dtype)
    s, t = torch.randn(7, 33, dtype=dtype, requires_grad=True), torch.randn(7, 33, dtype=dtype)
    x, keep = torch.randn(3, 9, 5, dtype=dtype, requires_grad=True), random_keep(3, 9, 4)[0]
    pos = torch.randn(9, 5, dtype=dtype, requires_grad=True)
    cases = [
        (lambda a, b: token_relation(a, b, q_t, k_t, head_map="mean"),
         lambda a, b: token_relation_reference(a, b, q_t, k_t, head_map="mean"), (q_s, k_s)),
        (lambda a: feature_align(a, t), lambda a: feature_align_reference(a, t), (s,)),
        (lambda a, p: gather_tokens(a, keep, p), lambda a, p: gather_tokens_reference(a, keep, p), (x, pos)),
    ]
    for ours, reference, inputs in cases:
        out, grads = _grads(ours, *inputs, autocast=True)
        for x_ in inputs:
            x_.grad = None
        ref_out, ref_grads = _grads(reference, *inputs)
        for x_ in inputs:
            x_.grad = None
        assert out.dtype == ref_out.dtype
        torch.testing.assert_close(out, ref_out, **tol)
        for g, r in zip(grads, ref_grads):
            assert g.dtype == r.dtype
            torch.testing.assert_close(g, r, **tol)


def test_ema_under_cpu_autocast_keeps_the_teacher_dtype(path):
    teacher, student = [torch.zeros(5)], [torch.ones(5, dtype=torch.bfloat16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gap = ema_(teacher, student, 0.75, return_gap=True)
    assert teacher[0].dtype == torch.float32
    torch.testing.assert_close(teacher[0], torch.full((5,), 0.25))
    assert gap.diff_sq == pytest.approx(5.0)
