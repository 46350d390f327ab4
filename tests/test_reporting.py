"""fastkd.reporting: result files and where benchmark results go."""

import json
import subprocess
import sys
import warnings

import pytest

from fastkd import reporting


def test_write_results_writes_json_and_markdown(tmp_path):
    path = reporting.write_results("toy", [{"a": 1.5, "b": None}], "# toy", out_dir=tmp_path / "new")
    assert path == tmp_path / "new" / "toy.json"
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "toy" and payload["records"] == [{"a": 1.5, "b": None}]
    assert payload["machine"]["torch"] and payload["machine"]["cores"]
    assert (tmp_path / "new" / "toy.md").read_text() == "# toy\n"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["toy.json", "toy.md"]  # no temporary files


def test_machine_info_reads_the_dali_version_without_importing_dali():
    code = ("import sys; from fastkd.reporting import machine_info; info = machine_info(); "
            "print(info['dali']); print('nvidia.dali' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    dali, imported = done.stdout.strip().splitlines()[-2:]
    assert imported == "False"
    assert dali == str(reporting.dali_version())


def test_dali_version_falls_back_to_the_module_then_none(monkeypatch):
    import importlib.util

    monkeypatch.setattr(reporting, "DALI_DISTRIBUTIONS", ("no-such-distribution-of-dali",))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "nvidia.dali" else None)
    assert reporting.dali_version() == "installed, version unknown"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert reporting.dali_version() is None


def test_markdown_table():
    table = reporting.markdown_table([{"x": 0.123456, "y": 12345.6}, {"x": None}], ["x", "y"])
    assert table.splitlines() == ["| x | y |", "|---|---|", "| 0.123 | 12346 |", "|  |  |"]


def test_results_dir_order(tmp_path, monkeypatch):
    monkeypatch.delenv(reporting.RESULTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert reporting.checkout_root() is None
    assert reporting.results_dir() == tmp_path / "fastkd_bench_results"
    assert reporting.results_dir(in_checkout="build/x") == tmp_path / "fastkd_bench_results"
    assert reporting.results_dir("rel") == reporting.results_dir(tmp_path / "rel").relative_to(tmp_path)
    with pytest.raises(ValueError, match="--publish writes into benchmarks/results/"):
        reporting.results_dir(publish=True)
    with pytest.raises(ValueError, match="exclude each other"):
        reporting.results_dir(tmp_path, publish=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "setup.py").write_text("")
    assert reporting.checkout_root() == tmp_path
    assert reporting.results_dir(publish=True) == tmp_path / "benchmarks" / "results"
    assert reporting.results_dir(in_checkout="build/x") == tmp_path / "build" / "x"
    assert reporting.results_dir() == tmp_path / "fastkd_bench_results"
    monkeypatch.setenv(reporting.RESULTS_ENV, str(tmp_path / "env"))
    assert reporting.results_dir() == reporting.results_dir(in_checkout="build/x") == tmp_path / "env"
    assert reporting.results_dir(publish=True) == tmp_path / "benchmarks" / "results"
    assert reporting.results_dir(tmp_path / "o") == tmp_path / "o"
