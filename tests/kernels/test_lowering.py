"""The compiled side of every Triton kernel: the first registered configuration of each kernel lowered
to Triton IR and PTX for sm_90 (no GPU needed) by the installed triton, in a subprocess without
``TRITON_INTERPRET``. `make test` runs it on triton 3.8, `make test-compat` on triton 3.6. The kernels'
runtime-bounded loops (``range(..., loop_bound(x), ...)``, see ``fastkd.kernels.loop_bounds``) must stay
``scf.for`` loops, which Triton's software pipeliner works on, never ``scf.while``; and (read from the
sources) every runtime ``range`` bound of a kernel goes through ``loop_bound``."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

LOWER = r"""
import json, sys
from fastkd.benchmarks.compile_check import compile_config, selected_configs
lowered = {}
for config in selected_configs(quick=True):
    compiled = compile_config(config, 90)
    lowered[config.name] = {"fn": config.kernel.fn.__name__, "ttir": compiled.asm["ttir"], "ptx": compiled.asm["ptx"]}
json.dump(lowered, open(sys.argv[1], "w"))
"""

# scf.for loops of each kernel's Triton IR: its range() loops over runtime bounds
FOR_LOOPS = {
    "feature_align_fwd": 0,
    "gather_tokens_fwd": 0,
    "gather_tokens_bwd": 2,  # batches of the group, rows that picked the position
    "token_relation_row_lse": 1,  # key blocks
    "token_relation_fwd": 1,  # key blocks
    "token_relation_bwd_dq": 1,  # key blocks
    "token_relation_bwd_dk": 2,  # query blocks for g_max, query blocks
}


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    path = tmp_path_factory.mktemp("lowering") / "lowered.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not the interpreter
    result = subprocess.run([sys.executable, "-c", LOWER, str(path)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(path.read_text())


def test_every_kernel_lowers_to_ptx_for_sm90(lowered):
    assert set(FOR_LOOPS) <= set(lowered), sorted(lowered)
    for name, asm in lowered.items():
        assert re.search(r"^\.target sm_90a?\b", asm["ptx"], re.M), f"{name}: no sm_90 target in its PTX"
        assert re.search(rf"\.entry {asm['fn']}\b", asm["ptx"]), f"{name}: no entry {asm['fn']} in its PTX"


@pytest.mark.parametrize("name", sorted(FOR_LOOPS))
def test_runtime_bounded_loops_stay_for_loops(lowered, name):
    ttir = lowered[name]["ttir"]
    assert "scf.while" not in ttir
    assert len(re.findall(r"\bscf\.for\b", ttir)) == FOR_LOOPS[name], ttir


def _is_constexpr(annotation) -> bool:
    return annotation is not None and ast.unparse(annotation) in ("tl.constexpr", "triton.language.constexpr")


def _unwrapped_loop_bounds(path):
    """``(function, line, bound)`` of every ``range(...)`` loop bound of a ``@triton.jit`` function in
    ``path`` that is neither a literal, a ``tl.constexpr`` parameter nor a ``loop_bound(...)`` call."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, ast.FunctionDef) or not any("jit" in ast.unparse(d) for d in fn.decorator_list):
            continue
        constexprs = {a.arg for a in fn.args.args if _is_constexpr(a.annotation)}
        for loop in ast.walk(fn):
            call = loop.iter if isinstance(loop, ast.For) else None
            if not (isinstance(call, ast.Call) and ast.unparse(call.func) in ("range", "tl.range")):
                continue
            for bound in call.args:
                if isinstance(bound, ast.Constant) or (isinstance(bound, ast.Name) and bound.id in constexprs):
                    continue
                if isinstance(bound, ast.Call) and ast.unparse(bound.func) == "loop_bound":
                    continue
                found.append((fn.name, loop.lineno, ast.unparse(bound)))
    return found


def test_runtime_loop_bounds_go_through_loop_bound():
    """Under NumPy >= 2.5 the interpreters of triton 3.0-3.6 reject a runtime ``range`` bound (make test
    runs triton 3.8, which accepts it): every kernel in kernels/ writes it as ``loop_bound(x)``."""
    kernels = Path(__file__).resolve().parents[2] / "kernels"
    found = [(path.name, *hit) for path in sorted(kernels.glob("*.py")) for hit in _unwrapped_loop_bounds(path)]
    assert not found, found
