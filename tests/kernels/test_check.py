"""The ahead-of-time kernel compile check (fastkd.kernels.check)."""

import json
import os
import subprocess
import sys

import pytest

from fastkd.kernels import check
from fastkd.kernels.registry import all_compile_configs

LISTING = """
Resource usage:
 Common:
  GLOBAL:0
 Function feature_align_fwd_kernel:
  REG:40 STACK:8 SHARED:0 LOCAL:16 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_resource_usage():
    usage = check.parse_resource_usage(LISTING)
    assert usage == {"registers": 40, "stack_bytes": 8, "static_shared_bytes": 0, "local_bytes": 16}
    with pytest.raises(ValueError, match="expected one function"):
        check.parse_resource_usage("Resource usage:\n")


@pytest.mark.parametrize(
    "stack, local, shared, ok",
    [(0, 0, 1024, True), (8, 0, 0, False), (0, 4, 0, False), (0, 0, 166913, False), (0, 0, 166912, True)],
)
def test_fits_flags_spills_and_shared_memory(stack, local, shared, ok):
    row = {"stack_bytes": stack, "local_bytes": local, "shared_bytes": shared, "shared_limit": 166912}
    assert check.fits(row) is ok


def test_feature_align_configs_are_registered_for_vit_widths():
    labels = [c.label for c in all_compile_configs() if c.name == "feature_align_fwd"]
    for width in (384, 768, 1024, 4096):
        assert any(f"D={width} " in label for label in labels), labels


def _run_check(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fastkd.kernels.check", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def test_real_compile_of_feature_align_for_sm80_and_sm90(tmp_path):
    published = tmp_path / "published"
    result = _run_check("--kernel", "feature_align_fwd", "--out-dir", str(tmp_path),
                        env_extra={"FASTKD_BENCH_DIR": str(published)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert not published.exists()  # only --publish writes into the published results
    rows = json.loads((tmp_path / "kernel_check.json").read_text())["records"]
    assert {row["target"] for row in rows} == {"sm_80", "sm_90"}
    assert all(row["ok"] and 0 < row["registers"] <= 255 for row in rows)
    assert "configurations fit" in result.stdout and (tmp_path / "kernel_check.md").is_file()


def test_interpreted_kernels_are_refused(tmp_path):
    config = next(c for c in all_compile_configs() if c.name == "feature_align_fwd")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        check.check_config(config, 80, tmp_path)
    with pytest.raises(ValueError, match="cc must be one of"):
        check.check_config(config, 75, tmp_path)


def test_main_exit_code(monkeypatch, capsys):
    row = {"kernel": "feature_align_fwd", "config": "x", "target": "sm_80", "ok": False, "stack_bytes": 64}
    monkeypatch.setattr(check, "run_check", lambda configs, targets: [row])
    monkeypatch.setattr(check, "write_results", lambda *args, **kwargs: None)
    assert check.main(["--kernel", "feature_align_fwd"]) == 1
    assert "FAILED feature_align_fwd [x] sm_80" in capsys.readouterr().out
    assert check.main(["--kernel", "no_such_kernel"]) == 1


def test_report_goes_to_the_build_folder_unless_published(monkeypatch, tmp_path, capsys):
    from fastkd.benchmarks.common import RESULTS_DIR

    row = {"kernel": "feature_align_fwd", "config": "x", "target": "sm_80", "ok": True}
    written = []
    monkeypatch.setattr(check, "run_check", lambda configs, targets: [row])
    monkeypatch.setattr(check, "write_results", lambda name, rows, markdown, *, out_dir=None: written.append(out_dir))
    assert check.main(["--kernel", "feature_align_fwd"]) == 0
    assert check.default_report_dir().parts[-2:] == ("build", "kernel_check")
    assert check.main(["--kernel", "feature_align_fwd", "--out-dir", str(tmp_path)]) == 0
    assert check.main(["--kernel", "feature_align_fwd", "--publish"]) == 0
    assert written == [check.default_report_dir(), tmp_path, RESULTS_DIR]
    assert f"report: {tmp_path / 'kernel_check.json'}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        check.main(["--publish", "--out-dir", str(tmp_path)])
