"""Ahead-of-time compile check of ``all_compile_configs()`` (``fastkd bench compile``): each compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` (no GPU needed), registers,
stack, local and static shared memory read by the triton wheel's ``cuobjdump --dump-resource-usage``.
ptxas spills registers to the stack frame or local memory, which Triton kernels use for nothing else:
a configuration fits when it compiles, has neither and needs no more shared memory than a block may.
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

from fastkd.checks import check_choice
from fastkd.kernels.compile_configs import CompileConfig, all_compile_configs

CHECKOUT_REPORT_DIR = "build/kernel_check"  # the default report folder in a source checkout (git-ignored)
# Largest shared memory one block may use (opt-in), bytes: A100 163 KiB, H100 227 KiB.
SHARED_LIMIT_BYTES = {80: 166912, 90: 232448}
COLUMNS = ["kernel", "config", "target", "warps", "registers", "stack_bytes", "local_bytes", "shared_bytes",
           "shared_limit", "ok"]
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_resource_usage(text: str) -> dict[str, int]:
    """Registers, stack, static shared and local bytes of the one function of a cuobjdump listing."""
    matches = _USAGE.findall(text)
    if len(matches) != 1:
        raise ValueError(f"expected one function in the cuobjdump resource usage, found {len(matches)}:\n{text}")
    reg, stack, shared, local = (int(v) for v in matches[0])
    return {"registers": reg, "stack_bytes": stack, "static_shared_bytes": shared, "local_bytes": local}


def fits(row: dict) -> bool:
    return row["stack_bytes"] == 0 and row["local_bytes"] == 0 and row["shared_bytes"] <= row["shared_limit"]


def compile_config(config: CompileConfig, cc: int):
    """Triton's compiled kernel for compute capability ``cc`` (``asm``: each stage's ttir, ptx, cubin)."""
    signature = {**config.signature, **{name: "constexpr" for name in config.constexprs}}
    return triton.compile(ASTSource(config.kernel, signature, config.constexprs), target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def check_config(config: CompileConfig, cc: int, workdir: Path) -> dict:
    """One table row (``ok`` False with an ``error`` when it does not compile)."""
    check_choice("cc", cc, SHARED_LIMIT_BYTES)
    if isinstance(config.kernel, InterpretedFunction):
        raise RuntimeError("kernels were defined under TRITON_INTERPRET=1; run the compile check without it")
    row = {"kernel": config.name, "config": config.label, "target": f"sm_{cc}", "warps": config.num_warps,
           "shared_limit": SHARED_LIMIT_BYTES[cc]}
    try:
        compiled = compile_config(config, cc)
        cubin = workdir / f"{config.name}_sm{cc}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        listing = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", str(cubin)], check=True, capture_output=True, text=True
        ).stdout
        usage = parse_resource_usage(listing)
    except Exception as error:  # noqa: BLE001 - any compile failure is a failed row, reported, not raised
        row.update(ok=False, error=f"{type(error).__name__}: {error}".splitlines()[0][:200])
        return row
    row.update(usage)
    row["shared_bytes"] = usage["static_shared_bytes"] + int(compiled.metadata.shared)
    row["ok"] = fits(row)
    return row


def run_check(configs: list[CompileConfig], targets: tuple[int, ...] = (80, 90)) -> list[dict]:
    """One row per configuration and target, with its wall-clock ``compile_s``."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastkd-compile-check-") as tmp:
        for config in configs:
            for cc in targets:
                start = time.perf_counter()
                row = check_config(config, cc, Path(tmp))
                rows.append({**row, "compile_s": time.perf_counter() - start})
    return rows


def selected_configs(quick: bool = False, kernel: str | None = None) -> list[CompileConfig]:
    """The configurations whose kernel name contains ``kernel``; ``quick``: the first of each kernel."""
    configs = [c for c in all_compile_configs() if kernel is None or kernel in c.name]
    names = [c.name for c in configs]
    return [c for i, c in enumerate(configs) if not quick or names.index(c.name) == i]


def parse_targets(text: str) -> tuple[int, ...]:
    """``"80,90"`` -> ``(80, 90)``."""
    if not re.fullmatch(r"\d+(,\d+)*", text) or any(int(cc) not in SHARED_LIMIT_BYTES for cc in text.split(",")):
        raise ValueError(f"--targets must be comma-separated compute capabilities among {sorted(SHARED_LIMIT_BYTES)}, "
                         f"like 80,90, got {text!r}")
    return tuple(int(cc) for cc in text.split(","))
