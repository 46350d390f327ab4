"""Backbone weights: loading teachers (official MoCo v3 / MAE / DeiT / CLIP files, timm state dicts, fastkd's
format) and saving backbones in fastkd's format. Formats (``format="auto"`` detects them in this order):

- ``fastkd`` (:func:`save_backbone`): ``{"format": "fastkd", "version", "arch", "timm_kwargs", "state_dict"}``;
- ``mocov3``: ``{"state_dict": {"module.base_encoder.<timm name>", "module.momentum_encoder.<timm name>",
  "module.predictor.*"}}``; ``encoder`` picks ``base`` or ``momentum``. Its ViT-S has 12 heads (timm's: 6):
  build it with ``num_heads=12`` (:data:`OFFICIAL_HEADS`);
- ``clip``: an OpenAI CLIP / open_clip image tower (``visual.conv1.weight``, ``visual.class_embedding``,
  ``visual.transformer.resblocks.<i>.*``, ``visual.ln_post.*``, ``visual.proj``, ...), flat or under
  ``"state_dict"`` (maybe ``module.``-prefixed), or alone without ``visual.``; timm's converter renames it and the
  projection is dropped. Build a timm ``*_clip_*`` arch (``*_quickgelu_*`` for OpenAI's weights). OpenAI's
  TorchScript ``.pt`` files are refused: ``torch.save`` their ``state_dict()``;
- ``mae``: ``{"model": {<timm name>, "decoder_*", "mask_token"}}``; encoder-only releases detect as ``deit``;
- ``deit``: ``{"model": {<timm name>}, "optimizer", "epoch", ...}``; a distilled DeiT's ``dist_token`` loads as the
  register token of a ViT built with ``reg_tokens=1``;
- ``timm``: a flat ``{<timm name>: tensor}`` state dict.

Classifiers and projectors are ignored; a ``pos_embed`` of another grid is resampled (bicubic); any other key
mismatch raises :class:`CheckpointError` listing the keys.
"""

from __future__ import annotations

import argparse
import math
import os
import zipfile
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import _convert_openai_clip

from fastkd.checks import check_bool, check_choice
from fastkd.durable import UnreadableFileError, atomic_torch_save, read_torch_file
from fastkd.models.backbone import Backbone, build_backbone

FASTKD_FORMAT = "fastkd"  # the ``format`` entry of a file written by save_backbone
FORMATS = ("auto", FASTKD_FORMAT, "mocov3", "clip", "mae", "deit", "timm")  # after auto: detection order
STUDENT_FILE = "student.pt"  # the backbone a finished training run writes into its output folder
TEACHER_FILE = "teacher.pt"  # beside it: the EMA teacher's copy of that backbone (methods with one)
ENCODERS = ("base", "momentum")
FASTKD_FORMAT_VERSION = 1
_MAE_DECODER_PREFIXES = ("decoder_", "mask_token")
# (requested, detected) formats of one layout: MAE's encoder-only releases hold no decoder keys
_SAME_LAYOUT = {("mae", "deit")}
_CLIP_PREFIX = "visual."  # the image tower of a full CLIP state dict
_CLIP_TOWER_KEYS = ("class_embedding", "positional_embedding", "conv1.weight")  # OpenAI names, unlike timm's
_DIST_TOKEN = "dist_token"  # a distilled DeiT's distillation token
_DISTILLED_CLASSIFIER = "head_dist"  # and its classifier
_SHOWN_KEYS = 20
# {ViT width: head count} of the official releases (MoCo v3's vits.py, MAE's models_mae.py, CLIP's ViT-B/L); shapes
# cannot tell the head count, and a wrong one gives silently wrong features
OFFICIAL_HEADS = {"mocov3": {384: 12, 768: 12}, "mae": {768: 12, 1024: 16, 1280: 16}, "clip": {768: 12, 1024: 16}}


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint, or one that does not match the requested backbone."""


def _check_path(path: object) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")


def _read(path: str | os.PathLike) -> dict:
    _check_path(path)
    if _is_torchscript(path):  # a missing file is not one: read_torch_file raises FileNotFoundError
        raise CheckpointError(f"{os.fspath(path)!r} is a TorchScript archive (such as OpenAI CLIP's original .pt "
                              "files), which fastkd does not read because loading it runs code from the file: load "
                              "it with torch.jit.load where you trust it, torch.save(model.state_dict(), ...) and "
                              "pass that file")
    try:
        obj = read_torch_file(path, safe_globals=(argparse.Namespace,))
    except UnreadableFileError as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{os.fspath(path)!r} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def _is_torchscript(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript zip (with ``constants.pkl`` and ``code/``, unlike ``torch.save``'s)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(name.endswith("/constants.pkl") for name in names) and any("/code/" in name for name in names)


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_module(state: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in state.items()}


def _clip_tower(obj: dict) -> tuple[dict, str] | None:
    """``(state without module., tower prefix "visual." or "")`` of a CLIP image tower in ``obj``, else None."""
    state = obj.get("state_dict") if _is_state_dict(obj.get("state_dict")) else obj
    if not _is_state_dict(state):
        return None
    state = _strip_module(state)
    if all(_CLIP_PREFIX + k in state for k in _CLIP_TOWER_KEYS):
        return state, _CLIP_PREFIX
    if all(k in state for k in _CLIP_TOWER_KEYS) and not any(k.startswith(_CLIP_PREFIX) for k in state):
        return state, ""
    return None


def detect_format(obj: dict) -> str:
    """The format of a loaded checkpoint dict (see module doc); ``CheckpointError`` if unknown."""
    if obj.get("format") == FASTKD_FORMAT:
        return FASTKD_FORMAT
    state = obj.get("state_dict")
    if _is_state_dict(state) and any(k.startswith("base_encoder.") for k in _strip_module(state)):
        return "mocov3"
    if _clip_tower(obj) is not None:
        return "clip"
    if _is_state_dict(obj.get("model")):
        return "mae" if any(k.startswith(_MAE_DECODER_PREFIXES) for k in obj["model"]) else "deit"
    if _is_state_dict(obj):
        return "timm"
    raise CheckpointError(f"unrecognised checkpoint layout with top-level keys {sorted(map(str, obj))[:_SHOWN_KEYS]}")


def _backbone_state(obj: dict, fmt: str, encoder: str, model: torch.nn.Module) -> dict:
    """The backbone's tensors under timm names (classifier / projector keys still in)."""
    if fmt == "clip":  # detected as clip (a requested format must match the detected one)
        state, prefix = _clip_tower(obj)
        return _convert_openai_clip(state, model, prefix=prefix)
    key = {FASTKD_FORMAT: "state_dict", "mocov3": "state_dict", "mae": "model", "deit": "model"}.get(fmt)
    source = obj if key is None else obj.get(key)
    if not _is_state_dict(source):  # detection checked every layout but fastkd's own
        raise CheckpointError(f"{fmt} checkpoint without a {key!r} dict of tensors")
    if fmt in ("mae", "deit"):
        return {k: v for k, v in source.items() if not k.startswith(_MAE_DECODER_PREFIXES)}
    if fmt == "mocov3":
        prefix = f"{encoder}_encoder."
        source = {k[len(prefix):]: v for k, v in _strip_module(source).items() if k.startswith(prefix)}
        if not source:
            raise CheckpointError(f"mocov3 checkpoint has no 'module.{prefix}*' keys")
    return dict(source)


def _drop_classifier(state: dict, model: torch.nn.Module) -> dict:
    """Drop the classifiers / projectors (``head.*``, ``fc.*``, ``head_dist.*``) the backbone does not have."""
    classifier = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    model_keys = model.state_dict().keys()
    for name in dict.fromkeys((*names, _DISTILLED_CLASSIFIER)):
        if not any(k.startswith(f"{name}.") for k in model_keys):
            state = {k: v for k, v in state.items() if not k.startswith(f"{name}.")}
    return state


def _distillation_token(state: dict, model: torch.nn.Module) -> dict:
    """A distilled DeiT's ``dist_token`` as the ``reg_tokens=1`` register token (kept where the model has one)."""
    if _DIST_TOKEN not in state:
        return state
    model_keys = model.state_dict().keys()
    if _DIST_TOKEN in model_keys:
        return state
    reg_token = getattr(model, "reg_token", None)
    registers = 0 if reg_token is None else reg_token.shape[1]
    if registers != 1 or "reg_token" in state:
        raise CheckpointError(f"the checkpoint holds a distilled DeiT's distillation token {_DIST_TOKEN!r}: load it "
                              f"into a ViT built with reg_tokens=1 (this one has {registers}; timm's "
                              "deit_*_distilled_* archs are not fastkd backbones)")
    return {("reg_token" if k == _DIST_TOKEN else k): v for k, v in state.items()}


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
        raise CheckpointError(f"pos_embed {tuple(pos.shape)} is not {prefix} prefix tokens + a square grid; cannot "
                              f"resize to {tuple(model.pos_embed.shape)}")
    resized = resample_abs_pos_embed(pos.float(), new_size=list(model.patch_embed.grid_size), old_size=[side, side],
                                     num_prefix_tokens=prefix)
    return {**state, "pos_embed": resized.to(pos.dtype)}


def _check_official_heads(fmt: str, backbone: Backbone, description: str) -> None:
    """Refuse an official ``fmt`` file for a ViT whose head count is not the release's (:data:`OFFICIAL_HEADS`)."""
    heads = OFFICIAL_HEADS.get(fmt, {}).get(backbone.embed_dim) if backbone.is_vit else None
    if heads is not None and backbone.num_heads != heads:
        raise CheckpointError(
            f"{description} is an official {fmt} ViT of width {backbone.embed_dim}, which has {heads} attention heads, "
            f"but backbone {backbone.name!r} has {backbone.num_heads}: build it with num_heads={heads} "
            f"(YAML: kwargs: {{num_heads: {heads}}}); the tensor shapes match, the features would be wrong"
        )


def _listed(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return f"{keys[:_SHOWN_KEYS]}{more}"


def _check_keys(state: dict, backbone: Backbone, description: str) -> None:
    expected = backbone.model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{description} does not match backbone {backbone.name!r}: missing keys "
                              f"{_listed(missing)}; unexpected keys {_listed(unexpected)}; shape mismatches "
                              f"{_listed(mismatched)}")


def _is_timm_vit(arch: str) -> bool:
    """Whether ``arch`` is built by timm's vision_transformer module (which accepts ``weight_init="skip"``)."""
    return isinstance(arch, str) and timm.is_model(arch) and \
        timm.models.model_entrypoint(arch).__module__ == "timm.models.vision_transformer"


def load_teacher(arch: str, path: str | os.PathLike, format: str = "auto", encoder: str = "base", *,
                 attention: str | None = None, checkpointing: bool = False, frozen: bool = True,
                 **timm_kwargs) -> Backbone:
    """``build_backbone(arch, **timm_kwargs)`` with the checkpoint at ``path`` loaded, frozen (eval, no grad) unless
    ``frozen=False``; :class:`CheckpointError` for unreadable files and any mismatched key."""
    check_choice("format", format, FORMATS)
    check_choice("encoder", encoder, ENCODERS)
    check_bool("frozen", frozen)
    obj = _read(path)
    detected = detect_format(obj)
    if format != "auto" and format != detected and (format, detected) not in _SAME_LAYOUT:
        raise CheckpointError(f"{os.fspath(path)!r} was requested as format {format!r} but looks like {detected!r}")
    fmt = detected if format == "auto" else format  # a requested name may differ by _SAME_LAYOUT
    if encoder != "base" and fmt != "mocov3":
        raise ValueError(f"encoder={encoder!r} applies to mocov3 checkpoints only; {os.fspath(path)!r} is {fmt!r}")
    if fmt == FASTKD_FORMAT:
        if obj.get("arch") != arch:
            raise CheckpointError(f"{os.fspath(path)!r} holds a {obj.get('arch')!r} backbone, not {arch!r}")
        timm_kwargs = {**obj.get("timm_kwargs", {}), **timm_kwargs}
    skip_init = "weight_init" not in timm_kwargs and _is_timm_vit(arch)
    backbone = build_backbone(arch, attention=attention, checkpointing=checkpointing,
                              **({"weight_init": "skip"} if skip_init else {}), **timm_kwargs)
    if skip_init:  # every weight comes from the file; a model rebuilt from these kwargs must initialise
        backbone.timm_kwargs.pop("weight_init")
    state = _backbone_state(obj, fmt, encoder, backbone.model)
    state = _drop_classifier(_distillation_token(state, backbone.model), backbone.model)
    state = _resize_pos_embed(state, backbone)
    encoder_note = f", {encoder} encoder" if fmt == "mocov3" else ""
    description = f"{os.fspath(path)!r} (format {fmt!r}{encoder_note})"
    _check_keys(state, backbone, description)
    _check_official_heads(fmt, backbone, description)
    backbone.model.load_state_dict(state, strict=True)
    if frozen:
        backbone.requires_grad_(False).eval()
    return backbone


def _unsaveable(value: object, name: str) -> str | None:
    """The first entry of ``value`` that is not a plain value (str-keyed dicts, lists, scalars), or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            if bad := f"{name} key {key!r}" if not isinstance(key, str) else _unsaveable(item, f"{name}[{key!r}]"):
                return bad
        return None
    if isinstance(value, (list, tuple)):
        return next((bad for i, item in enumerate(value) if (bad := _unsaveable(item, f"{name}[{i}]"))), None)
    return None if isinstance(value, (int, float, str, bool, type(None))) else f"{name} ({type(value).__name__})"


def save_backbone(backbone: Backbone, path: str | os.PathLike) -> Path:
    """Write ``backbone`` in the ``fastkd`` format with :func:`fastkd.durable.atomic_torch_save`; returns the path."""
    if not isinstance(backbone, Backbone):
        raise TypeError(f"backbone must be a fastkd Backbone, got {type(backbone).__name__}")
    _check_path(path)
    if (bad := _unsaveable(backbone.timm_kwargs, "backbone.timm_kwargs")) is not None:
        raise TypeError(f"backbone.timm_kwargs must hold only plain values to be saved, got {bad}")
    state = {k: v.detach().cpu() for k, v in backbone.model.state_dict().items()}
    return atomic_torch_save({"format": FASTKD_FORMAT, "version": FASTKD_FORMAT_VERSION, "arch": backbone.name,
                              "timm_kwargs": backbone.timm_kwargs, "state_dict": state}, path)
