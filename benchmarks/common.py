"""Shared measurement and reporting helpers for the benchmarks.

Timing: median and spread (p10/p90) of wall-clock repeats after warm-up; on CUDA,
``triton.testing.do_bench``. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the
running sum of every allocation and free the PyTorch profiler records (``profile_memory=True``),
i.e. the peak of memory allocated by the measured call beyond what was live before it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

RESULTS_DIR = Path(os.environ.get("FASTKD_BENCH_DIR", Path(__file__).resolve().parent / "results"))


def time_fn(fn: Callable[[], Any], *, repeats: int = 10, warmup: int = 2, device: str = "cpu") -> dict:
    """Time ``fn()``; returns ``{"median_ms", "p10_ms", "p90_ms", "repeats"}``."""
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.1, 0.9])
        return {"median_ms": ms[0], "p10_ms": ms[1], "p90_ms": ms[2], "repeats": None}
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) >= 2 else [samples[0]] * 9
    return {"median_ms": statistics.median(samples), "p10_ms": q[0], "p90_ms": q[-1], "repeats": repeats}



def time_alternating(runs: dict[str, Callable[[], Any]], *, rounds: int, repeats: int, device: str = "cpu") -> dict:
    """``{name: time_fn timing}`` for every run, timed in ``rounds`` alternating rounds of ``repeats``
    calls (one warm-up call each), keeping each run's round with the lowest median: load from other
    processes hits every variant alike."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, run in runs.items():
            timing = time_fn(run, repeats=repeats, warmup=1, device=device)
            if name not in best or timing["median_ms"] < best[name]["median_ms"]:
                best[name] = timing
    return best

def peak_memory_bytes(fn: Callable[[], Any], *, device: str = "cpu") -> int:
    """Peak bytes allocated by ``fn()`` beyond what was allocated before the call."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return int(peak)


def machine_info() -> dict:
    """CPU model, cores, GPU name and library versions, recorded with every result file."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for module in ("triton", "nvidia.dali", "timm"):
        try:
            info[module.split(".")[-1]] = __import__(module, fromlist=["__version__"]).__version__
        except Exception:  # noqa: BLE001 - a missing optional library is recorded as None
            info[module.split(".")[-1]] = None
    return info


def markdown_table(rows: Iterable[dict], columns: list[str]) -> str:
    """Render ``rows`` as a GitHub Markdown table with the given column order."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, records: list[dict], markdown: str, *, out_dir: Path | None = None) -> Path:
    """Write ``<name>.json`` (machine info + one record per measurement) and ``<name>.md``
    atomically under the results directory; returns the JSON path."""
    out = Path(out_dir or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), "records": records}
    for suffix, text in ((".json", json.dumps(payload, indent=2)), (".md", markdown + "\n")):
        path = out / f"{name}{suffix}"
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return out / f"{name}.json"


def bench_parser(description: str, quick_help: str, *, rounds_help: str | None = None,
                 device_help: str | None = None):
    """The command line every benchmark shares: ``--quick``, ``--device cpu|cuda`` (help text
    ``device_help``) and, with ``rounds_help``, ``--rounds``; extend it with the benchmark's own options."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help=device_help)
    if rounds_help is not None:
        parser.add_argument("--rounds", type=int, default=None, help=rounds_help)
    return parser


def parse_bench_args(parser, argv: list[str] | None):
    """Parse ``argv``; exit with a clear message for ``--device cuda`` without CUDA or ``--rounds`` < 1."""
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    if getattr(args, "rounds", None) is not None and args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    return args
