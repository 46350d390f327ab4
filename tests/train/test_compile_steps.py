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


def test_each_backbone_compiles_under_its_own_recompile_limit():
    """Dynamo keeps a graph per backbone instance, crop size and grad mode, and counts them per
    compiled code object under one limit (8): were every backbone to share
    ``Backbone._features_pass``'s code, a process that compiles several methods (a benchmark, a
    notebook) or MOKD's four backbones would hit it, a hard error under ``fullgraph=True``."""
    from fastkd.models import build_backbone
    from fastkd.train.compilation import compile_backbones

    # dynamo's config.patch restores the limit on exit (monkeypatch.setattr on the config module
    # left later tests in the process without the attribute)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8):
        tiny = dict(img_size=16, patch_size=8, depth=1, num_heads=2, dynamic_img_size=True)
        for widths in ((8, 16, 24, 32), (40, 48, 56, 64)):  # two methods, four backbones of their own widths
            method = torch.nn.ModuleList(build_backbone("vit_tiny_patch16_224", embed_dim=w, **tiny) for w in widths)
            assert len(compile_backbones(method, backend="eager")) == 4
            for size in (16, 8):
                for backbone in method:
                    with torch.no_grad():
                        backbone.forward_features(torch.randn(2, 3, size, size))
                    backbone.forward_features(torch.randn(2, 3, size, size)).tokens.sum().backward()
