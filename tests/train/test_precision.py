"""``train.precision`` / ``train.teacher_precision``: how ``auto`` picks the frozen teachers' dtype
(measured on CPU, a rule on CUDA), validation, and the dtype the trainer hands the method."""

import pytest
import torch

from fastkd.train import precision
from fastkd.train.options import TrainConfig
from fastkd.train.precision import autocast, teacher_precision_for
from tests.train.test_trainer import assert_same, make_trainer, params
from tests.train.tiny_method import TinyMethod


@pytest.mark.parametrize("fp32, bf16", [(1.0, 2.0), (2.0, 1.0)])
def test_auto_on_cpu_follows_the_measured_linear(fake_timings, fp32, bf16):
    """CPU, fp32 step: ``auto`` is whichever of fp32 / bf16 ran the linear layer faster, measured
    once (then read back); the other settings never measure."""
    fake_timings.seconds.update(fp32=fp32, bf16=bf16)
    assert teacher_precision_for("auto", "fp32", "cpu") == ("fp32" if fp32 < bf16 else "bf16")
    assert teacher_precision_for("auto", "fp32", "cpu") == ("fp32" if fp32 < bf16 else "bf16")
    assert fake_timings.calls == [["bf16", "fp32"]]
    assert teacher_precision_for("auto", "bf16", "cpu") == "bf16"  # a bf16 step: bf16, nothing to time
    assert teacher_precision_for("same", "fp32", "cpu") == "fp32"
    assert teacher_precision_for("fp32", "bf16", "cpu") == "fp32"
    assert teacher_precision_for("bf16", "fp32", "cpu") == "bf16"
    assert len(fake_timings.calls) == 1


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_is_half_precision_without_measuring(fake_timings, monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert teacher_precision_for("auto", "fp32", "cuda") == expected
    assert fake_timings.calls == []


def test_the_measured_candidates_run_the_linear_in_each_dtype():
    candidates = precision._teacher_linear_candidates(torch.device("cpu"))
    tokens, _, out = precision.TEACHER_LINEAR
    for name, run in candidates.items():
        assert run().shape == (tokens, out) and run().dtype == precision.DTYPES[name]


def test_bad_precisions_are_refused_by_name():
    with pytest.raises(ValueError, match="train.teacher_precision"):
        TrainConfig(teacher_precision="int8")
    with pytest.raises(ValueError, match="train.teacher_precision"):
        teacher_precision_for("half", "fp32", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast("fp64", "cpu")


def test_autocast_contexts():
    with autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


class WithFrozenTeacher(TinyMethod):
    frozen_teacher_dtype = None


@pytest.mark.parametrize("setting, bf16_faster, expected", [
    ("auto", True, torch.bfloat16), ("auto", False, torch.float32), ("same", True, torch.float32),
    ("bf16", False, torch.bfloat16), ("fp32", True, torch.float32)])
def test_trainer_hands_the_method_its_teacher_dtype(tmp_path, fake_timings, setting, bf16_faster, expected):
    fake_timings.seconds.update(bf16=0.5 if bf16_faster else 2.0)
    trainer = make_trainer(tmp_path, WithFrozenTeacher(), teacher_precision=setting)
    assert trainer.method.frozen_teacher_dtype == expected
    assert trainer.teacher_precision == {torch.bfloat16: "bf16", torch.float32: "fp32"}[expected]


def test_fp16_teacher_needs_cuda(tmp_path):
    with pytest.raises(ValueError, match="teacher_precision='fp16' needs CUDA"):
        make_trainer(tmp_path, WithFrozenTeacher(), teacher_precision="fp16")


def test_a_method_without_frozen_teachers_trains_as_in_fp32(tmp_path):
    """The teacher dtype only changes what a method computes under ``frozen_teacher_features``."""
    states = []
    for setting in ("bf16", "fp32"):
        torch.manual_seed(0)
        trainer = make_trainer(tmp_path / setting, TinyMethod(), teacher_precision=setting, max_steps=2)
        trainer.fit()
        states.append(params(trainer.method))
    assert_same(*states)
