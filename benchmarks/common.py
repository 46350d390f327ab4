"""Shared measurement helpers of the benchmarks. Every timed record shares one schema: ``variant``,
``median_ms``, ``p10_ms``, ``p90_ms``, ``peak_MiB``, ``bytes_moved_MiB`` (where a model of the bytes
a kernel moves exists), ``device`` and ``dtype``, beside the benchmark's problem keys and ratios."""

from __future__ import annotations

import importlib
import itertools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fastkd.reporting import cpu_info, markdown_table, results_dir, write_results

TIMING_KEYS = ("median_ms", "p10_ms", "p90_ms")
VIT_WIDTHS, NUM_TOKENS = {"vit_small": 384, "vit_base": 768, "vit_large": 1024}, 197  # the op benchmarks' ViT-S/B/L
OP_COLUMNS = ["model", "shape", "variant", *TIMING_KEYS, "speedup", "peak_MiB", "memory_ratio", "bytes_moved_MiB"]


def time_fn(fn: Callable[[], Any], *, repeats: int = 10, warmup: int = 2, device: str = "cpu") -> dict:
    """``{"median_ms", "p10_ms", "p90_ms", "repeats"}`` of ``fn()`` after warm-up (CUDA: ``do_bench``)."""
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
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) >= 2 else [samples[0]] * 9
    return {"median_ms": statistics.median(samples), "p10_ms": q[0], "p90_ms": q[-1], "repeats": repeats}


def time_alternating(runs: dict[str, Callable[[], Any]], *, rounds: int, repeats: int, device: str = "cpu") -> dict:
    """``{name: time_fn timing}``, timed in ``rounds`` alternating rounds of ``repeats`` calls, each
    run's round with the lowest median kept (load from other processes hits every variant alike)."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, run in runs.items():
            timing = time_fn(run, repeats=repeats, warmup=1, device=device)
            if name not in best or timing["median_ms"] < best[name]["median_ms"]:
                best[name] = timing
    return best


def _quiet_cpu_profiler() -> None:
    """Silence kineto's GPU look-up errors on stderr without CUDA, unless the user set a level."""
    if not torch.cuda.is_available():
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def peak_memory_bytes(fn: Callable[[], Any], *, device: str = "cpu") -> int:
    """Peak bytes ``fn()`` allocates beyond what was live before (CPU: the running sum of the
    allocations and frees the profiler records)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    _quiet_cpu_profiler()
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


def top_ops(prof, n: int = 5, *, cuda: bool = False) -> list[dict]:
    """``{"op", "self_ms", "calls"}`` of the ``n`` ops with the most self time (CUDA: kernel time),
    the trainer's ``fastkd/`` phase ranges left out."""
    self_us = (lambda a: a.self_device_time_total) if cuda else (lambda a: a.self_cpu_time_total)
    ops = sorted((a for a in prof.key_averages() if not a.key.startswith("fastkd/")), key=self_us, reverse=True)
    return [{"op": a.key, "self_ms": self_us(a) / 1e3, "calls": a.count} for a in ops[:n]]


def profile_top_ops(step: Callable[[], Any], n: int = 5) -> list[dict]:
    """:func:`top_ops` of one CPU-profiled call of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    _quiet_cpu_profiler()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return top_ops(prof, n)


def grad_step(fn: Callable, inputs: tuple, *args) -> Callable[[], Any]:
    """One forward + backward of ``fn(*inputs, *args)`` into ``inputs`` per call, against a fixed
    random upstream gradient (none for a scalar); the first forward (warm-up, compilation) runs here."""
    out = fn(*inputs, *args)
    grad = torch.randn_like(out) if out.dim() else None
    return lambda: torch.autograd.grad(fn(*inputs, *args), inputs, grad)


def compare_variants(problem: dict, variants: dict[str, Callable[[], Any]], *, device: str, dtype: torch.dtype,
                     rounds: int, repeats: int, baseline: str | dict[str, str], moved: dict | None = None,
                     memory_offset: int = 0, memory: bool = True) -> list[dict]:
    """One record per variant: ``problem``'s keys, the shared schema (peak less ``memory_offset``
    bytes, e.g. input gradients; ``moved``: variant -> bytes), ``baseline`` (one, or variant -> its
    own), ``speedup`` = baseline time / variant time, ``memory_ratio`` = variant / baseline peak."""
    timings = time_alternating(variants, rounds=rounds, repeats=repeats, device=device)
    peaks = {name: peak_memory_bytes(run, device=device) - memory_offset if memory else None
             for name, run in variants.items()}
    records = []
    for name in variants:
        base = baseline if isinstance(baseline, str) else baseline[name]
        records.append({
            **problem, "variant": name, **{k: timings[name][k] for k in TIMING_KEYS}, "baseline": base,
            "speedup": timings[base]["median_ms"] / timings[name]["median_ms"],
            "peak_MiB": peaks[name] / 2**20 if memory else None,
            "memory_ratio": peaks[name] / peaks[base] if memory and peaks[base] > 0 else None,
            "bytes_moved_MiB": (moved or {}).get(name, 0) / 2**20 or None, "device": device,
            "dtype": str(dtype).removeprefix("torch."),
        })
    return records


def trainer_step(method, batch, workdir: Path, *, device: str = "cpu", optim=None, **train) -> Callable[[], Any]:
    """One ``Trainer.train_step`` per call, returning the loss (``train`` overrides the
    ``TrainConfig``; fp32 on CPU, bf16 on CUDA); ``step.teacher_precision`` / ``.compiled``: the trainer's."""
    from fastkd.train.options import OptimConfig, TrainConfig
    from fastkd.train.trainer import Trainer

    config = TrainConfig(device=device, precision="bf16" if device == "cuda" else "fp32", epochs=1,
                         output_dir=str(workdir), progress=False, tensorboard=False, **train)
    trainer = Trainer(method, [batch] * 1000, batch_size=int(batch.views[0].shape[0]), train=config,
                      optim=optim or OptimConfig())
    batches, steps = itertools.repeat(batch), itertools.count()

    def step():
        return trainer.train_step(batches, next(steps) % trainer.total_steps)[1]["loss"]

    step.teacher_precision, step.compiled = trainer.teacher_precision, trainer.compiled
    return step


def image_batch(views: list[torch.Tensor]):
    """A :class:`fastkd.data.batch.Batch` of ``views`` without labels (-1) and indices ``0 .. B-1``."""
    from fastkd.data.batch import Batch

    n, device = views[0].shape[0], views[0].device
    return Batch(views, torch.full((n,), -1, dtype=torch.long, device=device), torch.arange(n, device=device))


def machine_line(load: str | None) -> str:
    """The header sentence of a timing report: load average at the start and CPU."""
    cpu, isa = cpu_info()
    return f"Machine load average at the start (1 / 5 / 15 min): {load or 'unknown'}. CPU: {cpu} " \
           f"(ISA: {' '.join(isa) or 'unknown'})."


def report_results(name: str, records: list[dict], columns: list[str], title: str, *, device: str,
                   out_dir: str | os.PathLike, plot: Callable[[list[dict], Path], Any] | None = None) -> str:
    """Write ``<name>.json`` / ``<name>.md`` (``## <title> (<device>, <threads> threads)`` over the
    table of ``records`` in ``columns``) and ``plot``'s ``<name>.png`` into ``out_dir``; print and
    return the table."""
    table = markdown_table(records, columns)
    heading = f"## {title} ({device}, {torch.get_num_threads()} threads)"
    write_results(name, records, f"{heading}\n\n{table}", out_dir=out_dir)
    if plot is not None:
        plot(records, Path(out_dir) / f"{name}.png")
    print(table)
    return table


def run_bench(name: str, argv: list[str] | None, out_dir: Path | None = None) -> tuple[list[dict], str, int]:
    """``(records, markdown, exit status)`` of ``bench_<name>.main([*argv, "--out", out_dir])``, read
    back from its files (``out_dir`` default :func:`results_dir`); ``argv`` None: its latest files."""
    out_dir = results_dir() if out_dir is None else Path(out_dir)
    json_path, md_path = out_dir / f"bench_{name}.json", out_dir / f"bench_{name}.md"
    started, status = time.time(), 0
    if argv is not None:
        returned = importlib.import_module(f"fastkd.benchmarks.bench_{name}").main([*argv, "--out", str(out_dir)])
        status = returned if isinstance(returned, int) else 0  # an exit status, or the records
        if not json_path.is_file() or json_path.stat().st_mtime < started:
            raise RuntimeError(f"bench_{name} did not write {json_path}")
    return json.loads(json_path.read_text())["records"], md_path.read_text().strip(), status


def lowest_of_runs(runs: list[list[dict]], key_fields: tuple[str, ...], ratio: str) -> list[dict]:
    """Run 1's records, each with a numeric ``ratio`` replaced by its match (by ``key_fields``) of the
    run with the lowest ``ratio`` and given ``<ratio>_runs``, every run's value."""
    def key(record):
        return tuple(record.get(field) for field in key_fields)

    seen: dict[tuple, list[dict]] = {}
    for record in (r for records in runs for r in records):
        if isinstance(record.get(ratio), (int, float)) and not isinstance(record.get(ratio), bool):
            seen.setdefault(key(record), []).append(record)
    return [{**min(seen[key(r)], key=lambda m: m[ratio]), f"{ratio}_runs": [round(m[ratio], 3) for m in seen[key(r)]]}
            if key(r) in seen else r for r in runs[0]]
