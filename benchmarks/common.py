"""Shared measurement helpers of the benchmarks.

Timing: median and spread (p10/p90) of wall-clock repeats after warm-up; on CUDA,
``triton.testing.do_bench``. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the
running sum of every allocation and free the PyTorch profiler records (``profile_memory=True``),
i.e. the peak of memory allocated by the measured call beyond what was live before it.

Records: every benchmark's timed rows share one schema: ``variant``, ``median_ms``, ``p10_ms``,
``p90_ms``, ``peak_MiB`` (the measured call's extra memory), ``bytes_moved_MiB`` (where a model of
the bytes a kernel moves exists), ``device`` and ``dtype``, beside the benchmark's own problem keys
(shape, model, method) and ratios.

Reporting (machine info, Markdown tables, result files) lives in :mod:`fastkd.reporting` and the
shared command line in :mod:`fastkd.benchmarks.arguments`.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fastkd.reporting import markdown_table, write_results



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

    if not torch.cuda.is_available():
        # the profiler's kineto library logs GPU look-up errors ("gpuGetDeviceCount failed") and trace
        # markers on stderr even for a CPU-only profile: silence it unless the user set a level
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
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


def report_results(name: str, records: list[dict], columns: list[str], title: str, *, device: str,
                   out_dir: str | os.PathLike, plot: Callable[[list[dict], Path], Any]) -> str:
    """The end of a benchmark: ``<name>.json`` and ``<name>.md`` (heading ``## <title> (<device>,
    <threads> threads)`` over the Markdown table of ``records`` in ``columns``) written into
    ``out_dir`` by :func:`fastkd.reporting.write_results`, ``plot(records, out_dir / "<name>.png")``,
    and the table printed; returns the table."""
    table = markdown_table(records, columns)
    heading = f"## {title} ({device}, {torch.get_num_threads()} threads)"
    write_results(name, records, f"{heading}\n\n{table}", out_dir=out_dir)
    plot(records, Path(out_dir) / f"{name}.png")
    print(table)
    return table


def lowest_of_runs(runs: list[list[dict]], key_fields: tuple[str, ...], ratio: str) -> list[dict]:
    """The records of the first run, each record that has a numeric ``ratio`` replaced by its run
    (records matched by ``key_fields``) with the lowest ``ratio`` (a ratio that survives a re-run)
    and given ``<ratio>_runs``, every run's value. Other records come from run 1."""
    def key(record):
        return tuple(record.get(field) for field in key_fields)

    def numeric(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    seen: dict[tuple, list[dict]] = {}
    for records in runs:
        for record in records:
            if numeric(record.get(ratio)):
                seen.setdefault(key(record), []).append(record)
    combined = []
    for record in runs[0]:
        matches = seen.get(key(record))
        if matches:
            record = {**min(matches, key=lambda r: r[ratio]), f"{ratio}_runs": [round(r[ratio], 3) for r in matches]}
        combined.append(record)
    return combined
