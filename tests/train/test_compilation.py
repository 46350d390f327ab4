"""``train.compile: auto``: decided from step times recorded on this machine (no record: eager on
CPU; CUDA: compiled), and every run of 3 or more steps records its own."""

from __future__ import annotations

import pytest
import torch

from fastkd import measured_choice
from fastkd.train.compilation import compile_entry, record_run, should_compile
from tests.train.test_trainer import make_trainer
from tests.train.tiny_method import TinyMethod

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_explicit_settings_win_and_cuda_compiles(cache):
    assert should_compile(True, CPU, "e", 1) is True and should_compile(False, torch.device("cuda"), "e", 10**6) is False
    assert should_compile("auto", torch.device("cuda"), "e", 1) is True
    assert should_compile("auto", CPU, "e", 10**6) is False  # nothing recorded yet
    measured_choice.record("e", CPU, {"eager_step_s": 2.0})
    assert should_compile("auto", CPU, "e", 10**6) is False  # no compiled run recorded yet


@pytest.mark.parametrize("steps, expected", [(9, False), (11, True)])
def test_auto_compiles_when_the_run_repays_the_compilation(cache, steps, expected):
    measured_choice.record("e", CPU, {"eager_step_s": 2.0, "compiled_step_s": 1.0, "compile_s": 10.0})
    assert should_compile("auto", CPU, "e", steps) is expected


def test_record_run_takes_medians_and_the_compile_time_above_them(cache):
    assert record_run("e", CPU, False, [1.0, 1.0]) == {}  # under 3 steps: nothing
    assert record_run("e", CPU, False, [3.0, 1.0, 2.0]) == {"eager_step_s": 2.0}
    assert record_run("e", CPU, True, [10.0, 1.0, 1.0, 4.0, 1.0]) == {"compiled_step_s": 1.0, "compile_s": 12.0}
    assert measured_choice.recorded("e", CPU) == {"eager_step_s": 2.0, "compiled_step_s": 1.0, "compile_s": 12.0}


def test_the_trainer_records_its_steps_and_auto_follows_the_record(cache, tmp_path):
    trainer = make_trainer(tmp_path / "eager", max_steps=4, compile="auto")
    assert trainer.compiled is False
    assert trainer.fit().summary["compiled"] is False
    entry = compile_entry(TinyMethod(), 8, "fp32")
    assert trainer.compile_entry == entry and set(measured_choice.recorded(entry, CPU)) == {"eager_step_s"}
    eager = measured_choice.recorded(entry, CPU)["eager_step_s"]
    measured_choice.record(entry, CPU, {"compiled_step_s": eager / 4, "compile_s": eager})  # repaid after 2 steps
    assert make_trainer(tmp_path / "long", max_steps=3, compile="auto").compiled is True
    assert make_trainer(tmp_path / "short", max_steps=1, compile="auto").compiled is False
