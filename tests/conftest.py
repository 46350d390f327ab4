"""Test-wide setup. TRITON_INTERPRET must be set before any Triton kernel is defined, so that
the kernels of ``fastkd.kernels`` run on CPU tensors in the tests.

The GPU suite (``tests/gpu``, marker ``gpu``) runs the compiled kernels instead: ``make gpu-test``
(or ``FASTKD_GPU_TESTS=1 pytest -m gpu tests/gpu``, or plain ``pytest -m gpu``) leaves the interpreter
off and runs only ``gpu`` tests; every other run skips the ``gpu`` tests.

``FASTKD_CACHE_DIR`` (where measured ``auto`` choices are cached, :mod:`fastkd.measured_choice`)
points at a fresh folder for the session, removed at its end: tests never read or write the user's
cache."""

import os
import shutil
import sys
import tempfile

GPU_SUITE = os.environ.get("FASTKD_GPU_TESTS", "0") not in ("", "0")
_INTERPRETER_SET_HERE = not GPU_SUITE and "TRITON_INTERPRET" not in os.environ
if not GPU_SUITE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ["FASTKD_CACHE_DIR"] = SESSION_CACHE_DIR = tempfile.mkdtemp(prefix="fastkd-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    global GPU_SUITE
    config.addinivalue_line("markers", "slow: takes minutes (still part of `make test`)")
    config.addinivalue_line(
        "markers", "gpu: GPU suite (tests/gpu): compiled Triton kernels on CUDA, run by `make gpu-test`"
    )
    # `pytest -m gpu` alone selects the GPU suite: drop the interpreter set above while no kernel is defined yet
    if not GPU_SUITE and (config.option.markexpr or "").strip() == "gpu" and _INTERPRETER_SET_HERE:
        if not any(name.startswith("fastkd.kernels") for name in sys.modules):
            del os.environ["TRITON_INTERPRET"]
            os.environ["FASTKD_GPU_TESTS"] = "1"
            GPU_SUITE = True


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if GPU_SUITE:
        skip = pytest.mark.skip(reason="not in the GPU suite (FASTKD_GPU_TESTS=1 runs only `gpu` tests)")
        selected = [item for item in items if item.get_closest_marker("gpu") is None]
    else:
        skip = pytest.mark.skip(reason="GPU suite: run it with `make gpu-test` (FASTKD_GPU_TESTS=1, no Triton interpreter)")
        selected = [item for item in items if item.get_closest_marker("gpu") is not None]
    for item in selected:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fake_timings(monkeypatch, tmp_path):
    """Measured ``auto`` choices from made-up timings, in a cache folder of the test's own: set
    ``fake.seconds[candidate]`` (1.0 where unset); ``fake.calls`` lists each measurement's candidate
    names. The process's decisions are dropped before and after the test."""
    from types import SimpleNamespace

    from fastkd import measured_choice

    fake = SimpleNamespace(seconds={}, calls=[], cache=tmp_path / "fastkd-cache")
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(fake.cache))

    def measure(candidates, device):
        fake.calls.append(sorted(candidates))
        return {name: fake.seconds.get(name, 1.0) for name in candidates}

    monkeypatch.setattr(measured_choice, "measure", measure)
    measured_choice.forget()
    yield fake
    measured_choice.forget()
