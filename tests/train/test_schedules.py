import math

import pytest

from fastkd.train.schedules import WarmupCosine, scaled_lr


def test_warmup_then_cosine_values():
    s = WarmupCosine(peak=1.0, total_steps=110, warmup_steps=10, start=0.0, end=0.1)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi * 0.5)))
    assert s(109) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 99 / 100)))
    assert s(110) == s(500) == 0.1


def test_constant_and_increasing_schedules():
    assert all(WarmupCosine(peak=0.05, total_steps=7, end=0.05)(t) == pytest.approx(0.05) for t in range(9))
    rising = [WarmupCosine(peak=0.04, total_steps=20, end=0.4)(t) for t in range(21)]
    assert rising == sorted(rising) and rising[0] == pytest.approx(0.04) and rising[-1] == pytest.approx(0.4)


def test_state_dict_records_the_parameters():
    s = WarmupCosine(peak=3e-4, total_steps=100, warmup_steps=7, end=1e-6)
    assert s.state_dict() == {"peak": 3e-4, "total_steps": 100, "warmup_steps": 7, "start": 0.0, "end": 1e-6}


def test_linear_scaling():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert scaled_lr(0.1, 512, 256) == pytest.approx(0.2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(peak=1.0, total_steps=0), "total_steps"),
    (dict(peak=1.0, total_steps=10, warmup_steps=11), "warmup_steps"),
    (dict(peak=float("nan"), total_steps=10), "peak"),
])
def test_schedule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupCosine(**kwargs)


def test_bad_step_and_batch():
    with pytest.raises(ValueError, match="step"):
        WarmupCosine(peak=1.0, total_steps=3)(-1)
    with pytest.raises(ValueError, match="global_batch_size"):
        scaled_lr(1e-3, 0)
