"""``train.compile: true`` compiles what runs: every backbone pass of every method (students and
teachers) in one graph each, no recompilation as the keep ratio moves, losses equal to eager.

The ``aot_eager`` backend traces exactly what ``inductor`` would compile (dynamo capture and the
joint forward/backward graph: where graph breaks and recompilations happen) without generating
C++ code, which takes minutes on this CPU."""

from __future__ import annotations

import csv

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from tests.method_runs import RUNS, make_workspace, run_method

COMPILED = ["train.compile=true", "train.compile_backend=aot_eager"]
COMMON = ["train.precision=fp32", "train.log_every=1"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("compile"))


def _losses(out) -> list[float]:
    return [float(row["loss"]) for row in csv.DictReader(open(out / "run" / "metrics.csv"))]


@pytest.mark.parametrize("run", sorted(RUNS))
def test_compiled_steps_run_compiled_code_and_match_eager(workspace, tmp_path, run):
    run_method(workspace, run, tmp_path / "eager", COMMON + ["train.max_steps=3", "train.compile=false"])
    torch._dynamo.reset()
    counters.clear()
    run_method(workspace, run, tmp_path / "compiled", COMMON + COMPILED + ["train.max_steps=3"])
    assert counters["stats"]["unique_graphs"] > 0, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])  # fullgraph: a break would raise
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(compiled) == 3
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("run", ["hybrid_distill", "moma_both_to_random"])
def test_compilations_stop_growing_after_warm_up(workspace, tmp_path, run):
    """hybrid_distill's keep ratio moves through three stages (other kept-token counts): the
    number of graphs after 2 steps equals that after 8."""
    graphs = []
    for steps in (2, 8):
        torch._dynamo.reset()
        counters.clear()
        run_method(workspace, run, tmp_path / str(steps), COMMON + COMPILED + [f"train.max_steps={steps}"])
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] > 0, graphs
