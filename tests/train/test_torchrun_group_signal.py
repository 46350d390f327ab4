"""Under ``python -m fastkd.launch`` (torchrun with a graceful agent) a SIGTERM / SIGINT to the whole
process group, or to the launcher alone (Kubernetes signals PID 1 only), writes the stop checkpoint
of every rank at the same step and exits 0; ``--resume`` continues (real subprocesses: launcher,
2 gloo workers on CPU, their DataLoader workers).

For contrast, plain torchrun: its agent raises ``SignalException`` on the first signal, tears the
workers down (the same signal to each worker's process group, SIGKILL after a grace period) and
exits 1 with a traceback, although the fastkd workers write their stop checkpoint and exit 0;
``test_plain_torchrun_exits_1_where_fastkd_launch_exits_0`` shows it with a tiny worker script.
torch starts each worker in its own session, so a signal to the launcher's process group reaches the
workers only through the agent: the agent's handling decides the outcome.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fastkd.data import write_sample_dataset
from tests.train.test_group_signal import wait_until

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "demo" / "mae.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
HANG_GUARD_S = 300  # generous: only ends a hung run, never judges speed

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
PROC = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the processes through /proc")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_sample_dataset(tmp_path_factory.mktemp("torchrun_group_signal") / "data", images=96)


def _popen(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _launch(images: Path, out: Path, num_workers: int, *extra: str) -> subprocess.Popen:
    """``python -m fastkd.launch --standalone --nproc_per_node 2 -m fastkd.cli pretrain ...`` (tiny MAE)."""
    return _popen([
        sys.executable, "-m", "fastkd.launch", "--standalone", "--nproc_per_node", "2",
        "-m", "fastkd.cli", "pretrain", str(CONFIG), f"data.source={images}", "data.backend=torch",
        "data.batch_size=8", f"data.num_workers={num_workers}", "train.epochs=200", "train.checkpoint_every=1000",
        "train.log_every=1", f"train.output_dir={out}", "train.tensorboard=false", "train.progress=false",
        "method.backbone.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}", *extra,
    ])


def _logged_steps(out: Path) -> list[int]:
    path = out / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [int(float(row["step"])) for row in csv.DictReader(handle) if row.get("step")]


def _wait_for(process: subprocess.Popen, done, what: str) -> None:
    wait_until(process, done, what, HANG_GUARD_S)


def _finish(process: subprocess.Popen) -> tuple[str, str]:
    try:
        return process.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"the launcher did not exit within {HANG_GUARD_S} s after the signal: {err[-3000:]}")


def _assert_stopped_at_last_logged_step(out: Path, err: str) -> int:
    """The stop checkpoint is the newest one and holds the last logged step; returns that step."""
    steps = _logged_steps(out)
    assert steps == list(range(1, steps[-1] + 1)), steps
    checkpoints = sorted((out / "checkpoints").glob("checkpoint_*.pt"))
    assert checkpoints, f"no checkpoint written: {err[-3000:]}"
    state = torch.load(checkpoints[-1], weights_only=True)
    assert state["step"] == steps[-1]
    assert f"checkpoint at step {steps[-1]} written, exiting" in err, err[-3000:]
    assert json.loads((out / "summary.json").read_text())["preempted"] is True
    assert not list((out / "checkpoints").glob(".*.tmp")), "a temporary checkpoint file was left behind"
    return steps[-1]


def _children(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes (from ``/proc``)."""
    children = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
        except OSError:  # the process ended meanwhile
            continue
    return children


def _worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of the launcher's child process (a worker) whose environment has ``RANK=rank``."""
    for pid in _children(launcher_pid):
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return pid
    pytest.fail(f"no worker with RANK={rank} under the launcher {launcher_pid}")


@PROC
def test_group_sigterm_writes_the_stop_checkpoint_exits_0_and_resume_continues(tmp_path, images):
    """``killpg`` reaches the launcher only (each worker has its own session); the workers (with a
    DataLoader worker each) stop through the forwarded SIGTERM. The resumed run is then stopped as
    Slurm's ``scancel --signal=INT`` does: SIGINT to every process (DataLoader workers, workers,
    launcher), so the workers get SIGINT and then the forwarded SIGTERM (a forwarded SIGINT would be
    a second SIGINT: "quit now")."""
    out = tmp_path / "run"
    process = _launch(images, out, 1)
    _wait_for(process, lambda: len(_logged_steps(out)) >= 3, "3 logged steps")
    os.killpg(process.pid, signal.SIGTERM)  # launcher (agent) only: the workers have their own sessions
    _, err = _finish(process)
    assert process.returncode == 0, err[-3000:]
    assert "[fastkd.launch] SIGTERM received: sent SIGTERM to the worker(s)" in err, err[-3000:]
    stopped = _assert_stopped_at_last_logged_step(out, err)

    process = _launch(images, out, 1, "--resume")
    _wait_for(process, lambda: len(_logged_steps(out)) >= stopped + 2, f"step {stopped + 2} after --resume")
    workers = _children(process.pid)
    data_workers = [pid for worker in workers for pid in _children(worker)]
    assert len(workers) == 2 and data_workers, (workers, data_workers)
    for pid in [*data_workers, *workers, process.pid]:
        os.kill(pid, signal.SIGINT)
    stdout, err = _finish(process)
    assert process.returncode == 0, err[-3000:]
    assert "[fastkd.launch] SIGINT received: sent SIGTERM to the worker(s)" in err, err[-3000:]
    assert f"at step {stopped}" in stdout and "resumed from" in stdout, stdout[-3000:]
    assert _assert_stopped_at_last_logged_step(out, err) >= stopped + 2


def test_sigterm_to_the_launcher_only_writes_the_stop_checkpoint_and_exits_0(tmp_path, images):
    """Kubernetes signals PID 1 only, which may be the launcher (in-process data loading here)."""
    out = tmp_path / "run"
    process = _launch(images, out, 0)
    _wait_for(process, lambda: len(_logged_steps(out)) >= 3, "3 logged steps")
    os.kill(process.pid, signal.SIGTERM)
    _, err = _finish(process)
    assert process.returncode == 0, err[-3000:]
    _assert_stopped_at_last_logged_step(out, err)


@PROC
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, images):
    """Only rank 1 gets the signal (and its DataLoader worker does not): the ranks agree on the stop
    after the step (a collective), rank 0 writes the checkpoint, every process exits 0."""
    out = tmp_path / "run"
    process = _launch(images, out, 1)
    _wait_for(process, lambda: len(_logged_steps(out)) >= 3, "3 logged steps")
    os.kill(_worker_pid(process.pid, 1), signal.SIGTERM)
    _, err = _finish(process)
    assert process.returncode == 0, err[-3000:]
    assert "stop requested (another rank)" in err and "[fastkd.launch]" not in err, err[-3000:]
    _assert_stopped_at_last_logged_step(out, err)


# A tiny worker (no torch): records each signal it gets; SIGTERM / SIGINT end it with exit code 0 after
# ``STOP_S`` seconds (a stop checkpoint being written); a SIGINT during that time ends it at once
# (force quit, like the trainer); rank ``FAIL_RANK`` exits 3 instead of 0.
WORKER = """
import os, signal, sys, time
marker, rank = sys.argv[1], os.environ["RANK"]
got = []
def note(line):
    with open(marker, "a") as handle:
        handle.write(line + "\\n")
def handle(signum, frame):
    if got and signum == signal.SIGINT:
        note(f"forced {rank}")
        os._exit(130)
    got.append(signal.Signals(signum).name)
    note(f"got {rank} {got[-1]}")
signal.signal(signal.SIGTERM, handle)
signal.signal(signal.SIGINT, handle)
note(f"start {rank}")
deadline = time.monotonic() + 300
while not got and time.monotonic() < deadline:
    time.sleep(0.01)
stop_at = time.monotonic() + float(os.environ.get("STOP_S", "0"))
while time.monotonic() < stop_at:
    time.sleep(0.01)
note(f"exit {rank} {' '.join(got)}")
sys.exit(3 if rank == os.environ.get("FAIL_RANK") else 0)
"""


def _tiny(tmp_path: Path, launcher: str, *options: str, **env: str) -> tuple[subprocess.Popen, Path]:
    script, marker = tmp_path / "worker.py", tmp_path / "marker.txt"
    script.write_text(WORKER)
    module = "fastkd.launch" if launcher == "fastkd.launch" else "torch.distributed.run"
    command = [sys.executable, "-m", module, "--standalone", "--nproc_per_node", "2", *options,
               str(script), str(marker)]
    process = subprocess.Popen(command, cwd=ROOT, env={**ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    return process, marker


def _lines(marker: Path, prefix: str) -> list[str]:
    return [line for line in marker.read_text().splitlines() if line.startswith(prefix)] if marker.exists() else []


@pytest.mark.parametrize("launcher, signum, returncode", [
    ("torchrun", signal.SIGTERM, 1),  # the contrast: the workers stop cleanly, torchrun still fails
    ("fastkd.launch", signal.SIGTERM, 0),
    ("fastkd.launch", signal.SIGINT, 0),  # Ctrl-C: the workers get SIGTERM (a repeated SIGINT would force quit)
])
def test_plain_torchrun_exits_1_where_fastkd_launch_exits_0(tmp_path, launcher, signum, returncode):
    process, marker = _tiny(tmp_path, launcher, STOP_S="0.5")
    _wait_for(process, lambda: len(_lines(marker, "start")) == 2, "2 started workers")
    os.killpg(process.pid, signum)
    _, err = _finish(process)
    assert process.returncode == returncode, err[-3000:]
    forwarded = signum if launcher == "torchrun" else signal.SIGTERM
    assert sorted(_lines(marker, "exit")) == [f"exit {rank} {forwarded.name}" for rank in (0, 1)], err[-3000:]
    assert ("SignalException" in err) == (launcher == "torchrun"), err[-3000:]


def test_a_second_signal_tears_the_workers_down(tmp_path):
    """Ctrl-C twice: the first is graceful, the second is torchrun's tear-down (SIGINT to the workers)."""
    process, marker = _tiny(tmp_path, "fastkd.launch", STOP_S="300")
    _wait_for(process, lambda: len(_lines(marker, "start")) == 2, "2 started workers")
    os.killpg(process.pid, signal.SIGINT)
    _wait_for(process, lambda: len(_lines(marker, "got")) == 2, "the forwarded signal")
    os.killpg(process.pid, signal.SIGINT)
    _, err = _finish(process)
    assert process.returncode == 1, err[-3000:]
    assert sorted(_lines(marker, "forced")) == ["forced 0", "forced 1"], err[-3000:]
    assert "SIGINT again: stopping the workers now" in err and "SignalException" in err, err[-3000:]


def test_no_worker_restart_after_a_stop(tmp_path):
    """A worker failing after the stop request would be restarted (``--max-restarts``): the launcher
    starts no new workers and tears down instead, with a non-zero exit."""
    process, marker = _tiny(tmp_path, "fastkd.launch", "--max-restarts", "1", FAIL_RANK="1")
    _wait_for(process, lambda: len(_lines(marker, "start")) == 2, "2 started workers")
    os.kill(process.pid, signal.SIGTERM)
    _, err = _finish(process)
    assert process.returncode == 1, err[-3000:]
    assert len(_lines(marker, "start")) == 2, marker.read_text()
    assert "not starting new workers after SIGTERM" in err, err[-3000:]
