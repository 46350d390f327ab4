"""The benchmark suite: ``fastkd bench all --quick`` end to end (a subprocess writing into a temporary
``FASTKD_BENCH_DIR``, so the published results stay untouched), plus the suite's own helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from fastkd.benchmarks.compile_check import parse_targets, selected_configs
from fastkd.benchmarks.bench_e2e import METHODS, PHASE_COLUMNS, VARIANTS
from fastkd.benchmarks.bench_ops import OPS, annotate
from fastkd.benchmarks.gpu_peak import NEEDS_GPU, fraction_of_peak

HANG_SECONDS = 900  # a hang guard, not a speed check: the suite takes ~1-2 min on 2 idle cores
RECIPES = ("mocov3", "dino_multicrop", "mae", "eval")
FUSED_OPS_USED = {  # fastkd ops each method's fused training step must call
    "moma": {"feature_align", "gather_tokens"},
    "hybrid_distill": {"feature_align", "gather_tokens", "token_relation"},
    "resmoco": {"ema_", "feature_align"},  # the residual term runs through feature_align
    "mokd": {"ema_"},
}


def _spread_ok(record: dict) -> None:
    assert 0 < record["p10_ms"] <= record["median_ms"] <= record["p90_ms"], record


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Run the quick suite once; ``(bench_all payload, results dir, seconds)``."""
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compile check needs real Triton
    env["FASTKD_BENCH_DIR"] = str(out)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fastkd.cli", "bench", "all", "--quick"], env=env,
                          capture_output=True, text=True, timeout=HANG_SECONDS)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "bench_all.json").read_text()), out, seconds


def test_suite_writes_every_part_and_the_machine(suite):
    payload, out, seconds = suite
    print(f"fastkd bench all --quick took {seconds:.0f} s")
    assert payload["benchmark"] == "bench_all"
    for key in ("cpu", "cores", "torch", "triton", "dali", "python"):
        assert payload["machine"][key], key
    records = payload["records"]
    assert not [r for r in records if "error" in r]
    assert {r["benchmark"] for r in records} == {"ops", "data", "e2e", "compile", "knn", "backbone"}
    for name in ("bench_all", "bench_ops", "bench_data", "bench_e2e", "bench_compile", "bench_knn", "bench_backbone"):
        assert (out / f"{name}.json").is_file() and (out / f"{name}.md").read_text().strip(), name
    for png in ("bench_ops.png", "bench_e2e.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    report = (out / "bench_all.md").read_text()
    assert "fastkd bench all --device cpu --quick" in report
    assert json.loads((out / "bench_ops.json").read_text())["records"] == [
        {k: v for k, v in r.items() if k != "benchmark"} for r in records if r["benchmark"] == "ops"
    ]


def test_ops_records_compare_fastkd_with_a_baseline(suite):
    records = [r for r in suite[0]["records"] if r["benchmark"] == "ops"]
    assert {r["op"] for r in records} == set(OPS)
    for op in OPS:
        fused = [r for r in records if r["op"] == op and r["variant"].startswith("fastkd")]
        assert fused, op
        for r in fused:
            _spread_ok(r)
            assert r["baseline_ms"] > 0 and r["speedup"] == pytest.approx(r["baseline_ms"] / r["median_ms"])
            assert r["achieved_GBps"] == r["bandwidth_vs_peak"] == NEEDS_GPU  # GPU-only figures on CPU
            if r["peak_MiB"] is not None:
                assert r["peak_MiB"] > 0 and r["memory_ratio"] > 0


def test_data_records_cover_every_recipe(suite):
    records = [r for r in suite[0]["records"] if r["benchmark"] == "data"]
    assert sorted(r["recipe"] for r in records) == sorted(RECIPES)
    for r in records:
        assert r["torch_img_s"] > 0 and r["dali_img_s"] > 0
        assert r["ratio"] == pytest.approx(r["dali_img_s"] / r["torch_img_s"])


def test_e2e_records_time_every_variant_of_every_method(suite):
    records = [r for r in suite[0]["records"] if r["benchmark"] == "e2e"]
    assert sorted((r["method"], r["variant"]) for r in records) == sorted(
        (m, v) for m in METHODS for v in VARIANTS)
    for r in records:
        _spread_ok(r)
        assert r["images_per_s"] == pytest.approx(r["batch"] * r["steps_per_s"])
        assert r["peak_MiB"] > 0 and 0 <= r["fused_ops_share"] < 1 and r["top_ops"]
        assert r["vs_plain_eager"] > 0 and r["vs_plain_compiled"] > 0 and r["memory_ratio"] > 0
        phases = [r[f"{name}_ms"] for name in PHASE_COLUMNS if name != "fused_ops" and r[f"{name}_ms"] is not None]
        assert all(value >= 0 for value in phases) and sum(phases) == pytest.approx(r["profiled_ms"], rel=0.05)
        assert r["backward_ms"] > 0 and r["optimizer_ms"] > 0 and r["student_fwd_ms"] > 0
        if r["variant"].endswith("compiled"):  # train.compile compiles the whole forward: no teacher split
            assert r["teacher_fwd_ms"] is None and r["compile_backend"] == "eager"
        else:
            assert r["teacher_fwd_ms"] > 0, r["method"]  # every method has frozen or EMA teachers
        if r["variant"].startswith("plain"):
            assert r["fused_ops_called"] == [], f"{r['method']}: the plain assembly still runs fused ops"
        else:
            # no size rule: the quick run's small problems (batch 8, demo shapes) take the kernels too
            expected = FUSED_OPS_USED[r["method"]]
            assert set(r["fused_ops_called"]) == expected, (r["method"], r["fused_ops_called"])
            assert r["data_ms"] > 0 and (r["fused_ops_ms"] > 0) is bool(expected)
            assert isinstance(r["meets_target"], bool) and "vs_plain_compiled >= 1.0x" in r["target"]
            assert r["gflop_per_step"] > 0 and r["vs_peak_bf16"] == NEEDS_GPU
        # the step's FLOP rate over this run's fp32 GEMM rate, measured in the same run
        assert r["mm_fp32_GFLOPs"] > 0 and r["vs_mm_fp32"] == pytest.approx(r["achieved_GFLOPs"] / r["mm_fp32_GFLOPs"])
    assert "Machine load average at the start" in (suite[1] / "bench_e2e.md").read_text()
    from tests.benchmarks.test_e2e_table import assert_consistent

    assert_consistent(records)  # every ratio from the row's own run


def test_e2e_targets_apply_by_model_and_method():
    from fastkd.benchmarks.bench_e2e import describe_target, targets_for

    assert targets_for("demo", "moma") == {"vs_plain_eager": 1.2, "vs_plain_compiled": 1.0}
    assert targets_for("vits224", "hybrid_distill") == {"vs_plain_eager": 1.05, "memory_ratio": 0.9,
                                                         "vs_plain_compiled": 1.0, "vs_mm_fp32": 0.7}
    assert targets_for("vit64", "mokd") == {"vs_plain_compiled": 1.0}
    assert describe_target({"vs_plain_eager": 1.05, "memory_ratio": 0.9}) == \
        "vs_plain_eager >= 1.05x, memory <= 0.9x plain_eager"


def test_knn_and_backbone_records_are_timed(suite):
    records = suite[0]["records"]
    knn = [r for r in records if r["benchmark"] == "knn"]
    backbone = {r["variant"]: r for r in records if r["benchmark"] == "backbone"}
    assert {r["variant"] for r in knn} == {"chunked", "materialised"} and all(r["median_ms"] > 0 for r in knn)
    assert {"timm", "sdpa", "math"} <= backbone.keys() and backbone["timm"]["speedup"] == 1.0


def test_compile_records_cover_every_kernel(suite):
    records = [r for r in suite[0]["records"] if r["benchmark"] == "compile"]
    assert {r["kernel"] for r in records} == {c.name for c in selected_configs(quick=False)}
    assert all(r["ok"] and r["target"] == "sm_90" and r["compile_s"] > 0 for r in records)


def test_annotate_picks_baselines_and_ratios():
    records = [
        {"case": "S", "variant": "reference eager", "median_ms": 4.0, "p10_ms": 3.0, "p90_ms": 5.0, "peak_MiB": 8.0},
        {"case": "S", "variant": "fastkd op", "median_ms": 2.0, "p10_ms": 1.0, "p90_ms": 3.0, "peak_MiB": 2.0,
         "gflops_model": 1.0},
        {"case": "S", "variant": "other", "median_ms": 1.0, "p10_ms": 1.0, "p90_ms": 1.0},
        {"case": "S", "variant": "fastkd bf16", "baseline": "other", "median_ms": 0.5, "p10_ms": 0.5, "p90_ms": 0.5},
    ]
    out = annotate("toy", records, "cpu", None)
    fused = out[1]
    assert fused["op"] == "toy" and fused["problem"] == "S" and fused["baseline"] == "reference eager"
    assert fused["speedup"] == 2.0 and fused["memory_ratio"] == 0.25
    assert fused["achieved_TFLOPs"] == fused["flops_vs_peak"] == NEEDS_GPU
    assert out[3]["baseline"] == "other" and out[3]["speedup"] == 2.0 and out[3]["memory_ratio"] is None
    assert "speedup" not in out[0]
    with pytest.raises(ValueError, match="baseline 'missing'"):
        annotate("toy", [{**records[1], "baseline": "missing"}], "cpu", None)


def test_fraction_of_peak_and_targets_validate():
    assert fraction_of_peak(1.0, 2.0, "cpu") == NEEDS_GPU
    assert fraction_of_peak(1.0, 2.0, "cuda") == 0.5
    assert fraction_of_peak(None, 2.0, "cuda") is None
    with pytest.raises(ValueError, match="device"):
        fraction_of_peak(1.0, 2.0, "tpu")
    with pytest.raises(ValueError, match="peak"):
        fraction_of_peak(1.0, 0.0, "cuda")
    assert parse_targets("80,90") == (80, 90)
    with pytest.raises(ValueError, match="--targets"):
        parse_targets("75")
    with pytest.raises(ValueError, match="--targets"):
        parse_targets("sm_90")
    quick = selected_configs(quick=True)
    assert len({c.name for c in quick}) == len(quick) == len({c.name for c in selected_configs(quick=False)})


def test_e2e_demo_models_are_the_demo_configs(tmp_path):
    """bench e2e builds every method from its configs/demo/<name>.yaml: the same config, with the
    frozen teachers replaced by the benchmark's random ones (in fastkd's format)."""
    from fastkd.benchmarks.bench_e2e import DEMO_TEACHER, demo_methods, method_config
    from fastkd.config import load_config
    from fastkd.configs import demo_config_dir

    assert set(METHODS) <= set(demo_methods())
    teachers = [str(tmp_path / "c.pt"), str(tmp_path / "m.pt")]
    for name in METHODS:
        config, recipe = method_config(name, teachers, "demo", 64)
        demo = load_config(demo_config_dir() / f"{name}.yaml")
        given = {role: spec for role, spec in config.pop("teachers", {}).items()}
        method = dict(demo.method_config)
        shipped = method.pop("teachers", {})
        assert config == method and recipe == demo.data.recipe_options
        assert given.keys() == shipped.keys()
        for role, spec in given.items():
            assert spec["path"] in teachers and spec["format"] == "fastkd"
            assert {k: v for k, v in spec.items() if k not in ("path", "format")} == \
                {k: v for k, v in shipped[role].items() if k not in ("path", "format")}
    for teacher in ("resmoco", "mae"):  # random teachers of the demo teachers' shape
        assert load_config(demo_config_dir() / f"{teacher}.yaml").method_config["backbone"]["kwargs"] == DEMO_TEACHER
    vit, _ = method_config("mokd", teachers, "vit64", 64)  # --model: every spec takes that ViT's shape
    assert {spec["kwargs"]["embed_dim"] for spec in vit["models"].values()} == {192}
    assert all(spec["kwargs"]["dynamic_img_size"] for spec in vit["models"].values())


def test_runs_keep_each_rows_lowest_speedup():
    """`fastkd bench ops --runs 2`: every fastkd row takes the run with the lower speedup (a ratio that
    survives a re-run), lists both, and rows without a speedup (baselines, errors) come from run 1."""
    from fastkd.benchmarks.common import lowest_of_runs

    def rows(fast_ms, speedup):
        return [{"op": "ema", "problem": "ViT-S", "variant": "eager", "median_ms": 10.0},
                {"op": "ema", "problem": "ViT-S", "variant": "fastkd", "median_ms": fast_ms, "speedup": speedup},
                {"op": "gather", "error": "RuntimeError: boom"}]

    combined = lowest_of_runs([rows(2.0, 5.0), rows(4.0, 2.5)], ("op", "problem", "variant"), "speedup")
    assert combined[0] == rows(2.0, 5.0)[0] and combined[2] == {"op": "gather", "error": "RuntimeError: boom"}
    assert combined[1]["speedup"] == 2.5 and combined[1]["median_ms"] == 4.0
    assert combined[1]["speedup_runs"] == [5.0, 2.5]


def test_op_sweep_records_on_tiny_sizes():
    """The per-size sweep of `fastkd bench ops`: one record per op and size, both times and their ratio."""
    from fastkd.benchmarks.op_sweep import CASES, sweep

    records = sweep(sizes=(1000, 3000), rounds=1, budget_s=0.001)
    assert [(r["op"], r["elements"] > 0) for r in records] == [(op, True) for op in CASES for _ in range(2)]
    for r in records:
        assert r["dtype"] == "float32" and r["fused_ms"] > 0 and r["reference_ms"] > 0 and r["repeats"] >= 1
        assert r["speedup"] == pytest.approx(r["reference_ms"] / r["fused_ms"])
