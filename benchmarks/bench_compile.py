"""The ahead-of-time Triton compile check as a benchmark: every registered kernel configuration
compiled for sm_80 and sm_90 (``fastkd.kernels.check.check_config``, no GPU needed), with its
registers, spills, shared memory against the target's limit, and the wall-clock time of the
check (``compile_s``: a fresh compile, or Triton's on-disk cache hit when that kernel configuration
was compiled before, e.g. by ``make kernel-check``).

``--quick`` compiles the first registered configuration of each kernel for sm_90 only (the full
check is ``make kernel-check`` / ``python -m fastkd.kernels.check``). ``--device`` is accepted for a
uniform ``fastkd bench`` command line; the check targets the GPU architectures whatever the device.
Exit status 1 when a configuration fails to compile, spills, or exceeds the shared-memory limit.

    python -m fastkd.benchmarks.bench_compile [--quick] [--device cpu|cuda] [--targets 80,90]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from fastkd.benchmarks.common import bench_parser, markdown_table, write_results
from fastkd.kernels.check import COLUMNS, SHARED_LIMIT_BYTES, check_config
from fastkd.kernels.registry import CompileConfig, all_compile_configs


def selected_configs(quick: bool) -> list[CompileConfig]:
    """Every registered configuration, or (quick) the first one of each kernel."""
    configs = all_compile_configs()
    if not quick:
        return configs
    first: dict[str, CompileConfig] = {}
    for config in configs:
        first.setdefault(config.name, config)
    return list(first.values())


def parse_targets(text: str) -> tuple[int, ...]:
    """``"80,90"`` -> ``(80, 90)``; each must be a compute capability the check knows."""
    try:
        targets = tuple(int(cc) for cc in text.split(","))
    except ValueError:
        raise ValueError(f"--targets must be comma-separated integers like 80,90, got {text!r}") from None
    unknown = [cc for cc in targets if cc not in SHARED_LIMIT_BYTES]
    if unknown:
        raise ValueError(f"--targets must be among {sorted(SHARED_LIMIT_BYTES)}, got {text!r}")
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "first configuration of each kernel, sm_90 only",
                          device_help="ignored: compiles for GPUs")
    parser.add_argument("--targets", default=None, help="compute capabilities (default 80,90; --quick 90)")
    # parser.parse_args, not parse_bench_args: --device is ignored here, so --device cuda needs no CUDA device
    args = parser.parse_args(argv)
    targets = parse_targets(args.targets or ("90" if args.quick else "80,90"))
    configs = selected_configs(args.quick)
    if not configs:
        raise ValueError("no Triton kernel configurations are registered (fastkd.kernels.registry)")
    records = []
    with tempfile.TemporaryDirectory(prefix="fastkd-bench-compile-") as tmp:
        for config in configs:
            for cc in targets:
                start = time.perf_counter()
                row = check_config(config, cc, Path(tmp))
                records.append({**row, "compile_s": time.perf_counter() - start})
    failed = [row for row in records if not row["ok"]]
    summary = (f"{len(records) - len(failed)}/{len(records)} configurations fit "
               f"({len({c.name for c in configs})} kernels, targets {', '.join(f'sm_{cc}' for cc in targets)}, "
               f"{sum(r['compile_s'] for r in records):.1f} s of compiling)")
    markdown = ("## Triton kernels compiled ahead of time (registers, spills, shared memory)\n\n"
                + markdown_table(records, COLUMNS + ["compile_s", "error"]) + "\n\n" + summary)
    write_results("bench_compile", records, markdown)
    print(markdown)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
