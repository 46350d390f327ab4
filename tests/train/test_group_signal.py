"""A SIGTERM / SIGINT sent to the whole process group (``docker stop``, Slurm, Kubernetes) writes the
stop checkpoint and exits 0, with either data backend, at several moments of a real run (real
subprocesses: the `fastkd` CLI, its data workers and a group signal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastkd.data import dali_available, write_sample_dataset

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "demo" / "mae.yaml"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_sample_dataset(tmp_path_factory.mktemp("group_signal") / "data", images=96)


def _rows(csv_path: Path) -> int:
    return max(0, len(csv_path.read_text().splitlines()) - 1) if csv_path.exists() else 0


def _start(images: Path, out: Path, backend: str, checkpoint_every: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "fastkd.cli", "pretrain", str(CONFIG), f"data.source={images}",
        f"data.backend={backend}", "data.batch_size=8", "data.num_workers=2", "train.epochs=200",
        f"train.checkpoint_every={checkpoint_every}", "train.log_every=1", f"train.output_dir={out}",
        "train.tensorboard=false", "train.progress=false",
        "method.backbone.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_until(process: subprocess.Popen, done, what: str, timeout: float = 300) -> None:
    """Poll ``done()`` until true; fail if ``process`` ends first or after ``timeout`` s (a hang
    guard, not a timed assertion: the process group is killed then)."""
    deadline = time.monotonic() + timeout
    while not done():
        if process.poll() is not None:
            pytest.fail(f"the run ended before {what}: {process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.02)


def _wait_for_rows(process: subprocess.Popen, csv_path: Path, rows: int, timeout: float = 300) -> None:
    wait_until(process, lambda: _rows(csv_path) >= rows, f"step {rows}", timeout)


BACKENDS = ["torch", pytest.param("dali_cpu", marks=pytest.mark.skipif(not dali_available(), reason="no DALI"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("moment, signum, checkpoint_every", [
    ("first step", signal.SIGTERM, 1000),          # workers just started
    ("mid run", signal.SIGTERM, 1000),
    ("during checkpoint writes", signal.SIGTERM, 1),  # a checkpoint is written after every step
    ("mid run", signal.SIGINT, 1000),
])
def test_group_signal_writes_the_stop_checkpoint_and_exits_0(tmp_path, images, backend, moment, signum,
                                                             checkpoint_every):
    out = tmp_path / "run"
    process = _start(images, out, backend, checkpoint_every)
    _wait_for_rows(process, out / "metrics.csv", 1 if moment == "first step" else 4)
    if moment == "during checkpoint writes":
        time.sleep(0.01)
    os.killpg(process.pid, signum)
    try:
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, err[-3000:]
    assert f"stop requested ({signal.Signals(signum).name})" in err, err[-3000:]
    checkpoints = sorted((out / "checkpoints").glob("checkpoint_*.pt"))
    assert checkpoints, f"no checkpoint written: {err[-3000:]}"
    state = torch.load(checkpoints[-1], weights_only=True)
    assert state["step"] >= 1
    assert not list((out / "checkpoints").glob(".*.tmp")), "a temporary checkpoint file was left behind"
