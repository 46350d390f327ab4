"""Every benchmark but ``bench_peers`` (it needs the official repositories) in one run: ``--parts``
ops, data, e2e, compile, knn, backbone, each writing its own results. ``bench_all.json``: the machine
and every part's records tagged with ``benchmark`` (a failed part: one ``{"benchmark", "error"}``);
``bench_all.md``: how long each part took, the end-to-end targets, the parts' reports. ``--reuse``
combines the parts' latest results, running nothing. Exit status 1 when a part fails.

    fastkd bench all --quick                 # every part, small: <= 120 s on 2 CPU cores
"""

from __future__ import annotations

import time
import traceback

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import run_bench
from fastkd.reporting import machine_info, markdown_table, write_results

PARTS = ("ops", "data", "e2e", "compile", "knn", "backbone")


def targets_table(records: list[dict]) -> str:
    rows = [r for r in records if r.get("benchmark") == "e2e" and "target" in r]
    if not rows:
        return "No end-to-end targets were measured."
    return "## End-to-end targets\n\n" + markdown_table(
        rows, ["method", "images_per_s", "vs_plain_eager", "vs_plain_compiled", "memory_ratio", "target", "meets_target"])


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "pass --quick to every part")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--reuse", action="store_true", help="combine the parts' latest results, run nothing")
    args = parse_bench_args(parser, argv)
    part_argv = ["--device", args.device] + (["--quick"] if args.quick else [])
    records, sections, durations, failed = [], [], [], []
    for part in args.parts:
        start = time.perf_counter()
        try:
            part_records, markdown, status = run_bench(part, None if args.reuse else part_argv, args.out)
            records += [{"benchmark": part, **record} for record in part_records]
            sections.append(markdown)
            if status != 0 or any("error" in record for record in part_records):
                failed.append(f"{part} (exit status {status}, {sum('error' in r for r in part_records)} error records)")
        except Exception as error:  # noqa: BLE001 - a failed part is recorded and the others still run
            traceback.print_exc()
            records.append({"benchmark": part, "error": f"{type(error).__name__}: {error}"})
            sections.append(f"## bench_{part}\n\nfailed: {type(error).__name__}: {error}")
            failed.append(part)
        durations.append({"part": part, "seconds": None if args.reuse else time.perf_counter() - start,
                          "records": sum(r["benchmark"] == part for r in records)})
    machine = machine_info()
    command = f"fastkd bench all --device {args.device}" + (" --quick" if args.quick else "")
    markdown = "\n\n".join([
        f"# fastkd benchmarks ({args.device}{', quick' if args.quick else ''})",
        f"Reproduce with `{command}`." + (" (Combined from the parts' latest results.)" if args.reuse else ""),
        markdown_table([{"key": k, "value": v} for k, v in machine.items()], ["key", "value"]),
        markdown_table(durations, ["part", "seconds", "records"]), targets_table(records), *sections,
        f"Failed: {', '.join(failed)}" if failed else "All parts succeeded.",
    ])
    write_results("bench_all", records, markdown, out_dir=args.out)
    print(markdown)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
