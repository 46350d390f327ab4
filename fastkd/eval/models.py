"""Load any saved student or teacher as a frozen feature extractor. ``load_eval_model(path)`` accepts:

- a run directory: its ``student.pt`` (``module="student"``), else its newest checkpoint; with
  ``weights="teacher"`` its ``teacher.pt`` (EMA-teacher methods: MoCo v3, ResMoCo, MOKD);
- a training checkpoint: the method rebuilt from its config, the submodule ``module`` (dotted path) returned;
- a backbone file of :func:`fastkd.models.save_backbone`;
- an official MoCo v3 / MAE / DeiT / CLIP checkpoint or a timm state dict: needs ``arch`` (:func:`load_teacher`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from fastkd.checks import check_choice, check_instance
from fastkd.durable import read_torch_file
from fastkd.models.weights import FASTKD_FORMAT, STUDENT_FILE, TEACHER_FILE, detect_format, load_teacher
from fastkd.train.checkpoint import CheckpointManager, TrainingState, is_training_checkpoint


WEIGHTS = ("student", "teacher")  # which backbone of a run directory load_eval_model reads


def _submodule(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        child = getattr(module, part, None)
        if not isinstance(child, nn.Module):
            children = ", ".join(sorted(name for name, _ in module.named_children()))
            raise ValueError(f"module path {dotted!r}: {part!r} is not a submodule of {type(module).__name__} "
                             f"(children: {children})")
        module = child
    return module


def _from_training_checkpoint(state: dict, path: Path, module: str) -> nn.Module:
    from fastkd.config import run_config_from_dict
    from fastkd.methods import build_method

    state = TrainingState.from_dict(state, path)
    config = run_config_from_dict(state.config)
    method = build_method(config.method_name, config.method_config)
    method.load_state_dict(state.method)
    return _submodule(method, module)


def load_eval_model_described(path: str | os.PathLike, *, arch: str | None = None, module: str = "student",
                              format: str = "auto", device: str | torch.device = "cpu", weights: str = "student",
                              **timm_kwargs) -> tuple[nn.Module, dict]:
    """:func:`load_eval_model` and ``{"checkpoint": path read, "checkpoint_key": fastkd:<arch> | method.<module> |
    format}``."""
    check_instance("path", path, (str, os.PathLike), "a str or os.PathLike")
    check_choice("weights", weights, WEIGHTS)
    path = Path(path)
    if weights == "teacher":
        if not (path / TEACHER_FILE).is_file():
            problem = (f"has no {TEACHER_FILE}: only finished runs of methods with an EMA teacher (mocov3, resmoco, "
                       "mokd) write one" if path.is_dir() else
                       "is not a directory (give the teacher file itself as the path instead)")
            raise ValueError(f"weights='teacher' picks the {TEACHER_FILE} of a run directory; {str(path)!r} {problem}")
        path = path / TEACHER_FILE
    elif path.is_dir() and module == "student" and (path / STUDENT_FILE).is_file():
        path = path / STUDENT_FILE
    loaded = None
    if path.is_dir():
        loaded = CheckpointManager(path / "checkpoints" if (path / "checkpoints").is_dir() else path).load_latest()
    if loaded is None and not path.is_file():
        raise ValueError(f"{str(path)!r} is a directory without training checkpoints" if path.is_dir() else
                         f"checkpoint {str(path)!r} does not exist")
    state, source = loaded if loaded is not None else (read_torch_file(path), path)
    if loaded is not None or is_training_checkpoint(state):
        model, key = _from_training_checkpoint(state, source, module), f"method.{module}"
    else:
        if isinstance(state, dict) and state.get("format") == FASTKD_FORMAT and arch is None:
            arch = state.get("arch")
        if arch is None:
            raise ValueError(f"{str(path)!r} is not a fastkd checkpoint: give arch (the timm architecture) "
                             "to load it as a MoCo v3 / MAE / DeiT / CLIP / timm checkpoint")
        model = load_teacher(arch, path, format=format, **timm_kwargs)
        detected = detect_format(state) if format == "auto" else format
        key = f"{detected}:{arch}" if detected == FASTKD_FORMAT else detected
    return model.to(device).eval().requires_grad_(False), {"checkpoint": str(path), "checkpoint_key": key}


def load_eval_model(path: str | os.PathLike, *, arch: str | None = None, module: str = "student",
                    format: str = "auto", device: str | torch.device = "cpu", weights: str = "student",
                    **timm_kwargs) -> nn.Module:
    """The frozen model saved at ``path`` (module doc), on ``device``."""
    return load_eval_model_described(path, arch=arch, module=module, format=format, device=device, weights=weights,
                                     **timm_kwargs)[0]


def native_image_size(model: nn.Module, default: int = 224) -> int:
    """A ViT's built ``img_size``, else ``default``."""
    patch_embed = getattr(getattr(model, "model", model), "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if isinstance(img_size, (tuple, list)) and img_size and isinstance(img_size[0], int):
        return int(img_size[0])
    return default
