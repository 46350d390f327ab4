"""Fixtures that choose the implementation an op runs on CPU, through the one dispatch rule."""

import pytest

from fastkd.ops import _dispatch


def force_torch_path(monkeypatch, reason: str = "the native extension fastkd._C is not built") -> None:
    """Make every op take its fallback, the reference, as when the native extension is missing (the
    warning of each op is armed again)."""
    monkeypatch.setattr(_dispatch, "_missing_native", lambda name, device_type: reason)
    monkeypatch.setattr(_dispatch, "_warned", set())


@pytest.fixture(params=["native", "torch"])
def cpu_path(request, monkeypatch):
    """Run a CPU test on the C++ kernels of fastkd._C and on the fallback (the reference, no warnings)."""
    if request.param == "native":
        if _dispatch.native_op("gather_tokens") is None:
            pytest.skip("fastkd._C is not built")
    else:
        force_torch_path(monkeypatch)
        monkeypatch.setattr(_dispatch, "_warn_once", lambda op, reason: None)
    return request.param

