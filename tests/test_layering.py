"""The dependency direction of the package: data -> methods -> train, models (and losses, ops) below
methods; nothing imports what is above it. Checked on the import statements of every file (``ast``,
imports inside functions included) and, for ``fastkd.methods``, on what importing it loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOW_LEVEL_MODULES = ("fastkd/checks.py", "fastkd/durable.py", "fastkd/method_protocol.py", "fastkd/progress.py",
                     "fastkd/suggest.py")
FASTKD_PACKAGES = ("fastkd.data", "fastkd.eval", "fastkd.losses", "fastkd.methods", "fastkd.models", "fastkd.ops",
                   "fastkd.train", "fastkd.benchmarks", "fastkd.config", "fastkd.cli", "fastkd.runner")

# (files, forbidden module prefixes)
RULES = [
    ("fastkd/methods", ("fastkd.train",)),
    ("fastkd/models", ("fastkd.methods", "fastkd.train", "fastkd.eval", "fastkd.data")),
    ("fastkd/losses", ("fastkd.methods", "fastkd.train", "fastkd.eval", "fastkd.data")),
    ("fastkd/ops", ("fastkd.methods", "fastkd.train", "fastkd.eval", "fastkd.data")),
    ("fastkd/eval", ("fastkd.train.trainer",)),
    # data is at the bottom: besides itself, only the low-level modules (durable files, progress bars)
    ("fastkd/data", (*(p for p in FASTKD_PACKAGES if p != "fastkd.data"), "fastkd.demo", "fastkd.launch",
                     "fastkd.kernels", "fastkd.reporting")),
    # train drives a method through forward/after_step without importing it; it may use models below
    ("fastkd/train", ("fastkd.methods", "fastkd.eval", "fastkd.benchmarks", "fastkd.config", "fastkd.cli",
                      "fastkd.runner", "fastkd.demo", "fastkd.launch")),
    ("kernels", ("fastkd.benchmarks", "benchmarks")),
    *((path, FASTKD_PACKAGES) for path in LOW_LEVEL_MODULES),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names (``from a import b`` gives ``a`` and ``a.b``;
    relative imports resolved against the file's package)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def _files(where: str) -> list[Path]:
    target = ROOT / where
    return [target] if target.is_file() else sorted(target.rglob("*.py"))


def test_imported_modules_resolves_relative_and_from_imports():
    source = ROOT / "fastkd" / "data" / "loader.py"
    found = imported_modules(source)
    assert "fastkd.data.recipes" in found and "fastkd.data.recipes.build_recipe" in found


@pytest.mark.parametrize("where, forbidden", RULES, ids=[rule[0] for rule in RULES])
def test_no_module_imports_a_layer_above_it(where, forbidden):
    files = _files(where)
    assert files, f"{where} has no Python files"
    offending = []
    for path in files:
        bad = {m for m in imported_modules(path) if any(m == p or m.startswith(p + ".") for p in forbidden)}
        offending += [f"{path.relative_to(ROOT)} imports {m}" for m in sorted(bad) if m.rpartition(".")[0] not in bad]
    assert not offending, "\n".join(offending)


def test_importing_methods_loads_no_trainer():
    """Transitively too: ``import fastkd.methods`` (and models) must not load ``fastkd.train``."""
    code = ("import sys, fastkd.methods, fastkd.models; "
            "print(sorted(m for m in sys.modules if m == 'fastkd.train' or m.startswith('fastkd.train.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
