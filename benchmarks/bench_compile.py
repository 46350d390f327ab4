"""The ahead-of-time Triton compile check (:mod:`fastkd.benchmarks.compile_check`, also run by ``make
test``): every registered kernel configuration compiled for sm_80 and sm_90 without a GPU, with its
registers, spills, shared memory against the target's limit and ``compile_s`` (a fresh compile or a
hit in Triton's on-disk cache). Writes ``bench_compile.json`` / ``.md`` (default folder: in a source
checkout the git-ignored ``build/kernel_check/`` unless ``$FASTKD_BENCH_DIR`` is set). Exit status 1
when a configuration fails to compile, spills or exceeds the shared-memory limit, or none is selected.

    fastkd bench compile [--quick] [--targets 80,90] [--kernel NAME] [--out DIR | --publish]
"""

from __future__ import annotations

from fastkd.benchmarks.arguments import bench_parser, resolve_out
from fastkd.benchmarks.compile_check import CHECKOUT_REPORT_DIR, COLUMNS, parse_targets, run_check, selected_configs
from fastkd.reporting import markdown_table, write_results


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "first configuration of each kernel, sm_90 only",
                          device_help="ignored: compiles for GPUs")
    parser.add_argument("--targets", default=None, help="compute capabilities (default 80,90; --quick 90)")
    parser.add_argument("--kernel", default=None, help="only configurations whose kernel name contains this")
    # parser.parse_args, not parse_bench_args: --device is ignored here, so --device cuda needs no CUDA device
    args = parser.parse_args(argv)
    out = resolve_out(parser, args, in_checkout=CHECKOUT_REPORT_DIR)
    targets = parse_targets(args.targets or ("90" if args.quick else "80,90"))
    configs = selected_configs(args.quick, args.kernel)
    if not configs:
        print("no Triton kernel configurations registered" + (f" matching {args.kernel!r}" if args.kernel else ""))
        return 1
    records = run_check(configs, targets)
    failed = [row for row in records if not row["ok"]]
    summary = (f"{len(records) - len(failed)}/{len(records)} configurations fit "
               f"({len({c.name for c in configs})} kernels, targets {', '.join(f'sm_{cc}' for cc in targets)}, "
               f"{sum(r['compile_s'] for r in records):.1f} s of compiling)")
    markdown = ("## Triton kernels compiled ahead of time (registers, spills, shared memory)\n\n"
                + markdown_table(records, COLUMNS + ["compile_s", "error"]) + "\n\n" + summary)
    path = write_results("bench_compile", records, markdown, out_dir=out)
    print(markdown)
    for row in failed:
        print(f"FAILED {row['kernel']} [{row['config']}] {row['target']}: "
              f"{row.get('error', 'spills or shared memory over limit')}")
    print(f"report: {path} and {path.with_suffix('.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
