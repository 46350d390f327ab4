"""All per-op benchmarks in one run (``bench_ema``, ``bench_feature_align``, ``bench_gather``,
``bench_token_relation``), with one summary of fastkd against the baseline of each case.

Each op benchmark runs with the same ``--quick`` / ``--device`` and writes its own results; this
one reads them back and tags every record with ``op``, ``problem`` (its case / model / shape label)
and, on the fastkd variants, ``baseline`` (the benchmark's ``baseline`` field, else the first
non-fastkd variant of the case: the eager reference), ``speedup`` = baseline time / fastkd time and
``memory_ratio`` = fastkd peak / baseline peak. Where a record carries a model of the bytes or
FLOPs its GPU kernel moves / computes, ``achieved_GBps`` = bytes / median time and
``achieved_TFLOPs`` = FLOPs / median time, with ``bandwidth_vs_peak`` / ``flops_vs_peak`` against the
device's peak; these models describe the GPU kernels, so on ``--device cpu`` each of these four
fields reads "needs a GPU". Writes ``bench_ops.json`` / ``.md`` and ``bench_ops.png`` (time and
memory against problem size, one column per op).

``--runs N`` (default 1) runs every op benchmark N times (the per-op files in the output folder are
run 1's, the later runs write to a temporary folder) and keeps, per fastkd record, the run with the
**lowest** speedup, with every
run's speedup in ``speedup_runs``: a published ratio is one that survives a re-run (a baseline
slowed by another job inflates a single run's ratio). The report states the machine's load average
at the start.

On CPU it also runs the per-size sweep of :mod:`fastkd.benchmarks.op_sweep` (every op against its
reference at 10^3 ... 10^7 elements, fp32 and bf16; ``--quick``: up to 10^6, fp32; ``--sizes`` to
choose; with ``--runs`` each size keeps its lowest speedup) and writes it as ``bench_ops_sweep.json``
/ ``.md`` too, headed by the CPU model and vector ISA. ``--sweep-only`` runs just the sweep.

    python -m fastkd.benchmarks.bench_ops [--quick] [--device cpu|cuda] [--ops ema gather ...] [--runs 2]
                                          [--sizes 1000 100000] [--sweep-only]
"""

from __future__ import annotations

import importlib
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import lowest_of_runs
from fastkd.benchmarks.gpu_peak import NEEDS_GPU, fraction_of_peak, gpu_peak
from fastkd.benchmarks.op_sweep import COLUMNS as SWEEP_COLUMNS, QUICK_SIZES, SIZES, cpu_isa, sweep
from fastkd.benchmarks.plots import save_lines_per_op
from fastkd.reporting import load_average, machine_info, markdown_table, results_dir, write_results

OPS = ("ema", "feature_align", "gather", "token_relation")
PROBLEM_KEYS = ("case", "model", "shape")
FLOPS_KEYS = {"gflops_model": 1e9}
SUMMARY_COLUMNS = ["op", "problem", "variant", "baseline", "median_ms", "p10_ms", "p90_ms", "baseline_ms", "speedup",
                   "peak_MiB", "memory_ratio", "achieved_GBps", "bandwidth_vs_peak", "achieved_TFLOPs",
                   "flops_vs_peak"]


def run_op_benchmark(op: str, argv: list[str], out_dir: Path | None = None) -> tuple[list[dict], str | None]:
    """Run ``fastkd.benchmarks.bench_<op>.main(argv + ["--out", out_dir])``: ``(records, its Markdown
    report or None)``; ``out_dir`` defaults to :func:`fastkd.reporting.results_dir`. The records are
    what ``main`` returns (a list), else what it wrote to ``<out_dir>/bench_<op>.json``."""
    out_dir = results_dir() if out_dir is None else Path(out_dir)
    json_path, md_path = out_dir / f"bench_{op}.json", out_dir / f"bench_{op}.md"
    started = time.time()
    result = importlib.import_module(f"fastkd.benchmarks.bench_{op}").main([*argv, "--out", str(out_dir)])
    if isinstance(result, int) and result != 0:
        raise RuntimeError(f"bench_{op} exited with status {result}")

    def fresh(path):
        return path.is_file() and path.stat().st_mtime >= started

    if isinstance(result, list):
        records = result
    elif fresh(json_path):
        records = json.loads(json_path.read_text())["records"]
    else:
        raise RuntimeError(f"bench_{op} neither returned its records nor wrote {json_path}")
    if not records:
        raise RuntimeError(f"bench_{op} produced no records")
    return records, md_path.read_text().strip() if fresh(md_path) else None


def _first(record: dict, keys) -> tuple[str | None, float | None]:
    for key in keys:
        if isinstance(record.get(key), (int, float)):
            return key, float(record[key])
    return None, None


def annotate(op: str, records: list[dict], device: str, peak: dict | None) -> list[dict]:
    """``records`` of one op benchmark with the fields described in the module docstring."""
    out = []
    for record in records:
        problem = " ".join(str(record[k]) for k in PROBLEM_KEYS if k in record)
        out.append({**record, "op": op, "problem": problem, "peak_MiB": record.get("peak_MiB")})
    by_problem: dict[str, dict[str, dict]] = {}
    for record in out:
        by_problem.setdefault(record["problem"], {})[record["variant"]] = record
    for record in out:
        if not str(record["variant"]).startswith("fastkd"):
            continue
        variants = by_problem[record["problem"]]
        baseline = record.get("baseline") or next((v for v in variants if not v.startswith("fastkd")), None)
        if baseline not in variants:
            raise ValueError(f"bench_{op}: baseline {baseline!r} of {record['variant']!r} is not a variant of "
                             f"{record['problem']!r}")
        base = variants[baseline]
        record.update(baseline=baseline, baseline_ms=base["median_ms"], speedup=base["median_ms"] / record["median_ms"])
        record["memory_ratio"] = (record["peak_MiB"] / base["peak_MiB"]
                                  if record["peak_MiB"] is not None and base["peak_MiB"] else None)
        seconds = record["median_ms"] / 1e3
        bytes_value = record.get("bytes_moved_MiB")
        flops_key, flops_value = _first(record, FLOPS_KEYS)
        if device == "cpu":
            record.update(achieved_GBps=NEEDS_GPU, bandwidth_vs_peak=NEEDS_GPU, achieved_TFLOPs=NEEDS_GPU,
                          flops_vs_peak=NEEDS_GPU)
            continue
        gbps = None if bytes_value is None else bytes_value * 2**20 / seconds / 1e9
        tflops = None if flops_key is None else flops_value * FLOPS_KEYS[flops_key] / seconds / 1e12
        record.update(
            achieved_GBps=gbps, bandwidth_vs_peak=fraction_of_peak(gbps, peak and peak["peak_bandwidth_GBps"], device),
            achieved_TFLOPs=tflops, flops_vs_peak=fraction_of_peak(tflops, peak and peak["peak_bf16_TFLOPs"], device),
        )
    return out


def _one_run(args, op_argv: list[str], peak, out_dir: Path, sections: list | None) -> list[dict]:
    """One pass over ``args.ops``: annotated records (a broken op benchmark is one error record);
    each op's own Markdown section is appended to ``sections`` when given."""
    records = []
    for op in args.ops:
        try:
            op_records, section = run_op_benchmark(op, op_argv, out_dir)
            records += annotate(op, op_records, args.device, peak)
            if section and sections is not None:
                sections.append(section)
        except Exception as error:  # noqa: BLE001 - one broken op benchmark is reported, the others still run
            traceback.print_exc()
            records.append({"op": op, "error": f"{type(error).__name__}: {error}"})
    return records


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
        with tempfile.TemporaryDirectory(prefix="fastkd-bench-ops-") as scratch:
            runs.append(_one_run(args, op_argv, peak, args.out if run == 0 else Path(scratch),
                                 sections if run == 0 else None))
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
    """The CPU per-size sweep (module docstring) over ``args.ops``: written as ``bench_ops_sweep``,
    printed; returns its Markdown."""
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
