"""Test-wide setup. TRITON_INTERPRET must be set before any Triton kernel is defined, so that
the kernels of ``fastkd.kernels`` run on CPU tensors in the tests.

The GPU suite (``tests/gpu``, marker ``gpu``) runs the compiled kernels instead: ``make gpu-test``
(or ``FASTKD_GPU_TESTS=1 pytest -m gpu tests/gpu``, or plain ``pytest -m gpu``) leaves the interpreter
off and runs only ``gpu`` tests; every other run skips the ``gpu`` tests."""

import os
import sys

GPU_SUITE = os.environ.get("FASTKD_GPU_TESTS", "0") not in ("", "0")
_INTERPRETER_SET_HERE = not GPU_SUITE and "TRITON_INTERPRET" not in os.environ
if not GPU_SUITE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

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
