"""Fixtures and the report of the GPU suite (``make gpu-test``, marker ``gpu``).

Every test here is one check. ``fig`` records its figures (error against the float64 CPU truth and
the op's reference, relative to the largest reference value; or a time); at the end of the session
one ``PASS|FAIL|SKIP name: figure`` line per check and a summary are printed, and written to the
file named by ``FASTKD_GPU_SUMMARY`` when set. Without CUDA (or under the Triton interpreter) every
check skips with its reason. ``FASTKD_GPU_DEADLINE`` (unix time) or ``FASTKD_GPU_BUDGET_S`` (seconds
from the session start, default 420) bounds the run: checks that would start later are skipped."""

from __future__ import annotations

import gc
import math
import os
import platform
import time
from pathlib import Path

import pytest
import torch

SESSION_START = time.time()
_RESULTS: list[tuple[str, str, str]] = []  # (PASS|FAIL|SKIP, name, figure), in run order


def suite_on() -> bool:
    return os.environ.get("FASTKD_GPU_TESTS", "0") not in ("", "0")


def deadline() -> float:
    if os.environ.get("FASTKD_GPU_DEADLINE"):
        return float(os.environ["FASTKD_GPU_DEADLINE"])
    return SESSION_START + float(os.environ.get("FASTKD_GPU_BUDGET_S", "420"))


def seconds_left() -> float:
    return deadline() - time.time()


def require_time(seconds: float, what: str = "this check") -> None:
    """Skip when fewer than ``seconds`` remain of the suite's time budget."""
    left = seconds_left()
    if left < seconds:
        pytest.skip(f"time budget of the suite used up ({left:.0f} s left, {what} needs ~{seconds:.0f} s)")


def require_free_memory(nbytes: float, device: torch.device | str = "cuda") -> None:
    """Skip unless ``nbytes`` of GPU memory are free on ``device`` (``torch.cuda.mem_get_info``)."""
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(torch.device(device))
    if free < nbytes:
        pytest.skip(f"needs {nbytes / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} of "
                    f"{total / 2**30:.1f} GiB free")


class Figures:
    """What a check measured: comparisons (worst error / tolerance) and notes, plus its time."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.worst: tuple[float, str, float, float] | None = None  # (err / tol, label, err, tol)
        self.notes: list[str] = []

    def _record(self, label: str, err: float, tol: float) -> None:
        if math.isnan(err) or math.isinf(err):
            ratio = math.inf
        else:
            ratio = err / tol if tol > 0 else (0.0 if err == 0 else math.inf)
        if self.worst is None or not ratio <= self.worst[0]:
            self.worst = (ratio, label, err, tol)
        if not err <= tol:
            raise AssertionError(f"{label}: error {err:.3g} > tolerance {tol:.3g}")

    def compare(self, label: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
        """``max |got - want| / max |want|`` (computed in float64 on the CPU) must be <= ``tol``;
        non-finite values fail. Returns the error."""
        got = got.detach()
        want = want.detach()
        assert tuple(got.shape) == tuple(want.shape), f"{label}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        got64 = got.to("cpu", torch.float64)
        want64 = want.to("cpu", torch.float64)
        if not bool(torch.isfinite(got64).all()):
            self._record(label, math.inf, tol)
        scale = max(float(want64.abs().max()) if want64.numel() else 0.0, 1e-30)
        err = float((got64 - want64).abs().max()) / scale if got64.numel() else 0.0
        self._record(label, err, tol)
        return err

    def compare_elementwise(self, label: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
        """Every element within ``atol + rtol * |want|``; the figure is the worst ratio to that bound."""
        got64 = got.detach().to("cpu", torch.float64)
        want64 = want.detach().to("cpu", torch.float64)
        assert got64.shape == want64.shape, f"{label}: shape {tuple(got64.shape)} != {tuple(want64.shape)}"
        if got64.numel() == 0:
            return
        bound = atol + rtol * want64.abs()
        ratio = float(((got64 - want64).abs() / bound).max())
        if not math.isfinite(ratio) or not bool(torch.isfinite(got64).all()):
            ratio = math.inf
        self._record(label + " (err / (atol + rtol |want|))", ratio, 1.0)

    def compare_scalar(self, label: str, got: float, want: float, rtol: float, atol: float) -> None:
        err = abs(got - want) if math.isfinite(got) and math.isfinite(want) else math.inf
        self.note(f"{label} {got:.6g} vs {want:.6g}")
        self._record(label + " |diff|", err, atol + rtol * abs(want))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def text(self) -> str:
        parts = []
        if self.worst is not None:
            _, label, err, tol = self.worst
            parts.append(f"max err {err:.3g} (tol {tol:.3g}, {label})")
        parts += self.notes
        parts.append(f"{time.perf_counter() - self.start:.2f} s")
        return "; ".join(parts)


@pytest.fixture
def fig(request) -> Figures:
    figures = Figures()
    request.node._gpu_figures = figures
    return figures


@pytest.fixture(scope="session", autouse=True)
def _cuda_required():
    """Skip every check without CUDA or under the Triton interpreter (the suite runs compiled kernels)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: the GPU suite runs the compiled kernels (use `make gpu-test`)")
    if not torch.cuda.is_available():
        pytest.skip(f"CUDA is not available (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
                    f"{torch.cuda.device_count()} devices)")
    yield


@pytest.fixture(autouse=True)
def _per_check(_cuda_required):
    """fp32 matmuls without TF32 during a check; memory released after it."""
    require_time(5)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
        gc.collect()
        torch.cuda.empty_cache()


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not suite_on() or item.get_closest_marker("gpu") is None:
        return
    figures = getattr(item, "_gpu_figures", None)
    if report.skipped and report.when in ("setup", "call"):
        _RESULTS.append(("SKIP", item.name, _skip_reason(report)))
    elif report.when == "call":
        text = figures.text() if figures is not None else f"{report.duration:.2f} s"
        if report.failed:
            message = call.excinfo.exconly().strip().splitlines()[0] if call.excinfo else "failed"
            text = f"{message[:300]} | {text}"
        _RESULTS.append(("PASS" if report.passed else "FAIL", item.name, text))
    elif report.failed:  # an error in setup or teardown
        message = call.excinfo.exconly().strip().splitlines()[0] if call.excinfo else "error"
        _RESULTS.append(("FAIL", item.name, f"{report.when} error: {message[:300]}"))


def _environment() -> str:
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for module in ("triton", "timm"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except Exception:  # noqa: BLE001 - a missing library is reported, not raised
            versions.append(f"{module} missing")
    if torch.cuda.is_available():
        versions.append(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    else:
        versions.append("no CUDA")
    return ", ".join(versions)


def pytest_terminal_summary(terminalreporter):
    if not suite_on() or not _RESULTS:
        return
    counts = {status: sum(1 for s, _, _ in _RESULTS if s == status) for status in ("PASS", "FAIL", "SKIP")}
    lines = [f"{status} {name}: {figure}" for status, name, figure in _RESULTS]
    lines.append(f"GPU suite: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in "
                 f"{time.time() - SESSION_START:.0f} s ({_environment()})")
    terminalreporter.section("fastkd GPU suite")
    for line in lines:
        terminalreporter.write_line(line)
    if os.environ.get("FASTKD_GPU_SUMMARY"):
        path = Path(os.environ["FASTKD_GPU_SUMMARY"])
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write("\n".join(lines) + "\n")
