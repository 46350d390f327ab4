"""The EMA teacher's backbone is exported beside the student (``teacher.pt``) by runs of methods
that have one, and ``fastkd eval ... --weights teacher`` evaluates it."""

from __future__ import annotations

import json

import pytest
import torch

from fastkd.cli import main
from fastkd.eval import load_eval_model
from fastkd.methods import build_method
from fastkd.models.weights import STUDENT_FILE, TEACHER_FILE
from tests.method_runs import make_workspace, run_method
from tests.methods.test_mokd import CONFIG as MOKD_CONFIG


@pytest.fixture(scope="module")
def mocov3_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_export")
    workspace = make_workspace(root)
    result = run_method(workspace, "mocov3", root / "mocov3", ["train.max_steps=2", "train.compile=false"])
    assert result.step == 2 and result.skipped_steps == 0, result
    return root / "data", root / "mocov3" / "run"


def test_mocov3_run_writes_the_ema_teacher(mocov3_run):
    _, run = mocov3_run
    assert (run / STUDENT_FILE).is_file() and (run / TEACHER_FILE).is_file()
    student, teacher = load_eval_model(run), load_eval_model(run, weights="teacher")
    assert type(student) is type(teacher) and student.name == teacher.name
    s, t = student.model.state_dict(), teacher.model.state_dict()
    assert s.keys() == t.keys()
    assert any(not torch.equal(s[k], t[k]) for k in s)  # the EMA lags the trained student
    torch.testing.assert_close(s["pos_embed"], t["pos_embed"])  # frozen in both


def test_eval_cli_picks_the_teacher_file(mocov3_run, capsys):
    data, run = mocov3_run
    common = ["--train", str(data), "--val", str(data), "--batch-size", "8", "--backend", "torch",
              "--num-workers", "0", "--k", "1"]
    assert main(["eval", "knn", str(run), "--weights", "teacher", *common]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["top1"] == 100.0  # k=1 on the memory bank itself
    assert report["checkpoint"] == str(run / TEACHER_FILE) and report["checkpoint_key"].startswith("fastkd:")
    assert main(["eval", "knn", str(run), *common]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["checkpoint"] == str(run / STUDENT_FILE)


def test_teacher_weights_need_a_run_directory_with_the_file(mocov3_run, tmp_path):
    _, run = mocov3_run
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / STUDENT_FILE).write_bytes((run / STUDENT_FILE).read_bytes())
    with pytest.raises(ValueError, match="has no teacher.pt"):
        load_eval_model(bare, weights="teacher")
    with pytest.raises(ValueError, match="not a directory"):
        load_eval_model(run / STUDENT_FILE, weights="teacher")
    with pytest.raises(ValueError, match="weights must be one of"):
        load_eval_model(run, weights="momentum")


def test_ema_teacher_backbone_of_each_method():
    mokd = build_method("mokd", MOKD_CONFIG)
    assert mokd.ema_teacher_backbone is mokd.teachers[mokd.config.evaluate].module.backbone
    mae = build_method("mae", {"backbone": {"arch": "vit_tiny_patch16_224",
                                            "kwargs": dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3)},
                               "decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2})
    assert mae.ema_teacher_backbone is None
