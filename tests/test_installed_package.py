"""fastkd installed with ``pip install`` (not editable) works outside the checkout: the demo (its
configs are package data), ``fastkd bench ops --quick`` and ``fastkd bench compile --quick`` (the full
check is ``make kernel-check``) run from an unrelated folder, write their results there and nothing
into site-packages.

Slow: about 2-3 minutes on 2 cores, plus about 1.5 minutes the first time to compile the C++
extension. A fresh venv (``--system-site-packages``, plus a ``.pth`` line naming this test venv's
site-packages, so torch and the other dependencies are not reinstalled) gets ``pip install
--no-deps --no-build-isolation`` of a copy of the checkout's sources, with ``FASTKD_BUILD_CUDA=0``.
Copy and venv live at fixed paths in the git-ignored ``build/installed_package_test/``, and the copy
keeps its setuptools object files (and the sources' file times) between runs, so ninja recompiles
only changed C++ sources; everything else is a fresh, real install: wheel, extension, package data,
entry points.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "build" / "installed_package_test"  # kept between runs: src/ (its build/temp*) and venv/
SOURCES = ("setup.py", "README.md", "fastkd", "kernels", "benchmarks", "configs", "csrc")
LIMIT_S = 600  # a hang guard per command, not a speed check

pytestmark = pytest.mark.slow


def _sync_sources(dest: Path) -> None:
    """Replace everything in ``dest`` but its compiled objects (``build/temp*``) with the files
    ``pip install`` needs (file times kept), without build products and published results."""
    dest.mkdir(parents=True, exist_ok=True)
    for child in [*dest.iterdir(), *dest.glob("build/lib*"), *dest.glob("build/bdist*")]:
        if child.name != "build":  # build/temp*: the compiled objects ninja reuses
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", "results", "*.egg-info")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=ignore)
        else:
            shutil.copy2(source, dest / name)


def _files(folder: Path) -> set[str]:
    """Every file under ``folder`` except bytecode."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def _run(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=LIMIT_S)
    print(f"{Path(command[0]).name} {' '.join(command[1:])}: exit {done.returncode}, "
          f"{time.perf_counter() - start:.0f} s")
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def installed():
    """``(venv bin folder, its site-packages, env)``: a fresh venv with fastkd installed from a copy of
    the checkout. Both live at fixed paths (the compile commands name the venv's include folder)."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with open(BUILD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one test run at a time uses the folder
        src, venv = BUILD_DIR / "src", BUILD_DIR / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--clear", "--system-site-packages", "--without-pip", str(venv)],
                       check=True, timeout=LIMIT_S)
        python = venv / "bin" / "python"
        purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                      check=True, capture_output=True, text=True).stdout.strip())
        (purelib / "fastkd_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH", "FASTKD_BENCH_DIR")}
        env.update(FASTKD_BUILD_CUDA="0", VIRTUAL_ENV=str(venv),
                   PATH=os.pathsep.join([str(venv / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")]))
        _sync_sources(src)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                        "--no-build-isolation", str(src)], check=True, env=env, cwd=BUILD_DIR, timeout=LIMIT_S)
        print(f"pip install: {time.perf_counter() - start:.0f} s")
        yield venv / "bin", purelib, env


def test_installed_package_runs_outside_the_checkout(installed, tmp_path):
    bin_dir, purelib, env = installed
    work = tmp_path / "work"
    work.mkdir()
    where = _run([str(bin_dir / "python"), "-c", "import torch, fastkd, fastkd._C, fastkd.configs as c; "
                  "print(fastkd.__file__); print(c.demo_config_dir())"], work, env).stdout.split()
    assert all(Path(path).is_relative_to(purelib) for path in where), where  # the installed copy, not the checkout
    assert (purelib / "fastkd" / "configs" / "demo" / "moma.yaml").is_file()
    assert (purelib / "fastkd" / "configs" / "mae_vits.yaml").is_file()
    before = _files(purelib)

    _run([str(bin_dir / "python"), "-m", "fastkd.demo", "--quick", "--images", "24", "--val-images", "12"], work, env)
    _run([str(bin_dir / "fastkd"), "bench", "ops", "--quick"], work, env)
    _run([str(bin_dir / "fastkd"), "bench", "compile", "--quick"], work, env)  # the full check: make kernel-check

    assert _files(purelib) == before  # nothing written into site-packages
    assert (work / "demo_out" / "demo.json").is_file() and (work / "demo_out" / "demo.png").is_file()
    results = work / "fastkd_bench_results"
    for name in ("bench_ops.json", "bench_ops.md", "bench_ops.png", "bench_ema.json", "bench_compile.json",
                 "bench_compile.md"):
        assert (results / name).is_file(), name
