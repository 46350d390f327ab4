"""``train.precision`` / ``train.teacher_precision``: the rules that pick the frozen teachers'
dtype, CPU feature detection, validation, and the dtype the trainer hands the method."""

import pytest
import torch

from fastkd.train import precision
from fastkd.train.options import TrainConfig
from fastkd.train.precision import autocast, cpu_flags, native_bf16, teacher_precision_for
from tests.train.test_trainer import assert_same, make_trainer, params
from tests.train.tiny_method import TinyMethod


def test_cpu_flags_reads_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize("flags, native", [({"avx512f"}, False), ({"avx512f", "avx512_bf16"}, True),
                                           ({"amx_bf16", "amx_tile"}, True), (set(), False)])
def test_native_bf16_on_cpu_follows_the_cpu_flags(monkeypatch, flags, native):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    assert native_bf16("cpu") is native
    assert teacher_precision_for("auto", "fp32", "cpu") == ("bf16" if native else "fp32")
    assert teacher_precision_for("same", "fp32", "cpu") == "fp32"
    assert teacher_precision_for("fp32", "bf16", "cpu") == "fp32"
    assert teacher_precision_for("bf16", "fp32", "cpu") == "bf16"


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


@pytest.mark.parametrize("setting, native, expected", [
    ("auto", True, torch.bfloat16), ("auto", False, torch.float32), ("same", True, torch.float32),
    ("bf16", False, torch.bfloat16), ("fp32", True, torch.float32)])
def test_trainer_hands_the_method_its_teacher_dtype(tmp_path, monkeypatch, setting, native, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"} if native else ()))
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
