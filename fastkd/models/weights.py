"""Backbone weights: loading teachers (official MoCo v3 / MAE files, timm state dicts, fastkd's own
format) and saving backbones in fastkd's format. The one home of the weight-file format names.

Formats (``format="auto"`` detects them in this order):

- ``fastkd`` (:data:`FASTKD_FORMAT`): written by :func:`save_backbone`: ``{"format": "fastkd", "version", "arch",
  "timm_kwargs", "state_dict"}`` with timm parameter names;
- ``mocov3``: ``{"state_dict": {"module.base_encoder.<timm name>", "module.momentum_encoder.<timm name>",
  "module.predictor.*"}, ...}``; ``encoder`` picks ``base`` (default) or ``momentum``; the projector
  (``head.*`` for ViTs, ``fc.*`` for ResNets) and the predictor are ignored. MoCo v3's ViT-S has
  12 heads: build it with ``num_heads=12``;
- ``mae``: ``{"model": {<timm name>, "decoder_*", "mask_token"}, ...}``; decoder keys are ignored;
- ``timm``: a flat ``{<timm name>: tensor}`` state dict; the classifier is ignored.

Files are read with ``torch.load(weights_only=True)``. A positional embedding whose grid differs
from the model's is resampled (bicubic, prefix tokens kept). Every backbone key must be matched:
otherwise :class:`CheckpointError` lists the missing / unexpected / mismatched keys and the format.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed

from fastkd.durable import UnreadableFileError, atomic_torch_save, read_torch_file
from fastkd.models.backbone import Backbone, build_backbone

FASTKD_FORMAT = "fastkd"  # the ``format`` entry of a file written by save_backbone
FORMATS = ("auto", "mocov3", "mae", "timm", FASTKD_FORMAT)
STUDENT_FILE = "student.pt"  # the backbone a finished training run writes into its output folder
TEACHER_FILE = "teacher.pt"  # beside it: the EMA teacher's copy of that backbone (methods with one)
ENCODERS = ("base", "momentum")
FASTKD_FORMAT_VERSION = 1
_MAE_DECODER_PREFIXES = ("decoder_", "mask_token")
_SHOWN_KEYS = 20


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint, or one that does not match the requested backbone."""


def _read(path: str | os.PathLike) -> dict:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} does not exist")
    try:
        obj = read_torch_file(path, safe_globals=(argparse.Namespace,))
    except UnreadableFileError as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{os.fspath(path)!r} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_module(state: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in state.items()}


def detect_format(obj: dict) -> str:
    """The format of a loaded checkpoint dict (see module doc); ``CheckpointError`` if unknown."""
    if obj.get("format") == FASTKD_FORMAT:
        return FASTKD_FORMAT
    if _is_state_dict(obj.get("state_dict")) and any(
        k.startswith("base_encoder.") for k in _strip_module(obj["state_dict"])
    ):
        return "mocov3"
    if _is_state_dict(obj.get("model")):
        return "mae"
    if _is_state_dict(obj):
        return "timm"
    raise CheckpointError(f"unrecognised checkpoint layout with top-level keys {sorted(map(str, obj))[:_SHOWN_KEYS]}")


def _backbone_state(obj: dict, fmt: str, encoder: str) -> dict:
    """The backbone's tensors under timm names (classifier / projector keys still included)."""
    if fmt == FASTKD_FORMAT:
        if not _is_state_dict(obj.get("state_dict")):
            raise CheckpointError("fastkd checkpoint without a 'state_dict' of tensors")
        return dict(obj["state_dict"])
    if fmt == "mocov3":
        if not _is_state_dict(obj.get("state_dict")):
            raise CheckpointError("mocov3 checkpoint without a 'state_dict' of tensors")
        prefix = f"{encoder}_encoder."
        state = {k[len(prefix):]: v for k, v in _strip_module(obj["state_dict"]).items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"mocov3 checkpoint has no 'module.{prefix}*' keys")
        return state
    if fmt == "mae":
        if not _is_state_dict(obj.get("model")):
            raise CheckpointError("mae checkpoint without a 'model' dict of tensors")
        return {k: v for k, v in obj["model"].items() if not k.startswith(_MAE_DECODER_PREFIXES)}
    if not _is_state_dict(obj):
        raise CheckpointError("timm checkpoint must be a flat dict of tensors")
    return dict(obj)


def _drop_classifier(state: dict, model: torch.nn.Module) -> dict:
    """Drop the classifier / MoCo projector (``head.*`` or ``fc.*``) when the backbone has none."""
    classifier = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
    model_keys = model.state_dict().keys()
    if any(k.startswith(f"{classifier}.") for k in model_keys):
        return state
    return {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}


def _resize_pos_embed(state: dict, backbone: Backbone) -> dict:
    model = backbone.model
    if not backbone.is_vit or "pos_embed" not in state or model.pos_embed is None:
        return state
    pos = state["pos_embed"]
    if pos.shape == model.pos_embed.shape or pos.dim() != 3 or pos.shape[-1] != model.pos_embed.shape[-1]:
        return state
    prefix = 0 if model.no_embed_class else backbone.num_prefix_tokens
    side = math.isqrt(pos.shape[1] - prefix)
    if side * side != pos.shape[1] - prefix:
        raise CheckpointError(
            f"pos_embed {tuple(pos.shape)} is not {prefix} prefix tokens + a square grid; cannot resize to "
            f"{tuple(model.pos_embed.shape)}"
        )
    resized = resample_abs_pos_embed(
        pos.float(), new_size=list(model.patch_embed.grid_size), old_size=[side, side], num_prefix_tokens=prefix
    )
    return {**state, "pos_embed": resized.to(pos.dtype)}


def _listed(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return f"{keys[:_SHOWN_KEYS]}{more}"


def _check_keys(state: dict, backbone: Backbone, description: str) -> None:
    expected = backbone.model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{description} does not match backbone {backbone.name!r}: missing keys {_listed(missing)}; "
            f"unexpected keys {_listed(unexpected)}; shape mismatches {_listed(mismatched)}"
        )


def _is_timm_vit(arch: str) -> bool:
    """Whether ``arch`` is built by timm's vision_transformer module (which accepts ``weight_init="skip"``)."""
    return isinstance(arch, str) and timm.is_model(arch) and (
        timm.models.model_entrypoint(arch).__module__ == "timm.models.vision_transformer"
    )


def load_teacher(
    arch: str,
    path: str | os.PathLike,
    format: str = "auto",
    encoder: str = "base",
    *,
    attention: str | None = None,
    checkpointing: bool = False,
    frozen: bool = True,
    **timm_kwargs,
) -> Backbone:
    """Build ``build_backbone(arch, **timm_kwargs)`` and load the checkpoint at ``path`` into it.

    Returns the backbone frozen (``requires_grad=False``, eval mode) unless ``frozen=False``.
    Raises :class:`CheckpointError` for unreadable files and for any key that does not match.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    if not isinstance(frozen, bool):
        raise TypeError(f"frozen must be a bool, got {type(frozen).__name__}")
    obj = _read(path)
    detected = detect_format(obj)
    if format != "auto" and format != detected:
        raise CheckpointError(f"{os.fspath(path)!r} was requested as format {format!r} but looks like {detected!r}")
    if encoder != "base" and detected != "mocov3":
        raise ValueError(f"encoder={encoder!r} applies to mocov3 checkpoints only; {os.fspath(path)!r} is {detected!r}")
    if detected == FASTKD_FORMAT:
        if obj.get("arch") != arch:
            raise CheckpointError(f"{os.fspath(path)!r} holds a {obj.get('arch')!r} backbone, not {arch!r}")
        timm_kwargs = {**obj.get("timm_kwargs", {}), **timm_kwargs}
    skip_init = "weight_init" not in timm_kwargs and _is_timm_vit(arch)
    backbone = build_backbone(arch, attention=attention, checkpointing=checkpointing,
                              **({"weight_init": "skip"} if skip_init else {}), **timm_kwargs)
    if skip_init:  # every weight comes from the file; a model rebuilt from these kwargs must initialise
        backbone.timm_kwargs.pop("weight_init")
    state = _drop_classifier(_backbone_state(obj, detected, encoder), backbone.model)
    state = _resize_pos_embed(state, backbone)
    encoder_note = f", {encoder} encoder" if detected == "mocov3" else ""
    _check_keys(state, backbone, f"{os.fspath(path)!r} (detected format {detected!r}{encoder_note})")
    backbone.model.load_state_dict(state, strict=True)
    if frozen:
        backbone.requires_grad_(False).eval()
    return backbone


def _check_serialisable(value: object, name: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{name} keys must be str, got {key!r}")
            _check_serialisable(item, f"{name}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_serialisable(item, f"{name}[{index}]")
    elif not isinstance(value, (int, float, str, bool, type(None))):
        raise TypeError(f"{name} must hold only plain values to be saved, got {type(value).__name__}")


def save_backbone(backbone: Backbone, path: str | os.PathLike) -> Path:
    """Write ``backbone`` in the ``fastkd`` format durably (:func:`fastkd.durable.atomic_torch_save`:
    temporary file + fsync + rename); returns the path."""
    if not isinstance(backbone, Backbone):
        raise TypeError(f"backbone must be a fastkd Backbone, got {type(backbone).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    _check_serialisable(backbone.timm_kwargs, "backbone.timm_kwargs")
    payload = {
        "format": FASTKD_FORMAT,
        "version": FASTKD_FORMAT_VERSION,
        "arch": backbone.name,
        "timm_kwargs": backbone.timm_kwargs,
        "state_dict": {k: v.detach().cpu() for k, v in backbone.model.state_dict().items()},
    }
    return atomic_torch_save(payload, path)
