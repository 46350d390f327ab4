"""``train.compile: true`` compiles what runs: every method's whole forward (backbones, heads,
losses, fused ops) in one graph, no recompilation after the keep ratio's first move, losses equal to
eager.

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


@pytest.fixture(autouse=True)
def one_attention_backend(monkeypatch):
    """Eager and compiled runs on one attention backend: ``auto`` measures the eager token classes and the
    compiled class apart, and two backends' rounding, through AdamW's first (sign-like) step, moves the
    losses by ~1e-4."""
    monkeypatch.setenv("FASTKD_ATTENTION", "sdpa")


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


def test_many_compiled_instances_of_one_method_stay_under_the_recompile_limit():
    """Dynamo counts graphs per compiled code object under one limit (8), a hard error under
    ``fullgraph=True``: a process that compiles one method more often than that (a benchmark, a
    notebook) must reuse graphs across instances rather than specialise on each."""
    from fastkd.data.batch import Batch
    from fastkd.methods import build_method
    from fastkd.train.compilation import compile_method

    tiny = {"backbone": {"arch": "vit_tiny_patch16_224",
                         "kwargs": dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)},
            "decoder_dim": 8, "decoder_depth": 1, "decoder_num_heads": 2}
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8):
        for _ in range(10):  # more instances of one class than the limit
            method = build_method("mae", tiny)
            compile_method(method, backend="eager")
            batch = Batch([torch.randn(2, 3, 16, 16)], torch.zeros(2, dtype=torch.long), torch.arange(2))
            method(batch)["loss"].backward()


def test_a_compiled_method_keeps_its_own_code_and_a_resumed_keep_stage(workspace, tmp_path):
    """A compiled method's forward stands in for its class's, and a loaded state dict sets Hybrid
    Distill's host-side kept-token count from the checkpointed keep ratio."""
    from fastkd.config import load_config
    from fastkd.methods import build_method
    from fastkd.train.compilation import compile_method
    from tests.method_runs import DEMO

    root, teachers = workspace
    text = (DEMO / "hybrid_distill.yaml").read_text()
    for name in ("resmoco", "mae"):
        teacher = teachers["moco" if name == "resmoco" else name]
        text = text.replace(f"path: demo_out/{name}_teacher/student.pt", f"path: {teacher}")
    (tmp_path / "c.yaml").write_text(text)
    config = load_config(tmp_path / "c.yaml", [])
    first, second = (build_method(config.method_name, config.method_config) for _ in range(2))
    for method in (first, second):
        compile_method(method, backend="eager")
    assert first.forward.__wrapped__ is type(first).forward
    first.after_step(9, 10)
    assert first.kept_patches == first.num_kept(first.keep_stages[-1][1]) < second.kept_patches
    second.load_state_dict(first.state_dict())
    assert second.kept_patches == first.kept_patches
