"""GPU suite, end to end: 20 bf16 training steps of every method (MOMA in its three modes) on random
data on CUDA through ``fastkd.runner.train_from_config`` with the demo configs, the first step's
loss against the same step with every fused op routed to its reference (``reference_ops()``), no
compilation after the warm-up (``train.compile: auto`` compiles on CUDA: dynamo's graph count after
step 2 equals that after step 20, as ``tests/train/test_compile_steps.py`` checks on CPU), and
``fastkd bench ops --device cuda --quick`` in a subprocess. Run with ``make gpu-test``."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch._dynamo.utils import counters

from fastkd.ops import reference_ops
from fastkd.train.logging import TrainLogger
from tests.gpu.conftest import require_time, seconds_left
from tests.method_runs import RUNS, make_workspace, run_method

pytestmark = pytest.mark.gpu

STEPS = 20
# hybrid_distill's kept-token count moves with its keep schedule: the first move (at step 2 here, not
# at 30% of the run) recompiles once with that dimension dynamic, the warm-up the graph count is
# taken after; the later stage (at 60%) must reuse that graph
WARM_UP_OVERRIDES = {"hybrid_distill": ["method.keep_schedule=[[0.0, 1.0], [0.05, 0.85], [0.6, 0.7]]"]}
# bf16 autocast: the references run their matmuls in bf16 under autocast, the fused ops in fp32
FIRST_STEP_RTOL, FIRST_STEP_ATOL = 2e-2, 2e-3


@pytest.fixture(scope="module")
def workspace(_cuda_required, tmp_path_factory):
    """Random images (``write_sample_dataset``) and the two teacher checkpoints the demo configs name."""
    return make_workspace(tmp_path_factory.mktemp("gpu_training"))


def _run(workspace, run: str, output_dir: Path, steps: int):
    """The demo config of ``run`` with the test's teachers and data, bf16 on CUDA, ``steps`` steps
    (``train.compile: auto``: compiled)."""
    return run_method(workspace, run, output_dir, [
        "data.backend=torch", "train.device=cuda", "train.precision=bf16", "train.epochs=100",
        f"train.max_steps={steps}", "train.log_every=1", "train.checkpoint_every=1000",
        *WARM_UP_OVERRIDES.get(run, []),
    ])


def _count_graphs_per_step(monkeypatch) -> dict[int, int]:
    """From now on, ``{step: dynamo's unique_graphs count}`` after every logged step (``train.log_every=1``
    logs each one); the count starts from zero."""
    graphs: dict[int, int] = {}
    log = TrainLogger.log

    def counting_log(self, metrics: dict) -> None:
        graphs[int(metrics["step"])] = counters["stats"]["unique_graphs"]
        log(self, metrics)

    monkeypatch.setattr(TrainLogger, "log", counting_log)
    counters.clear()
    return graphs


@pytest.mark.parametrize("run", sorted(RUNS))
def test_training_bf16(run, workspace, fig, tmp_path, monkeypatch):
    require_time(25, "a training run")
    with reference_ops():
        reference = _run(workspace, run, tmp_path / "reference", 1)
    graphs = _count_graphs_per_step(monkeypatch)
    start = time.perf_counter()
    result = _run(workspace, run, tmp_path / "fused", STEPS)
    fig.note(f"{STEPS} fused steps in {time.perf_counter() - start:.1f} s")
    with (tmp_path / "fused" / "run" / "metrics.csv").open() as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert result.step == STEPS and result.skipped_steps == 0, result
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    fig.note(f"loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    fig.compare_scalar("first-step loss fused vs reference", losses[0], reference.summary["final_loss"],
                       FIRST_STEP_RTOL, FIRST_STEP_ATOL)
    fig.note(f"{graphs[2]} compiled graphs after step 2, {graphs[STEPS]} after step {STEPS}")
    assert graphs[2] > 0, f"train.compile: auto compiled nothing on CUDA: {dict(counters['stats'])}"
    assert graphs[STEPS] == graphs[2], f"recompiled after the warm-up: graphs per step {graphs}"


def test_bench_ops_cuda_quick(fig, tmp_path):
    """``fastkd bench ops --device cuda --quick`` exits 0 (results go to a temporary FASTKD_BENCH_DIR)."""
    require_time(60, "the op benchmarks")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTKD_BENCH_DIR"] = str(tmp_path)
    timeout = max(30.0, min(420.0, seconds_left() - 10))
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "fastkd.cli", "bench", "ops", "--device", "cuda", "--quick"],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fastkd bench ops --device cuda --quick did not finish within {timeout:.0f} s")
    fig.note(f"fastkd bench ops --device cuda --quick {time.perf_counter() - start:.0f} s, exit {proc.returncode}")
    assert proc.returncode == 0, (proc.stdout[-3000:] + proc.stderr[-3000:]).strip().splitlines()[-1:]
    assert (tmp_path / "bench_ops.json").is_file()


def test_device_skip_steps_never_wait_for_the_gpu(fig, tmp_path):
    """``train.skip_decision: auto`` on CUDA decides on the device: three steps (the middle one with a
    planted NaN loss) run under ``torch.cuda.set_sync_debug_mode("error")``, where any host wait
    raises, and the NaN step alone is skipped."""
    require_time(20, "the sync-free steps")
    import torch

    from fastkd.data.batch import Batch
    from fastkd.train.options import OptimConfig, TrainConfig
    from fastkd.train.trainer import Trainer
    from tests.train.test_device_skip import DeviceSkipTinyMethod
    from tests.train.tiny_method import TensorLoader

    cpu_loader = TensorLoader(32, 8)
    batches = [Batch([v.cuda() for v in b.views], b.labels.cuda(), b.indices.cuda()) for b in cpu_loader]
    trainer = Trainer(DeviceSkipTinyMethod(nan_steps=(2,)), batches, batch_size=8, optim=OptimConfig(lr=1e-2),
                      train=TrainConfig(device="cuda", precision="bf16", output_dir=str(tmp_path), progress=False,
                                        tensorboard=False))
    assert trainer.device_skip
    stream = iter(batches)
    trainer.train_step(stream, 0)  # warm-up: lazy optimiser state, allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stepped = [trainer.train_step(stream, step)[0] for step in (1, 2, 3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [bool(s) for s in stepped] == [True, False, True]
    fig.note("3 steps, no host wait; the NaN step skipped on the device")
