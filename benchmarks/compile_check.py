"""Ahead-of-time compile check of every registered Triton kernel configuration (run it with
``fastkd bench compile``, see :mod:`fastkd.benchmarks.bench_compile`).

Each configuration of ``all_compile_configs()`` is compiled for a compute capability with
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))`` (no GPU
needed); registers, local memory (spills), stack and static shared memory are read from the cubin
with the ``cuobjdump --dump-resource-usage`` shipped in the triton wheel, and Triton's dynamic
shared memory is added. ptxas puts register spills in the stack frame (``STACK``) or local memory
(``LOCAL``); Triton kernels use neither for anything else, so any non-zero byte of either counts as
a spill. A configuration fits when it compiles, does not spill and needs no more shared memory
than the target allows per block.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction

from fastkd.kernels.compile_configs import CompileConfig, all_compile_configs
from fastkd.reporting import results_dir

CHECKOUT_REPORT_DIR = "build/kernel_check"  # the report's default folder when run from a source checkout (git-ignored)
# Largest shared memory one block may use (opt-in), bytes: A100 163 KiB, H100 227 KiB.
SHARED_LIMIT_BYTES = {80: 166912, 90: 232448}
COLUMNS = ["kernel", "config", "target", "warps", "registers", "stack_bytes", "local_bytes", "shared_bytes",
           "shared_limit", "ok"]
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


def compile_config(config: CompileConfig, cc: int):
    """Triton's compiled kernel of one configuration for compute capability ``cc`` (its ``asm`` holds
    the ``ttir``, ``ptx`` and ``cubin`` of every stage)."""
    if isinstance(config.kernel, InterpretedFunction):
        raise RuntimeError("kernels were defined under TRITON_INTERPRET=1; run the compile check without it")
    signature = dict(config.signature)
    signature.update({name: "constexpr" for name in config.constexprs})
    return triton.compile(
        ASTSource(config.kernel, signature, config.constexprs),
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )


def check_config(config: CompileConfig, cc: int, workdir: Path) -> dict:
    """Compile one configuration for compute capability ``cc``; returns one table row (``ok``
    False with an ``error`` when it does not compile)."""
    if cc not in SHARED_LIMIT_BYTES:
        raise ValueError(f"cc must be one of {sorted(SHARED_LIMIT_BYTES)}, got {cc}")
    if isinstance(config.kernel, InterpretedFunction):
        raise RuntimeError("kernels were defined under TRITON_INTERPRET=1; run the compile check without it")
    row = {"kernel": config.name, "config": config.label, "target": f"sm_{cc}", "warps": config.num_warps,
           "shared_limit": SHARED_LIMIT_BYTES[cc]}
    try:
        compiled = compile_config(config, cc)
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
    """Where ``fastkd bench compile`` writes its report without ``--out`` / ``--publish``:
    ``$FASTKD_BENCH_DIR``, else ``build/kernel_check/`` when the current directory is a source
    checkout, else ``./fastkd_bench_results`` (:func:`fastkd.reporting.results_dir`)."""
    return results_dir(in_checkout=CHECKOUT_REPORT_DIR)


def run_check(configs: list[CompileConfig], targets: tuple[int, ...] = (80, 90)) -> list[dict]:
    """Compile every configuration for every target; one row each, with its wall-clock
    ``compile_s`` (a fresh compile, or a hit in Triton's on-disk cache)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastkd-compile-check-") as tmp:
        for config in configs:
            for cc in targets:
                start = time.perf_counter()
                row = check_config(config, cc, Path(tmp))
                rows.append({**row, "compile_s": time.perf_counter() - start})
    return rows


def selected_configs(quick: bool = False, kernel: str | None = None) -> list[CompileConfig]:
    """The registered configurations whose kernel name contains ``kernel`` (all without it); with
    ``quick`` only the first one of each kernel."""
    configs = [c for c in all_compile_configs() if kernel is None or kernel in c.name]
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
