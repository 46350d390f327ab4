"""The dependency direction of the package: data -> methods -> train, models (and losses, ops) below
methods; nothing imports what is above it. Checked on the import statements of every file (``ast``,
imports inside functions included) and, for ``fastkd.methods``, on what importing it loads."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The helpers at the bottom: they import no other fastkd module, and every module may import them.
LOW_LEVEL = ("checks", "durable", "method_protocol", "progress", "suggest")
# Every unit of the library (a package of fastkd, a top-level module, kernels/, benchmarks/, configs/)
# -> the fastkd units it may import besides LOW_LEVEL. The README's architecture table says the same
# (test_readme_states_these_rules); a unit missing here fails test_every_unit_has_a_rule.
ALLOWED = {
    **{name: () for name in LOW_LEVEL},
    "kernels": (),
    "configs": (),
    "reporting": (),
    "launch": (),
    "ops": ("kernels", "_C"),
    "losses": ("ops",),
    "measured_choice": ("reporting",),
    "models": ("measured_choice", "ops"),
    "data": (),
    "methods": ("data", "losses", "models", "ops"),
    "train": ("measured_choice", "models"),
    "config": ("data", "train"),
    "eval": ("config", "data", "methods", "models", "train"),
    "runner": ("config", "data", "methods", "models", "train"),
    "demo": ("config", "configs", "data", "eval", "methods", "reporting", "runner", "train"),
    "benchmarks": ("config", "configs", "data", "eval", "kernels", "losses", "methods", "models", "ops",
                   "reporting", "train"),
    "cli": ("benchmarks", "config", "data", "eval", "launch", "methods", "models", "runner", "train"),
}
# Finer rules inside the table: (files, forbidden module prefixes).
RULES = [
    ("fastkd/eval", ("fastkd.train.trainer",)),  # eval reads the checkpoint format, never the trainer
]


def unit_of_file(path: Path) -> str:
    """The unit a library file belongs to: ``fastkd/ops/ema.py`` -> ``ops``, ``fastkd/cli.py`` ->
    ``cli``, ``kernels/ema.py`` -> ``kernels``."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] != "fastkd":
        return parts[0]
    return parts[1]


def unit_of_module(module: str) -> str | None:
    """The unit an imported module name belongs to (None: not fastkd; ``""``: the package itself)."""
    parts = module.split(".")
    if parts[0] in ("kernels", "benchmarks", "configs"):
        return parts[0]
    if parts[0] != "fastkd":
        return None
    return "" if len(parts) == 1 or parts[1].startswith("__") else parts[1]


def library_files() -> list[Path]:
    return sorted([*(ROOT / "fastkd").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"),
                   *(ROOT / "benchmarks").rglob("*.py"), *(ROOT / "configs").glob("*.py")])


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


def test_every_unit_has_a_rule():
    units = {unit_of_file(path) for path in library_files()} - {"__init__"}  # fastkd/__init__.py imports nothing
    assert units <= set(ALLOWED), sorted(units - set(ALLOWED))


def test_no_unit_imports_what_its_rule_does_not_allow():
    offending = []
    for path in library_files():
        unit = unit_of_file(path)
        allowed = {unit, "", *LOW_LEVEL, *ALLOWED.get(unit, ())} if unit not in LOW_LEVEL else {unit, ""}
        for module in sorted(imported_modules(path)):
            target = unit_of_module(module)
            if target is not None and target not in allowed:
                offending.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offending, "\n".join(offending)


@pytest.mark.parametrize("where, forbidden", RULES, ids=[rule[0] for rule in RULES])
def test_finer_rules(where, forbidden):
    offending = [f"{path.relative_to(ROOT)} imports {m}" for path in _files(where) for m in sorted(imported_modules(path))
                 if any(m == p or m.startswith(p + ".") for p in forbidden)]
    assert not offending, "\n".join(offending)


def test_readme_states_these_rules():
    """The README's import table (under "## Architecture") lists the same rule for every unit."""
    text = README.read_text().split("## Architecture", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 2:
            names = re.findall(r"`([^`]+)`", cells[0].split("(")[0])
            imports = tuple(sorted(re.findall(r"`([^`]+)`", cells[1])))
            rows.update({name: imports for name in names})
    assert rows == {unit: tuple(sorted(allowed)) for unit, allowed in ALLOWED.items()}


def test_importing_methods_loads_no_trainer():
    """Transitively too: ``import fastkd.methods`` (and models) must not load ``fastkd.train``."""
    code = ("import sys, fastkd.methods, fastkd.models; "
            "print(sorted(m for m in sys.modules if m == 'fastkd.train' or m.startswith('fastkd.train.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
