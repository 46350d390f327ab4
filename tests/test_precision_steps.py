"""One real training step of every method through the runner, in fp32 and in bf16 autocast on CPU
(the fused ops run their kernels outside autocast, so ``precision: bf16`` must not break them)."""

from __future__ import annotations

import math

import pytest

from tests.method_runs import RUNS, make_workspace, run_method


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("precision"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("run", sorted(RUNS))
def test_one_step_of_every_method(workspace, tmp_path, run, precision):
    result = run_method(workspace, run, tmp_path, [f"train.precision={precision}", "train.max_steps=1",
                                                   "train.compile=false"])
    assert result.step == 1 and result.skipped_steps == 0, result
    assert math.isfinite(result.summary["final_loss"]), result.summary
