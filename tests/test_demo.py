"""The end-to-end demo (``python -m fastkd.demo --quick``) in a temporary folder: every stage
runs, and the table, the plot and the JSON summary are written and well formed (not accuracy)."""

import json

import pytest

from fastkd import demo

EXPECTED_MODELS = [
    "resmoco teacher", "MAE teacher", "random init (MOMA student)", "MOMA student (both teachers)",
    "random init (Hybrid Distill student)", "Hybrid Distill student",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    assert demo.main(["--quick", "--out", str(out), "--images", "36", "--val-images", "24"]) == 0
    return out


def test_quick_demo_writes_table_plot_and_summary(quick_run, capsys):
    out = quick_run
    summary = json.loads((out / "demo.json").read_text())
    assert summary["quick"] is True
    assert summary["images"] == {"train": 36, "val": 24}
    assert [row["model"] for row in summary["rows"]] == EXPECTED_MODELS
    for row in summary["rows"]:
        assert 0.0 <= row["k-NN top-1 (%)"] <= row["k-NN top-5 (%)"] <= 100.0
        assert row["train steps"] == (0 if row["role"] == "random init" else 2)
    for stage in demo.STAGES:
        assert (out / stage.name / "student.pt").is_file()
        assert summary["timings"][stage.name]["wall_s"] > 0
    assert set(summary["timings"]) >= {"data", "knn_eval", "total"}
    margin = summary["margin"]
    assert set(margin["points"]) == {"MOMA", "Hybrid Distill"} and margin["min_points"] == demo.MIN_MARGIN_POINTS
    assert margin["met"] == all(points >= demo.MIN_MARGIN_POINTS for points in margin["points"].values())
    assert len(list((out / "data" / "train").rglob("*.jpg"))) == 36
    assert len(list((out / "data" / "val").rglob("*.jpg"))) == 24

    table = (out / "demo.md").read_text().splitlines()
    assert table[0].startswith("| model | method | k-NN top-1 (%)")
    assert len([line for line in table if line.startswith("| ")]) == 1 + len(EXPECTED_MODELS)
    assert all(line.count("|") == len(demo.COLUMNS) + 1 for line in table if line.startswith("|"))

    assert any(line.startswith("Margin over random init: MOMA") for line in table)

    png = (out / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="images must be >= 12, got 5"):
        demo.run_demo(tmp_path, images=5)
    with pytest.raises(ValueError, match="lacks the demo configs"):
        demo.run_demo(tmp_path, config_dir=tmp_path)
    with pytest.raises(TypeError, match="quick must be a bool"):
        demo.run_demo(tmp_path, quick="yes")


def test_demo_configs_are_package_data():
    from fastkd.configs import demo_config_dir

    assert demo.DEFAULT_CONFIG_DIR == demo_config_dir()
    assert all((demo.DEFAULT_CONFIG_DIR / f"{stage.method}.yaml").is_file() for stage in demo.STAGES)
