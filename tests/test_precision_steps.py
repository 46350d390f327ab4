"""One real training step of every method through the runner, in fp32 and in bf16 autocast on CPU
(the fused ops run their kernels outside autocast, so ``precision: bf16`` must not break them)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fastkd.config import load_config
from fastkd.data import write_sample_dataset
from fastkd.models import build_backbone, save_backbone
from fastkd.runner import train_from_config

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo"
TEACHER_KWARGS = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3)

# (config, extra overrides): every method, MOMA in its three modes.
RUNS = {
    "mocov3": ("mocov3_teacher.yaml", []),
    "mae": ("mae_teacher.yaml", []),
    "resmoco": ("resmoco_teacher.yaml", []),
    "moma_mocov3_to_mae": ("moma_both.yaml", ["method.mode=mocov3_to_mae", "method.student_init={mae}",
                                              "method.student_kwargs={kwargs}"]),
    "moma_mae_to_mocov3": ("moma_both.yaml", ["method.mode=mae_to_mocov3", "method.student_init={moco}",
                                              "method.student_kwargs={kwargs}"]),
    "moma_both_to_random": ("moma_both.yaml", []),
    "hybrid_distill": ("hybrid_distill.yaml", []),
    "mokd": ("mokd.yaml", []),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    write_sample_dataset(root / "data", images=24)
    paths = {}
    for name in ("moco", "mae"):
        paths[name] = save_backbone(build_backbone("vit_tiny_patch16_224", **TEACHER_KWARGS), root / f"{name}.pt")
    return root, paths


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("run", sorted(RUNS))
def test_one_step_of_every_method(workspace, run, precision):
    root, teachers = workspace
    config_name, extra = RUNS[run]
    kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in TEACHER_KWARGS.items()) + "}"
    overrides = [
        f"data.source={root / 'data'}", "data.batch_size=8", "data.num_workers=0",
        f"train.precision={precision}", "train.max_steps=1", f"train.output_dir={root / run / precision}",
        "train.progress=false", "train.tensorboard=false",
    ] + [o.format(mae=teachers["mae"], moco=teachers["moco"], kwargs=kwargs) for o in extra]
    text = (DEMO / config_name).read_text()
    for key in ("mocov3_teacher_path", "feature_teacher_path"):
        text = text.replace(f"{key}: demo_out/resmoco_teacher/student.pt", f"{key}: {teachers['moco']}")
    for key in ("mae_teacher_path", "relation_teacher_path"):
        text = text.replace(f"{key}: demo_out/mae_teacher/student.pt", f"{key}: {teachers['mae']}")
    config_path = root / f"{run}_{precision}.yaml"
    config_path.write_text(text)
    result = train_from_config(load_config(config_path, overrides))
    assert result.step == 1 and result.skipped_steps == 0, result
    assert math.isfinite(result.summary["final_loss"]), result.summary
