"""Ahead-of-time compile check of every registered Triton kernel configuration.

``python -m fastkd.kernels.check`` compiles each configuration of ``registry.all_compile_configs()``
for sm_80 and sm_90 with ``triton.compile(ASTSource(fn, signature, constexprs),
target=GPUTarget("cuda", cc, 32))`` (no GPU needed), reads registers, local memory (spills), stack
and static shared memory from the cubin with the ``cuobjdump --dump-resource-usage`` shipped in the
triton wheel, adds Triton's dynamic shared memory, prints a table, writes it with
``write_results("kernel_check", ...)`` and exits 1 if any configuration fails to compile, spills,
or needs more shared memory than the target allows per block. ptxas puts register spills in the
stack frame (``STACK``) or local memory (``LOCAL``); Triton kernels use neither for anything else,
so any non-zero byte of either counts as a spill.

The report (``kernel_check.json`` + ``.md``) goes to the git-ignored ``build/kernel_check/`` of the
checkout by default (of the current directory when fastkd is not run from a checkout), so that
``make test`` leaves the tree clean; ``--out-dir DIR`` writes it to ``DIR`` and ``--publish`` to the
published benchmark results (``benchmarks/results/``, or ``$FASTKD_BENCH_DIR``).

    python -m fastkd.kernels.check [--targets 80,90] [--kernel NAME] [--out-dir DIR | --publish]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction

from fastkd.benchmarks.common import RESULTS_DIR, markdown_table, write_results
from fastkd.kernels.registry import CompileConfig, all_compile_configs

# Largest shared memory one block may use (opt-in), bytes: A100 163 KiB, H100 227 KiB.
SHARED_LIMIT_BYTES = {80: 166912, 90: 232448}
COLUMNS = ["kernel", "config", "target", "warps", "registers", "stack_bytes", "local_bytes", "shared_bytes", "shared_limit", "ok"]
_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cuobjdump_path() -> Path:
    """The ``cuobjdump`` binary inside the installed triton wheel."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file():
        raise FileNotFoundError(f"cuobjdump not found in the triton wheel at {path}")
    return path


def parse_resource_usage(text: str) -> dict[str, int]:
    """Registers, stack, static shared and local bytes of the single function in a
    ``cuobjdump --dump-resource-usage`` listing."""
    matches = _USAGE.findall(text)
    if len(matches) != 1:
        raise ValueError(f"expected one function in the cuobjdump resource usage, found {len(matches)}:\n{text}")
    reg, stack, shared, local = (int(v) for v in matches[0])
    return {"registers": reg, "stack_bytes": stack, "static_shared_bytes": shared, "local_bytes": local}


def fits(row: dict) -> bool:
    """No spill (stack frame or local memory) and shared memory within the target's limit."""
    return row["stack_bytes"] == 0 and row["local_bytes"] == 0 and row["shared_bytes"] <= row["shared_limit"]


def check_config(config: CompileConfig, cc: int, workdir: Path) -> dict:
    """Compile one configuration for compute capability ``cc``; returns one table row."""
    if cc not in SHARED_LIMIT_BYTES:
        raise ValueError(f"cc must be one of {sorted(SHARED_LIMIT_BYTES)}, got {cc}")
    if isinstance(config.kernel, InterpretedFunction):
        raise RuntimeError("kernels were defined under TRITON_INTERPRET=1; run the compile check without it")
    row = {"kernel": config.name, "config": config.label, "target": f"sm_{cc}", "warps": config.num_warps,
           "shared_limit": SHARED_LIMIT_BYTES[cc]}
    signature = dict(config.signature)
    signature.update({name: "constexpr" for name in config.constexprs})
    try:
        compiled = triton.compile(
            ASTSource(config.kernel, signature, config.constexprs),
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
        cubin = workdir / f"{config.name}_sm{cc}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        listing = subprocess.run(
            [str(cuobjdump_path()), "--dump-resource-usage", str(cubin)], check=True, capture_output=True, text=True
        ).stdout
        usage = parse_resource_usage(listing)
    except Exception as error:  # noqa: BLE001 - any compile failure is a failed row, reported, not raised
        row.update(ok=False, error=f"{type(error).__name__}: {error}".splitlines()[0][:200])
        return row
    row.update(usage)
    row["shared_bytes"] = usage["static_shared_bytes"] + int(compiled.metadata.shared)
    row["ok"] = fits(row)
    return row


def default_report_dir() -> Path:
    """``build/kernel_check/`` (git-ignored) of the source checkout this module runs from, else of
    the current directory (an installed, non-editable fastkd)."""
    root = Path(__file__).resolve().parent.parent
    base = root if (root / "setup.py").is_file() else Path.cwd()
    return base / "build" / "kernel_check"


def run_check(configs: list[CompileConfig], targets: tuple[int, ...] = (80, 90)) -> list[dict]:
    """Compile every configuration for every target; one row each."""
    with tempfile.TemporaryDirectory(prefix="fastkd_kernel_check_") as tmp:
        return [check_config(config, cc, Path(tmp)) for config in configs for cc in targets]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    parser.add_argument("--kernel", default=None, help="only configurations whose kernel name contains this")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out-dir", type=Path, default=None,
                       help="folder for kernel_check.json / .md (default: build/kernel_check/ of the checkout)")
    where.add_argument("--publish", action="store_true",
                       help="write the report into the published benchmark results (benchmarks/results/, "
                            "or $FASTKD_BENCH_DIR)")
    args = parser.parse_args(argv)
    out_dir = RESULTS_DIR if args.publish else (args.out_dir or default_report_dir())
    targets = tuple(int(cc) for cc in args.targets.split(","))
    configs = [c for c in all_compile_configs() if args.kernel is None or args.kernel in c.name]
    if not configs:
        print("no kernel configurations registered" + (f" matching {args.kernel!r}" if args.kernel else ""))
        return 1
    start = time.perf_counter()
    rows = run_check(configs, targets)
    table = markdown_table(rows, COLUMNS)
    failed = [row for row in rows if not row["ok"]]
    summary = f"{len(rows) - len(failed)}/{len(rows)} configurations fit ({time.perf_counter() - start:.1f} s)"
    print(table)
    print(summary)
    for row in failed:
        print(f"FAILED {row['kernel']} [{row['config']}] {row['target']}: {row.get('error', 'spills or shared memory over limit')}")
    write_results("kernel_check", rows, table + "\n\n" + summary, out_dir=out_dir)
    print(f"report: {out_dir / 'kernel_check.json'} and {out_dir / 'kernel_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
