"""Real runs of every method through the runner on tiny data: the demo configs with teacher
checkpoints made here (shared by the precision and compile tests)."""

from __future__ import annotations

from pathlib import Path

from fastkd.config import load_config
from fastkd.data import write_sample_dataset
from fastkd.models import build_backbone, save_backbone
from fastkd.runner import train_from_config

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo"
TEACHER_KWARGS = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3)
_KWARGS = "{" + ", ".join(f"{k}: {v}" for k, v in TEACHER_KWARGS.items()) + "}"

# name -> (demo config, extra overrides): every method, MOMA in its three modes.
RUNS = {
    "mocov3": ("mocov3.yaml", []),
    "mae": ("mae.yaml", []),
    "resmoco": ("resmoco.yaml", []),
    "moma_mocov3_to_mae": ("moma.yaml", ["method.mode=mocov3_to_mae", "method.student.path={mae}",
                                         f"method.student.kwargs={_KWARGS}"]),
    "moma_mae_to_mocov3": ("moma.yaml", ["method.mode=mae_to_mocov3", "method.student.path={moco}",
                                         f"method.student.kwargs={_KWARGS}"]),
    "moma_both_to_random": ("moma.yaml", []),
    "hybrid_distill": ("hybrid_distill.yaml", []),
    "mokd": ("mokd.yaml", []),
}


def make_workspace(root: Path) -> tuple[Path, dict[str, Path]]:
    """Sample images and two teacher checkpoints (``moco``, ``mae``) of the demo teachers' shape."""
    write_sample_dataset(root / "data", images=24)
    teachers = {name: save_backbone(build_backbone("vit_tiny_patch16_224", **TEACHER_KWARGS), root / f"{name}.pt")
                for name in ("moco", "mae")}
    return root, teachers


def run_method(workspace, run: str, out: Path, overrides: list[str]):
    """Train ``run`` on the workspace's images with ``overrides`` (batch 8, no workers, no logs
    to TensorBoard); returns the runner's ``TrainResult``."""
    root, teachers = workspace
    config_name, extra = RUNS[run]
    text = (DEMO / config_name).read_text()
    text = text.replace("path: demo_out/resmoco_teacher/student.pt", f"path: {teachers['moco']}")
    text = text.replace("path: demo_out/mae_teacher/student.pt", f"path: {teachers['mae']}")
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    config_path.write_text(text)
    base = [f"data.source={root / 'data'}", "data.batch_size=8", "data.num_workers=0",
            f"train.output_dir={out / 'run'}", "train.progress=false", "train.tensorboard=false"]
    extra = [o.replace("{mae}", str(teachers["mae"])).replace("{moco}", str(teachers["moco"])) for o in extra]
    return train_from_config(load_config(config_path, base + extra + overrides))
