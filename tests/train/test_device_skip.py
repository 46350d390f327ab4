"""``train.skip_decision: device``: a non-finite step is skipped by the fused optimisers and the
EMA updates on a device-side ``found_inf`` flag, the host reads the flags only at log and
checkpoint steps; the outcome equals the host decision's (run here on CPU, where both exist)."""

import csv

import pytest
import torch

from fastkd.ops import ema_unless_
from fastkd.train import trainer as trainer_module
from fastkd.train.optim import takes_found_inf
from fastkd.train.trainer import NonFiniteLossError, Trainer
from tests.train.test_trainer import assert_same, make_trainer, params
from tests.train.tiny_method import TinyMethod


class DeviceSkipTinyMethod(TinyMethod):
    """TinyMethod whose EMA teacher update takes the trainer's device-side flag."""

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int, found_inf=None) -> None:
        self.after_step_calls.append(step)
        skip = torch.zeros(()) if found_inf is None else found_inf
        ema_unless_(list(self.teacher.parameters()), list(self.student.parameters()), 0.95, skip)


def run(tmp_path, decision, *, nan_steps=(), **train):
    torch.manual_seed(0)
    method = DeviceSkipTinyMethod(nan_steps=nan_steps)
    trainer = make_trainer(tmp_path / decision, method, skip_decision=decision, **train)
    return method, trainer


@pytest.mark.parametrize("log_every", [1, 3])
def test_device_decision_equals_the_host_decision(tmp_path, capsys, log_every):
    host, host_trainer = run(tmp_path, "host", nan_steps=(2, 5), epochs=2, log_every=log_every)
    device, device_trainer = run(tmp_path, "device", nan_steps=(2, 5), epochs=2, log_every=log_every)
    assert not host_trainer.device_skip and device_trainer.device_skip
    host_result = host_trainer.fit()
    host_err = capsys.readouterr().err
    device_result = device_trainer.fit()
    device_err = capsys.readouterr().err
    assert host_result.skipped_steps == device_result.skipped_steps == 2
    assert_same(params(host), params(device))  # student, teacher: bit-identical on CPU
    for out in (host_err, device_err):
        assert "step 2: non-finite loss" in out and "step 5: non-finite loss" in out
    # the host decision does not call after_step on a skipped step; the device decision calls it
    # with found_inf = 1, which changes nothing
    assert host.after_step_calls == [0, 1, 3, 4, 6, 7] and device.after_step_calls == list(range(8))
    rows = [list(csv.DictReader(open(tmp_path / d / "metrics.csv"))) for d in ("host", "device")]
    assert [r["skipped_steps"] for r in rows[0]] == [r["skipped_steps"] for r in rows[1]]


def test_a_skipped_step_leaves_student_teacher_and_optimiser_state_exactly(tmp_path):
    method, trainer = run(tmp_path, "device", nan_steps=(1,), max_steps=2)
    batches = iter(trainer.loader)
    trainer.train_step(batches, 0)
    before = (params(method), {k: v.clone() for k, v in trainer.slots[0].optimizer.state_dict()["state"][0].items()})
    stepped, parts, _ = trainer.train_step(batches, 1)
    assert isinstance(stepped, torch.Tensor) and not bool(stepped) and not torch.isfinite(parts["loss"])
    assert_same(before[0], params(method))
    after = trainer.slots[0].optimizer.state_dict()["state"][0]
    assert all(torch.equal(before[1][k], after[k]) for k in before[1])  # step count rolled back too


@pytest.mark.parametrize("log_every", [1, 4])
def test_repeated_nan_stops_naming_the_step_that_reached_the_limit(tmp_path, log_every):
    _, trainer = run(tmp_path, "device", nan_steps=(1, 2, 3), max_nonfinite=3, log_every=log_every)
    with pytest.raises(NonFiniteLossError, match=r"stopping at step 3: 3 consecutive non-finite steps") as error:
        trainer.fit()
    assert "regression=" in str(error.value) and "loss=nan" in str(error.value)


def test_the_host_reads_the_flags_only_at_log_and_checkpoint_steps(tmp_path, monkeypatch):
    settled, flags_sent = [], []
    original = Trainer._settle

    def spy(self, pending, *args):
        settled.append([step for step, *_ in pending])
        return original(self, pending, *args)

    def any_across_ranks(flag, device):
        flags_sent.append(type(flag).__name__)
        return bool(flag)

    monkeypatch.setattr(Trainer, "_settle", spy)
    monkeypatch.setattr(trainer_module.distributed, "any_across_ranks", any_across_ranks)
    _, trainer = run(tmp_path, "device", epochs=3, max_steps=10, log_every=4, checkpoint_every=6)
    trainer.fit()
    assert settled == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]  # log 4, checkpoint 6, log 8, end 10
    assert set(flags_sent) == {"bool"}  # only the stop request, never a device tensor


def test_auto_is_host_on_cpu_and_device_needs_what_it_needs(tmp_path):
    assert not make_trainer(tmp_path / "a", DeviceSkipTinyMethod()).device_skip  # auto on CPU
    with pytest.raises(ValueError, match=r"skip_decision='device'.*optimiser 'all' is LARS"):
        make_trainer(tmp_path / "c", DeviceSkipTinyMethod(), skip_decision="device", optim={"name": "lars"})
    with pytest.raises(ValueError, match="train.skip_decision"):
        make_trainer(tmp_path / "d", skip_decision="gpu")


def test_an_optimiser_without_found_inf_is_refused_at_the_trainer(tmp_path):
    p = torch.nn.Parameter(torch.ones(3))
    foreach = torch.optim.AdamW([p], foreach=True)
    assert not takes_found_inf(foreach) and takes_found_inf(torch.optim.AdamW([p], fused=True))
    # step_unless trusts its caller: the trainer refuses device skips for such an optimiser up front
    with pytest.raises(ValueError, match=r"skip_decision='device'.*optimiser 'all' is SGD"):
        make_trainer(tmp_path / "sgd", DeviceSkipTinyMethod(), skip_decision="device", optim={"name": "sgd"})
