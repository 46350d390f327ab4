"""Fixtures that choose the implementation an op runs on CPU, through the one dispatch rule."""

import pytest

from fastkd.ops import _dispatch


def force_torch_path(monkeypatch, reason: str = "the native extension fastkd._C is not built") -> None:
    """Make every op take its PyTorch path, as when the native extension is missing (the warning
    of each op is armed again)."""
    monkeypatch.setattr(_dispatch, "_missing_native", lambda name, device_type: reason)
    monkeypatch.setattr(_dispatch, "_warned", set())


@pytest.fixture(params=["native", "torch"])
def cpu_path(request, monkeypatch):
    """Run a CPU test on the C++ kernels of fastkd._C and on the PyTorch path (no warnings)."""
    if request.param == "native":
        if _dispatch.native_op("gather_tokens_cpu") is None:
            pytest.skip("fastkd._C is not built")
    else:
        force_torch_path(monkeypatch)
        monkeypatch.setattr(_dispatch, "_warn_once", lambda op, reason: None)
    return request.param


@pytest.fixture(autouse=True)
def _fused_kernels_at_every_size():
    """The op tests exercise the fused kernels on small inputs too: the CPU size rule (small CPU
    problems take the reference) is off here, and tested on its own in tests/ops/test_reference_mode.py."""
    from fastkd.ops import fused_kernels_always

    with fused_kernels_always():
        yield
