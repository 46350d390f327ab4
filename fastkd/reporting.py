"""Reports of measured results, shared by the benchmarks, the compile check and the demo: the machine a result was
measured on, Markdown tables, and the JSON + Markdown files of a result (written with :mod:`fastkd.durable`).

Where benchmark results go (:func:`results_dir`), first that applies:

1. ``--out DIR``;
2. ``--publish``: the published results ``benchmarks/results/`` of the fastkd source checkout the
   command runs in (the current directory must be the checkout's root: it holds ``setup.py`` and
   ``benchmarks/results/``; an installed fastkd never writes into its own package folder);
3. ``$FASTKD_BENCH_DIR``;
4. a benchmark's own folder inside the checkout when run from one (the compile check: the
   git-ignored ``build/kernel_check/``);
5. ``./fastkd_bench_results`` in the current directory.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Iterable

from fastkd.durable import atomic_write_json, atomic_write_text

__all__ = ["cpu_info", "machine_info", "markdown_table", "write_report", "write_results", "results_dir",
           "checkout_root", "RESULTS_ENV", "DEFAULT_RESULTS_DIR", "PUBLISHED_RESULTS_DIR"]

RESULTS_ENV = "FASTKD_BENCH_DIR"
DEFAULT_RESULTS_DIR = "fastkd_bench_results"  # in the current directory
PUBLISHED_RESULTS_DIR = Path("benchmarks") / "results"  # in the source checkout


def load_average() -> str | None:
    """The machine's 1 / 5 / 15-minute load averages with the core count (``"0.12 / 0.30 / 0.41 on 2
    cores"``), or None where the OS has none. Benchmarks print it from their start: a ratio taken
    while another job loads the machine is not comparable."""
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):
        return None
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cores"


# /proc/cpuinfo flag prefixes that name SIMD / matrix instruction sets (what moves a kernel's speed)
ISA_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx", "vnni", "asimd", "sve")


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, tuple[str, ...]]:
    """The first processor's model name and its SIMD / matrix ISA flags (those starting with one of
    :data:`ISA_PREFIXES`, sorted) from ``cpuinfo``; ``platform.processor()`` and no flags where the
    file does not exist."""
    model, flags = platform.processor() or platform.machine(), ()
    try:
        first = Path(cpuinfo).read_text().split("\n\n")[0]
    except OSError:
        return model, flags
    for line in first.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name":
            model = value
        elif key in ("flags", "Features"):
            flags = tuple(sorted(flag for flag in value.split() if flag.startswith(ISA_PREFIXES)))
    return model, flags


def machine_info() -> dict:
    """CPU model and ISA flags, cores, GPU name and library versions, recorded with every result file."""
    import torch

    cpu, isa = cpu_info()
    return {"cpu": cpu, "cpu_isa": " ".join(isa), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": load_average(), "torch": torch.__version__, "python": platform.python_version(),
            "triton": _installed_version("triton"), "dali": dali_version(), "timm": _installed_version("timm")}


def _installed_version(*distributions: str) -> str | None:
    """The version of the first installed of ``distributions`` (read from its metadata), or None."""
    from importlib import metadata

    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


# the pip distributions DALI ships under (one per CUDA major version); the module is ``nvidia.dali``
DALI_DISTRIBUTIONS = ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali")


def dali_version() -> str | None:
    """The installed DALI's version, read from its distribution's metadata without importing DALI
    (only :mod:`fastkd.data`'s DALI backend imports it); ``"installed, version unknown"`` when
    ``nvidia.dali`` is importable under another distribution name; None when DALI is absent."""
    from importlib import util

    version = _installed_version(*DALI_DISTRIBUTIONS)
    if version is not None:
        return version
    try:
        found = util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # no ``nvidia`` namespace package at all
        found = False
    return "installed, version unknown" if found else None


def markdown_table(rows: Iterable[dict], columns: list[str]) -> str:
    """Render ``rows`` as a GitHub Markdown table with the given column order."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: str | os.PathLike, name: str, payload: dict, markdown: str) -> Path:
    """Write ``<out_dir>/<name>.json`` (``payload``) and ``<name>.md`` (``markdown``) durably,
    creating ``out_dir``; returns the JSON path."""
    out = Path(out_dir)
    json_path = atomic_write_json(out / f"{name}.json", payload)
    atomic_write_text(out / f"{name}.md", markdown.rstrip("\n") + "\n")
    return json_path


def write_results(name: str, records: list[dict], markdown: str, *, out_dir: str | os.PathLike | None = None,
                  load_at_start: str | None = None) -> Path:
    """Write ``<name>.json`` (``{"benchmark": name, "machine": machine_info(), "records": records}``,
    the machine also with ``load_average_at_start`` when given) and ``<name>.md`` into ``out_dir``
    (default :func:`results_dir`); returns the JSON path."""
    machine = {**machine_info(), **({"load_average_at_start": load_at_start} if load_at_start else {})}
    payload = {"benchmark": name, "machine": machine, "records": records}
    return write_report(results_dir() if out_dir is None else out_dir, name, payload, markdown)


def checkout_root(cwd: str | os.PathLike | None = None) -> Path | None:
    """``cwd`` (default: the current directory) when it is the root of a fastkd source checkout
    (it holds ``setup.py`` and ``benchmarks/results/``), else None."""
    root = Path.cwd() if cwd is None else Path(cwd)
    return root if (root / "setup.py").is_file() and (root / PUBLISHED_RESULTS_DIR).is_dir() else None


def results_dir(out: str | os.PathLike | None = None, *, publish: bool = False,
                in_checkout: str | os.PathLike | None = None) -> Path:
    """The folder benchmark results go to (see the module docstring for the order); ``in_checkout``:
    the benchmark's own folder, relative to the checkout root, when run from a checkout."""
    if out is not None and publish:
        raise ValueError("--out and --publish exclude each other")
    if out is not None:
        return Path(out)
    root = checkout_root()
    if publish:
        if root is None:
            raise ValueError(f"--publish writes into {PUBLISHED_RESULTS_DIR}/ of a fastkd source checkout: run it "
                             f"from the checkout's root folder (it holds setup.py), or choose a folder with --out DIR")
        return root / PUBLISHED_RESULTS_DIR
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    if in_checkout is not None and root is not None:
        return root / in_checkout
    return Path.cwd() / DEFAULT_RESULTS_DIR
