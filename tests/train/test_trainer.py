"""Trainer behaviour: NaN skip / stop, gradient accumulation, per-model optimisers, logs, exact
resume after kill -9 and SIGTERM (subprocesses), a corrupt latest checkpoint, 2-process DDP."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastkd.train.distributed import DistEnv
from fastkd.train.options import OptimConfig, TrainConfig
from fastkd.train.trainer import NonFiniteLossError, Trainer
from tests.train import tiny_method
from tests.train.tiny_method import TensorLoader, TinyMethod

ROOT = Path(__file__).resolve().parents[2]
CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# the same thread count as the in-process reference run: bit-identity needs the same reduction order
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}


def make_trainer(out, method=None, *, batch=8, accum=1, epochs=1, max_steps=None, lr_warmup=0.0, **train):
    method = method or TinyMethod()
    optim_overrides = train.pop("optim", {})
    train_cfg = TrainConfig(epochs=epochs, max_steps=max_steps, precision=train.pop("precision", "fp32"),
                            device="cpu", output_dir=str(out), progress=False, tensorboard=False,
                            log_every=train.pop("log_every", 1), **train)
    optim = OptimConfig(lr=1e-2, min_lr=1e-2 if lr_warmup == 0 else 0.0, warmup_epochs=lr_warmup,
                        accum_steps=accum, **optim_overrides)
    return Trainer(method, TensorLoader(32, batch), batch_size=batch, train=train_cfg, optim=optim, env=CPU)


def params(method):
    return {k: v.clone() for k, v in method.state_dict().items()}


def assert_same(a, b, exact=True):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def run_tiny(out, *args, check=True):
    return subprocess.run([sys.executable, "-m", "tests.train.tiny_method", "--out", str(out), "--noise", *args],
                          cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, check=check, timeout=600)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run of tests.train.tiny_method (in this process)."""
    out = tmp_path_factory.mktemp("reference")
    tiny_method.main(["--out", str(out), "--noise"])
    return torch.load(out / "final.pt", weights_only=True)


def test_planted_nan_skips_exactly_that_step(tmp_path, capsys):
    torch.manual_seed(0)
    clean = TinyMethod()
    torch.manual_seed(0)
    planted = TinyMethod(nan_steps=(2,))
    make_trainer(tmp_path / "clean", clean, max_steps=2).fit()
    result = make_trainer(tmp_path / "nan", planted, max_steps=3).fit()
    assert result.skipped_steps == 1 and result.step == 3
    assert planted.after_step_calls == [0, 1]
    assert_same(params(clean), params(planted))  # the NaN step changed nothing (constant lr)
    assert "step 2: non-finite loss" in capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "nan" / "metrics.csv")))
    assert rows[-1]["skipped_steps"] == "1.0" and rows[-1]["loss"] == "nan"


def test_repeated_nan_stops_with_step_and_parts(tmp_path):
    trainer = make_trainer(tmp_path, TinyMethod(nan_steps=(1, 2, 3)), max_nonfinite=3)
    with pytest.raises(NonFiniteLossError, match=r"stopping at step 3: 3 consecutive non-finite steps") as error:
        trainer.fit()
    assert "regression=" in str(error.value) and "loss=nan" in str(error.value)


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    torch.manual_seed(0)
    big, small = TinyMethod(), TinyMethod()
    small.load_state_dict(big.state_dict())
    make_trainer(tmp_path / "big", big, batch=8, epochs=2, lr_warmup=0.5).fit()
    trainer = make_trainer(tmp_path / "acc", small, batch=4, accum=2, epochs=2, lr_warmup=0.5)
    assert trainer.global_batch_size == 8 and trainer.total_steps == 8
    trainer.fit()
    assert_same(params(big), params(small), exact=False)


def test_linear_lr_scaling_and_per_model_optimisers(tmp_path):
    class TwoModels(TinyMethod):
        def param_groups(self, weight_decay):
            return [{"params": list(self.student.parameters()), "weight_decay": weight_decay, "model": "a"},
                    {"params": list(self.head.parameters()), "weight_decay": weight_decay, "model": "b"}]

    trainer = make_trainer(tmp_path, TwoModels(), max_steps=2, optim=dict(
        per_model={"a": {"name": "sgd", "lr": 0.5, "clip_grad": 1.0}, "b": {"lr": None, "blr": 0.32}}))
    slots = {slot.name: slot for slot in trainer.slots}
    assert isinstance(slots["a"].optimizer, torch.optim.SGD) and isinstance(slots["b"].optimizer, torch.optim.AdamW)
    assert slots["b"].lr(0) == pytest.approx(0.32 * 8 / 256)
    trainer.fit()
    header = next(csv.reader(open(tmp_path / "metrics.csv")))
    assert {"lr_a", "lr_b", "grad_norm_a", "grad_norm_b"} <= set(header)
    with pytest.raises(ValueError, match=r"per_model names \['c'\]"):
        make_trainer(tmp_path, TwoModels(), optim=dict(per_model={"c": {"lr": 1.0}}))


def test_logs_summary_and_plot(tmp_path):
    result = make_trainer(tmp_path, epochs=2).fit()
    assert result.step == result.total_steps == 8 and not result.preempted
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert {"loss", "regression", "decay", "lr", "images_per_s"} <= set(rows[0])
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    assert '"final_loss"' in (tmp_path / "summary.json").read_text()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint_000000008.pt"]


def test_bf16_autocast_runs(tmp_path):
    result = make_trainer(tmp_path, max_steps=2, precision="bf16").fit()
    assert result.skipped_steps == 0


def test_trainer_rejects_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="must be a fastkd.method_protocol.TrainingMethod"):
        Trainer(torch.nn.Linear(2, 2), TensorLoader(), batch_size=8, env=CPU)
    with pytest.raises(ValueError, match="fewer than optim.accum_steps=5"):
        make_trainer(tmp_path, batch=8, accum=5)
    with pytest.raises(ValueError, match="fp16"):
        make_trainer(tmp_path, precision="fp16")
    with pytest.raises(ValueError, match="train.log_every"):
        TrainConfig(log_every=0)


def test_kill_9_then_resume_is_bit_identical(tmp_path, reference_run, capsys):
    killed = run_tiny(tmp_path, "--kill-at-step", "6", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "final.pt").exists()
    tiny_method.main(["--out", str(tmp_path), "--noise", "--resume"])
    assert "resumed from" in capsys.readouterr().out
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert final["step"] == 16
    assert_same(reference_run["method"], final["method"])
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "metrics.csv"))]
    assert steps == list(range(1, 17))


def test_sigterm_leaves_a_resumable_checkpoint(tmp_path, reference_run):
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.train.tiny_method", "--out", str(tmp_path), "--noise", "--sleep-after-step", "4",
         "--checkpoint-every", "100"], cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    assert process.stdout.readline().strip() == "READY"
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert "stop requested (SIGTERM): checkpoint at step 5 written" in err
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint_000000005.pt"]
    assert torch.load(tmp_path / "final.pt", weights_only=True)["preempted"]
    tiny_method.main(["--out", str(tmp_path), "--noise", "--resume"])
    assert_same(reference_run["method"], torch.load(tmp_path / "final.pt", weights_only=True)["method"])


def test_corrupt_latest_checkpoint_falls_back(tmp_path, reference_run, capsys):
    tiny_method.main(["--out", str(tmp_path), "--noise"])
    checkpoints = sorted((tmp_path / "checkpoints").iterdir())
    assert [p.name[-6:] for p in checkpoints] == ["012.pt", "014.pt", "016.pt"]
    checkpoints[-1].write_bytes(checkpoints[-1].read_bytes()[:1000])
    capsys.readouterr()
    tiny_method.main(["--out", str(tmp_path), "--noise", "--resume"])
    captured = capsys.readouterr()
    assert f"checkpoint {checkpoints[-1]} is corrupt or truncated" in captured.err
    assert f"falling back to the previous one, {checkpoints[-2]}" in captured.err
    assert "at step 14" in captured.out
    assert_same(reference_run["method"], torch.load(tmp_path / "final.pt", weights_only=True)["method"])


def test_two_process_ddp_equals_one_process(tmp_path):
    """torchrun, gloo: 2 ranks x 4 images (with accumulation 2 x 2) == 1 process x 8 images."""
    single = tmp_path / "single"
    tiny_method.main(["--out", str(single)])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "tests.train.tiny_method", "--out", str(tmp_path / "ddp"), "--accum", "2"],
                   cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, check=True, timeout=600)
    ddp = torch.load(tmp_path / "ddp" / "final.pt", weights_only=True)
    assert_same(torch.load(single / "final.pt", weights_only=True)["method"], ddp["method"], exact=False)


def test_activation_checkpointing_switch_reaches_the_trainable_backbone(tmp_path):
    from fastkd.models import build_backbone

    class BackboneMethod(TinyMethod):
        def __init__(self):
            super().__init__()
            self.backbone = build_backbone("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=1,
                                           num_heads=2)
            self.frozen = build_backbone("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=1,
                                         num_heads=2).requires_grad_(False)

        def forward(self, batch):
            out = super().forward(batch)
            extra = self.backbone(batch.views[0]).pow(2).mean()
            return {**out, "loss": out["loss"] + extra}

    torch.manual_seed(0)
    plain, checkpointed = BackboneMethod(), BackboneMethod()
    checkpointed.load_state_dict(plain.state_dict())
    make_trainer(tmp_path / "plain", plain, max_steps=2).fit()
    make_trainer(tmp_path / "ckpt", checkpointed, max_steps=2, checkpointing=True).fit()
    assert checkpointed.backbone.checkpointing and not checkpointed.frozen.checkpointing
    assert_same(params(plain), params(checkpointed), exact=False)
    with pytest.raises(ValueError, match="no trainable module with a 'checkpointing' switch"):
        make_trainer(tmp_path, TinyMethod(), checkpointing=True)


def test_sigterm_that_breaks_the_loader_still_checkpoints(tmp_path, capsys):
    """SIGTERM also kills DataLoader workers: the failing fetch ends the run with a checkpoint."""

    class DyingLoader(TensorLoader):
        send_sigterm = True

        def __iter__(self):
            for index, batch in enumerate(super().__iter__()):
                if index == 3:
                    if self.send_sigterm:
                        os.kill(os.getpid(), signal.SIGTERM)
                    raise RuntimeError("DataLoader worker exited unexpectedly")
                yield batch

    def trainer(loader, out):
        return Trainer(TinyMethod(), loader, batch_size=4, env=CPU, train=TrainConfig(
            epochs=1, precision="fp32", device="cpu", output_dir=str(out), progress=False, tensorboard=False))

    result = trainer(DyingLoader(32, 4), tmp_path).fit()
    assert result.preempted and result.step == 3 and result.checkpoint.name == "checkpoint_000000003.pt"
    assert "stop requested (SIGTERM) while step 4 was running" in capsys.readouterr().err
    no_signal = DyingLoader(32, 4)
    no_signal.send_sigterm = False
    with pytest.raises(RuntimeError, match="worker exited"):  # without a stop request the error propagates
        trainer(no_signal, tmp_path / "b").fit()


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path):
    make_trainer(tmp_path, max_steps=1).fit()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        make_trainer(tmp_path, max_steps=1).fit()

def test_resume_with_a_longer_run_warns_and_continues(tmp_path, capsys):
    make_trainer(tmp_path, max_steps=1).fit()
    assert make_trainer(tmp_path, max_steps=2).fit(resume=True).step == 2
    assert "the config changed the lr schedule of optimiser 'all'" in capsys.readouterr().out


def test_before_optimizer_step_hook_gets_the_epoch_before_the_step(tmp_path):
    class Hooked(TinyMethod):
        def __init__(self):
            super().__init__()
            self.hook_calls = []

        def before_optimizer_step(self, epoch):
            grads = [p.grad for p in self.parameters() if p.requires_grad]
            self.hook_calls.append((epoch, all(g is not None for g in grads)))

    method = Hooked()
    trainer = make_trainer(tmp_path, method, batch=8, epochs=2)  # 32 samples: 4 steps per epoch
    trainer.fit()
    assert [epoch for epoch, _ in method.hook_calls] == [step / 4 for step in range(8)]
    assert all(has_grads for _, has_grads in method.hook_calls)


def test_train_step_equals_fit_and_marks_the_phases(tmp_path):
    """``train_step`` is fit's step (same weights after 3 steps), and a profiled step shows every
    phase range of ``PHASES``."""
    from torch.profiler import profile

    from fastkd.train.trainer import PHASES

    torch.manual_seed(0)
    by_fit = TinyMethod()
    torch.manual_seed(0)
    by_step = TinyMethod()
    make_trainer(tmp_path / "fit", by_fit, max_steps=3).fit()
    trainer = make_trainer(tmp_path / "step", by_step, max_steps=3)
    batches = iter(trainer.loader)
    for step in range(2):
        stepped, parts, norms = trainer.train_step(batches, step)
        assert stepped and parts["loss"].dim() == 0 and set(norms) == {"all"}
    with profile() as prof:
        trainer.train_step(batches, 2)
    assert_same(params(by_fit), params(by_step))
    names = {event.name for event in prof.events()}
    assert set(PHASES.values()) <= names, set(PHASES.values()) - names
    assert all(p.grad is None for p in by_step.parameters())
