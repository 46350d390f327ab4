"""The ahead-of-time Triton compile check: ``fastkd bench compile`` (fastkd.benchmarks.bench_compile,
fastkd.benchmarks.compile_check)."""

import json
import os
import subprocess
import sys

import pytest

from fastkd.benchmarks import bench_compile, compile_check

LISTING = """
Resource usage:
 Common:
  GLOBAL:0
 Function feature_align_fwd_kernel:
  REG:40 STACK:8 SHARED:0 LOCAL:16 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_resource_usage():
    usage = compile_check.parse_resource_usage(LISTING)
    assert usage == {"registers": 40, "stack_bytes": 8, "static_shared_bytes": 0, "local_bytes": 16}
    with pytest.raises(ValueError, match="expected one function"):
        compile_check.parse_resource_usage("Resource usage:\n")


@pytest.mark.parametrize(
    "stack, local, shared, ok",
    [(0, 0, 1024, True), (8, 0, 0, False), (0, 4, 0, False), (0, 0, 166913, False), (0, 0, 166912, True)],
)
def test_fits_flags_spills_and_shared_memory(stack, local, shared, ok):
    row = {"stack_bytes": stack, "local_bytes": local, "shared_bytes": shared, "shared_limit": 166912}
    assert compile_check.fits(row) is ok


def test_feature_align_configs_are_registered_for_vit_widths():
    labels = [c.label for c in compile_check.selected_configs(kernel="feature_align_fwd")]
    for width in (384, 768, 1024, 4096):
        assert any(f"D={width} " in label for label in labels), labels


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the check needs real Triton
    env.update(extra)
    return env


def test_real_compile_of_feature_align_for_sm80_and_sm90(tmp_path):
    published = tmp_path / "env_dir"
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "fastkd.cli", "bench", "compile", "--kernel", "feature_align_fwd",
                             "--out", str(out)], env=_env(FASTKD_BENCH_DIR=str(published)), cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not published.exists()  # --out wins over $FASTKD_BENCH_DIR
    rows = json.loads((out / "bench_compile.json").read_text())["records"]
    assert {row["target"] for row in rows} == {"sm_80", "sm_90"}
    assert all(row["ok"] and 0 < row["registers"] <= 255 and row["compile_s"] > 0 for row in rows)
    assert "configurations fit" in result.stdout and (out / "bench_compile.md").is_file()


def test_interpreted_kernels_are_refused(tmp_path):
    config = compile_check.selected_configs(kernel="feature_align_fwd")[0]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_check.check_config(config, 80, tmp_path)
    with pytest.raises(ValueError, match="cc must be one of"):
        compile_check.check_config(config, 75, tmp_path)


def _fake_check(monkeypatch, rows):
    written = []
    monkeypatch.setattr(bench_compile, "run_check", lambda configs, targets: rows)
    monkeypatch.setattr(bench_compile, "write_results",
                        lambda name, records, markdown, *, out_dir: written.append(out_dir) or out_dir / f"{name}.json")
    return written


def test_failures_exit_1(monkeypatch, tmp_path, capsys):
    row = {"kernel": "feature_align_fwd", "config": "x", "target": "sm_80", "ok": False, "stack_bytes": 64,
           "compile_s": 0.1}
    _fake_check(monkeypatch, [row])
    assert bench_compile.main(["--kernel", "feature_align_fwd", "--out", str(tmp_path)]) == 1
    assert "FAILED feature_align_fwd [x] sm_80" in capsys.readouterr().out
    assert bench_compile.main(["--kernel", "no_such_kernel", "--out", str(tmp_path)]) == 1
    assert "no Triton kernel configurations registered matching 'no_such_kernel'" in capsys.readouterr().out


def test_report_goes_to_the_build_folder_of_a_checkout_unless_told(monkeypatch, tmp_path, capsys):
    row = {"kernel": "feature_align_fwd", "config": "x", "target": "sm_80", "ok": True, "compile_s": 0.1}
    written = _fake_check(monkeypatch, [row])
    monkeypatch.delenv("FASTKD_BENCH_DIR", raising=False)
    checkout = tmp_path / "checkout"
    (checkout / "benchmarks" / "results").mkdir(parents=True)
    (checkout / "setup.py").write_text("")
    monkeypatch.chdir(checkout)
    args = ["--kernel", "feature_align_fwd"]
    assert bench_compile.main(args) == 0
    assert bench_compile.main([*args, "--out", str(tmp_path / "o")]) == 0
    assert bench_compile.main([*args, "--publish"]) == 0
    monkeypatch.setenv("FASTKD_BENCH_DIR", str(tmp_path / "env"))
    assert bench_compile.main(args) == 0
    assert written == [checkout / "build" / "kernel_check", tmp_path / "o", checkout / "benchmarks" / "results",
                       tmp_path / "env"]
    assert f"report: {tmp_path / 'o' / 'bench_compile.json'}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_compile.main(["--publish", "--out", str(tmp_path)])

    monkeypatch.delenv("FASTKD_BENCH_DIR")
    monkeypatch.chdir(tmp_path)  # not a checkout
    assert bench_compile.main(args) == 0
    assert written[-1] == tmp_path / "fastkd_bench_results"
    with pytest.raises(SystemExit):
        bench_compile.main([*args, "--publish"])
    assert "--publish writes into benchmarks/results/ of a fastkd source checkout" in capsys.readouterr().err
