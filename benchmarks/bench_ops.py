"""The per-op benchmarks (``--ops`` ema, feature_align, gather, token_relation; each writing its own
results) in one run, summarised in ``bench_ops.json`` / ``.md`` / ``.png``: every record tagged with
``op`` and ``problem`` (case / model / shape), the fastkd ones with ``baseline`` (the record's, else
the first non-fastkd variant), ``speedup`` = baseline time / fastkd time, ``memory_ratio`` = fastkd
peak / baseline peak and, from the bytes / FLOPs models of the GPU kernels, ``achieved_GBps``,
``achieved_TFLOPs`` and their fractions of the device's peak ("needs a GPU" on CPU). ``--runs N``
keeps per record the run with the **lowest** speedup (all in ``speedup_runs``; per-op files: run 1's).

On CPU it also writes the per-size sweep of :mod:`fastkd.benchmarks.op_sweep` as ``bench_ops_sweep``
(10^3 ... 10^7 elements, fp32 and bf16; ``--quick``: to 10^6, fp32); ``--sweep-only``: just that.

    fastkd bench ops [--quick] [--device cpu|cuda] [--ops ema gather ...] [--runs 2] [--sizes 1000 100000]
"""

from __future__ import annotations

import tempfile
import traceback
from pathlib import Path

import torch

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import lowest_of_runs, run_bench
from fastkd.benchmarks.gpu_peak import NEEDS_GPU, fraction_of_peak, gpu_peak
from fastkd.benchmarks.op_sweep import COLUMNS as SWEEP_COLUMNS, QUICK_SIZES, SIZES, cpu_isa, sweep
from fastkd.benchmarks.plots import save_lines_per_op
from fastkd.reporting import load_average, machine_info, markdown_table, write_results

OPS = ("ema", "feature_align", "gather", "token_relation")
PROBLEM_KEYS = ("case", "model", "shape")
SUMMARY_COLUMNS = ["op", "problem", "variant", "baseline", "median_ms", "p10_ms", "p90_ms", "baseline_ms", "speedup",
                   "peak_MiB", "memory_ratio", "achieved_GBps", "bandwidth_vs_peak", "achieved_TFLOPs",
                   "flops_vs_peak"]


def annotate(op: str, records: list[dict], device: str, peak: dict | None) -> list[dict]:
    """``records`` of one op benchmark with the summary fields of the module docstring."""
    out = [{**r, "op": op, "problem": " ".join(str(r[k]) for k in PROBLEM_KEYS if k in r),
            "peak_MiB": r.get("peak_MiB")} for r in records]
    by_problem: dict[str, dict[str, dict]] = {}
    for record in out:
        by_problem.setdefault(record["problem"], {})[record["variant"]] = record
    for record in (r for r in out if str(r["variant"]).startswith("fastkd")):
        variants = by_problem[record["problem"]]
        baseline = record.get("baseline") or next((v for v in variants if not v.startswith("fastkd")), None)
        if baseline not in variants:
            raise ValueError(f"bench_{op}: baseline {baseline!r} of {record['variant']!r} is not a variant of "
                             f"{record['problem']!r}")
        base, seconds = variants[baseline], record["median_ms"] / 1e3
        record.update(baseline=baseline, baseline_ms=base["median_ms"], speedup=base["median_ms"] / record["median_ms"],
                      memory_ratio=record["peak_MiB"] / base["peak_MiB"]
                      if record["peak_MiB"] is not None and base["peak_MiB"] else None)
        gbps = None if record.get("bytes_moved_MiB") is None else record["bytes_moved_MiB"] * 2**20 / seconds / 1e9
        tflops = None if record.get("gflops_model") is None else record["gflops_model"] / seconds / 1e3
        record.update(  # fraction_of_peak: "needs a GPU" on CPU
            achieved_GBps=NEEDS_GPU if device == "cpu" else gbps,
            bandwidth_vs_peak=fraction_of_peak(gbps, peak and peak["peak_bandwidth_GBps"], device),
            achieved_TFLOPs=NEEDS_GPU if device == "cpu" else tflops,
            flops_vs_peak=fraction_of_peak(tflops, peak and peak["peak_bf16_TFLOPs"], device))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "pass --quick to every op benchmark",
                          runs_help="run every op benchmark this many times and keep each ratio's lowest (default 1)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--sizes", nargs="+", type=int, default=None,
                        help="element counts of the CPU per-size sweep (default 10^3 ... 10^7, --quick to 10^6)")
    parser.add_argument("--sweep-only", action="store_true", help="run only the CPU per-size sweep")
    args = parse_bench_args(parser, argv)
    if args.device == "cpu":
        sweep_section = run_sweep(args)
    if args.sweep_only:
        return 0
    op_argv = ["--device", args.device] + (["--quick"] if args.quick else [])
    peak = gpu_peak() if args.device == "cuda" else None
    load = load_average()
    runs, sections = [], []
    for run in range(args.runs):
        runs.append([])
        with tempfile.TemporaryDirectory(prefix="fastkd-bench-ops-") as scratch:
            for op in args.ops:  # run 1 writes the per-op files and sections
                try:
                    op_records, section, _ = run_bench(op, op_argv, args.out if run == 0 else Path(scratch))
                    runs[-1] += annotate(op, op_records, args.device, peak)
                    sections += [section] if run == 0 else []
                except Exception as error:  # noqa: BLE001 - a broken op benchmark is reported, the others run
                    traceback.print_exc()
                    runs[-1].append({"op": op, "error": f"{type(error).__name__}: {error}"})
    records = lowest_of_runs(runs, ("op", "problem", "variant"), "speedup")
    fastkd_rows = [r for r in records if "error" in r or str(r.get("variant", "")).startswith("fastkd")]
    peak_text = (f"device peak: {peak['gpu']}, {peak['peak_bandwidth_GBps']:.0f} GB/s, "
                 f"{peak['peak_bf16_TFLOPs'] or 'unknown'} bf16 TFLOP/s" if peak else
                 "achieved bandwidth / FLOP rate of the GPU kernels: needs a GPU (CPU run)")
    runs_text = ("" if args.runs == 1 else f"The lowest speedup of {args.runs} runs per row (every run's in "
                 "`speedup_runs`; the op sections below are run 1's). ")
    markdown = (f"## Fused ops against their baselines ({args.device}, {torch.get_num_threads()} threads)\n\n"
                + f"Machine load average at the start (1 / 5 / 15 min): {load or 'unknown'}. {runs_text}\n\n"
                + markdown_table(fastkd_rows, SUMMARY_COLUMNS + (["speedup_runs"] if args.runs > 1 else [])
                                 + ["error"])
                + f"\n\nspeedup = baseline time / fastkd time; memory_ratio = fastkd peak / baseline peak; {peak_text}."
                + (f"\n\n{sweep_section}" if args.device == "cpu" else "")
                + "".join(f"\n\n{section}" for section in sections))
    write_results("bench_ops", records, markdown, out_dir=args.out)
    plotted = [r for r in records if "error" not in r]
    if plotted:
        save_lines_per_op(args.out / "bench_ops.png", plotted,
                          [("median_ms", "forward + backward / update, median ms"), ("peak_MiB", "peak memory, MiB")],
                          title=f"fused ops vs baselines ({args.device})")
    print(markdown)
    return 1 if any("error" in r for r in records) else 0


def run_sweep(args) -> str:
    """Write and print the CPU per-size sweep of ``args.ops``; returns its Markdown."""
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    dtypes = (torch.float32,) if args.quick else (torch.float32, torch.bfloat16)
    ops = [{"ema": "ema_", "gather": "gather_tokens"}.get(op, op) for op in args.ops]
    runs = [sweep(sizes, dtypes, ops, rounds=3 if args.quick else 5) for _ in range(args.runs)]
    records = lowest_of_runs(runs, ("op", "dtype", "elements"), "speedup")
    markdown = (f"## Per-size sweep: fused op against its reference, forward + backward (cpu, "
                f"{torch.get_num_threads()} threads)\n\nCPU: {machine_info()['cpu']}; {cpu_isa()}. Machine load "
                f"average at the start: {load_average() or 'unknown'}. speedup = reference time / fused time "
                f"(lowest of {args.runs} run(s)); each size timed in alternating rounds, best round median.\n\n"
                + markdown_table(records, SWEEP_COLUMNS + (["speedup_runs"] if args.runs > 1 else [])))
    write_results("bench_ops_sweep", records, markdown, out_dir=args.out)
    print(markdown)
    return markdown


if __name__ == "__main__":
    raise SystemExit(main())
