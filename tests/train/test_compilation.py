"""``train.compile: auto``: decided from step times recorded on this machine (CUDA: compiled; no compiled
run recorded on CPU: a trial that compiles a long run after 3 eager steps), and every run of 3 or more
steps records its own."""

from __future__ import annotations

import pytest
import torch

from fastkd import measured_choice
from fastkd.train import compilation
from fastkd.train.compilation import compile_entry, compile_trial_due, record_run, should_compile
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
    assert record_run("e", CPU, [1.0, 1.0], None) == {}  # under 3 steps: nothing
    assert record_run("e", CPU, [3.0, 1.0, 2.0], None) == {"eager_step_s": 2.0}
    assert record_run("e", CPU, [10.0, 1.0, 1.0, 4.0, 1.0], 0) == {"compiled_step_s": 1.0, "compile_s": 12.0}
    assert measured_choice.recorded("e", CPU) == {"eager_step_s": 2.0, "compiled_step_s": 1.0, "compile_s": 12.0}
    trial = record_run("t", CPU, [5.0, 4.0, 6.0, 30.0, 2.0, 2.0, 3.0], 3)  # 3 eager steps, then compiled
    assert trial == {"eager_step_s": 5.0, "compiled_step_s": 2.0, "compile_s": 29.0}


def test_a_compile_trial_is_due_for_a_long_auto_run_with_no_compiled_record(cache):
    three = [2.0, 1.0, 3.0]  # median 2 s
    seconds = compilation.TRIAL_SECONDS
    assert compile_trial_due("auto", CPU, "e", three, int(seconds / 2) + 1) is True
    assert compile_trial_due("auto", CPU, "e", three, int(seconds / 2) - 1) is False  # too short to risk it
    assert compile_trial_due("auto", CPU, "e", three[:2], 10**9) is False  # not yet timed
    assert compile_trial_due(False, CPU, "e", three, 10**9) is False
    assert compile_trial_due("auto", torch.device("cuda"), "e", three, 10**9) is False  # compiled from the start
    measured_choice.record("e", CPU, {"compiled_step_s": 1.0})
    assert compile_trial_due("auto", CPU, "e", three, 10**9) is False  # the records decided at the start


def test_the_trainer_runs_the_trial_and_records_both_sides(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compilation, "TRIAL_SECONDS", 10.0**9)  # no run is long enough
    eager = make_trainer(tmp_path / "eager", epochs=2, max_steps=7, compile="auto", compile_backend="aot_eager")
    assert eager.fit().summary["compiled"] is False
    assert set(measured_choice.recorded(eager.compile_entry, CPU)) == {"eager_step_s"}
    monkeypatch.setattr(compilation, "TRIAL_SECONDS", 0.0)  # any run is long enough
    trial = make_trainer(tmp_path / "trial", epochs=2, max_steps=7, compile="auto", compile_backend="aot_eager")
    assert trial.compiled is False  # no compiled run recorded: eager at the start
    result = trial.fit()
    assert result.summary["compiled"] is True and result.step == 7
    assert set(measured_choice.recorded(trial.compile_entry, CPU)) == {"eager_step_s", "compiled_step_s", "compile_s"}
    assert "train.compile auto: compiling from step 4 on" in capsys.readouterr().err
