"""What every method shares: config checking, frozen teachers, feature alignment, the loss dict.
A method is a :class:`Method`: the trainer's protocol (:mod:`fastkd.method_protocol`) plus a
registered ``name``, a ``role``, a ``recipe`` and a config class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from typing import Any, Mapping

import torch
from torch import nn

from fastkd.checks import check_bool, check_instance, check_kwargs, check_number, check_shape, check_str
from fastkd.data.batch import Batch
from fastkd.method_protocol import TrainingMethod
from fastkd.models import LinearProjector, MLPProjector
from fastkd.models.backbone import Features
from fastkd.models.ema_teacher import EMATeacher
from fastkd.ops import TARGET_NORMS as OP_TARGET_NORMS
from fastkd.ops import gather_tokens, random_keep
from fastkd.suggest import did_you_mean

ROLES = ("pretrain", "distill")
# name -> class of every method class defined so far (each registers itself: Method.__init_subclass__)
REGISTRY: dict[str, type] = {}
# the feature-distillation options of MOMA and Hybrid Distill (see :func:`align_parts`)
ALIGN_TARGETS = ("cls", "patch", "both")
ALIGN_TARGET_NORMS = tuple(n for n in OP_TARGET_NORMS if n != "none")  # the papers normalise the target
PROJECTORS = ("linear", "mlp")


def method_config_from_dict(config_class: type, config: Mapping[str, Any]):
    """A method's config: ``config_class(**config)``; an unknown key raises ``ValueError`` naming the
    nearest valid one. (The whole run's config is :func:`fastkd.config.run_config_from_dict`.)"""
    check_kwargs("config", config)
    check_known(f"{config_class.__name__} key", config, [f.name for f in dataclasses.fields(config_class)])
    return config_class(**config)


def check_known(what: str, keys, valid) -> None:
    """``ValueError`` for the first of ``keys`` not in ``valid``, naming it and the nearest valid one."""
    for key in keys:
        if key not in valid:
            raise ValueError(f"unknown {what} {key!r}{did_you_mean(key, valid)} (valid: {', '.join(map(str, valid))})")


def check_typed_fields(config) -> None:
    """Check the fields of the dataclass ``config`` that their annotation says enough about: a
    ``bool`` field is a bool, an ``int`` one an int >= 1, a ``str | None`` one a non-empty string
    (each may be None where ``| None`` is annotated). The config checks its other fields itself."""
    for name, hint in typing.get_type_hints(type(config)).items():
        value = getattr(config, name)
        optional = hint in (bool | None, int | None, str | None)
        if value is None and optional:
            continue
        if hint in (bool, bool | None):
            check_bool(name, value)
        elif hint in (int, int | None):
            check_number(name, value, low=1, integer=True)
        elif hint == str | None:
            check_str(name, value)


def check_batch(batch: Any, min_views: int, method: str) -> list[torch.Tensor]:
    """The views of ``batch`` (a :class:`Batch`), at least ``min_views`` of them, each ``[B, C, H, W]``."""
    check_instance("batch", batch, Batch, f"a fastkd.data.Batch ({method}'s input)")
    views = list(batch.views)
    if len(views) < min_views:
        raise ValueError(f"{method} needs at least {min_views} views per batch, got {len(views)}")
    for i, v in enumerate(views):
        check_shape(f"batch.views[{i}]", v, (views[0].shape[0] if i else "B", "C", "H", "W"))
    return views


def loss_dict(parts: Mapping[str, torch.Tensor], weights: Mapping[str, float],
              metrics: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``{"loss": sum(weights[k] * parts[k]), **parts (detached copies), **metrics (detached)}``. One part of
    weight 1 is the loss itself and its copy a clone: inductor (torch 2.14) folds ``1.0 * part`` into ``part``
    and then returns a compiled forward's loss without ``requires_grad`` next to the part's detached view, and
    AOTAutograd (torch 2.11) trains differently from eager when the loss and that view are both outputs."""
    terms = [(float(weights[name]), value) for name, value in parts.items()]
    single = len(terms) == 1 and terms[0][0] == 1.0
    out = {"loss": terms[0][1] if single else sum(weight * value for weight, value in terms)}
    out.update({name: value.detach().clone() if single else value.detach() for name, value in parts.items()})
    out.update({name: torch.as_tensor(value).detach() for name, value in (metrics or {}).items()})
    return out


def masked_forward(backbone: nn.Module, images: torch.Tensor, num_visible: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked student forward (MAE, MOMA): ``num_visible`` random patches per image
    (:func:`fastkd.ops.random_keep`) through the ViT ``backbone``'s ``forward_features(keep=...)``.
    Returns ``(tokens, keep_idx)``: the prefix tokens followed by the visible patches' tokens, and
    the kept patch indices ``[B, num_visible]``. How many patches stay visible is each method's rule."""
    keep_idx, _ = random_keep(images.shape[0], backbone.num_patches, num_visible, device=images.device)
    return backbone.forward_features(images, keep=keep_idx).tokens, keep_idx


def build_projector(kind: str, in_dim: int, out_dim: int, hidden_dim: int) -> nn.Module:
    """The student-to-teacher projector of :data:`PROJECTORS`: linear, or an MLP of ``hidden_dim``."""
    return LinearProjector(in_dim, out_dim) if kind == "linear" else MLPProjector(in_dim, out_dim, hidden_dim)


def align_parts(align: nn.Module, projected: torch.Tensor, target: torch.Tensor, keep_idx: torch.Tensor,
                which: str, student_prefix: int, teacher_prefix: int) -> dict[str, torch.Tensor]:
    """Feature-alignment parts on the kept tokens by ``which`` (:data:`ALIGN_TARGETS`)::

        cls   = align(projected[:, 0], target[:, 0])
        patch = align(projected[:, P_s:], gather_tokens(target[:, P_t:], keep_idx))

    ``projected``: the student's tokens (prefix, then the kept patches) at the teacher's width;
    ``target``: the teacher's tokens on the whole image; ``P_s`` / ``P_t``: their prefix tokens."""
    parts = {}
    if which in ("cls", "both"):
        parts["cls"] = align(projected[:, 0], target[:, 0])
    if which in ("patch", "both"):
        kept = gather_tokens(target[:, teacher_prefix:].contiguous(), keep_idx)
        parts["patch"] = align(projected[:, student_prefix:], kept)
    return parts


class Method(TrainingMethod):
    """Base class of fastkd's methods: the trainer's protocol plus what the registry and the CLI
    read, given as class keywords::

        class MOMA(Method, name="moma", recipe="mae", role="distill", config=MOMAConfig): ...

    ``name`` registers the class on import, ``recipe`` is its data recipe, ``config`` its config
    dataclass (``config_class``), ``role`` one of :data:`ROLES` (it picks the CLI command); a
    subclass inherits what it does not give. Submodules named in ``frozen_teachers`` stay in eval
    mode whatever ``train()`` asks and never receive gradients."""

    name: str = ""
    recipe: str = ""
    config_class: type = object
    role: str = ""
    frozen_teachers: tuple[str, ...] = ()

    def __init_subclass__(cls, *, name: str | None = None, recipe: str | None = None, role: str | None = None,
                          config: type | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        for attr, value in (("recipe", recipe), ("role", role), ("config_class", config)):
            if value is not None:
                setattr(cls, attr, value)
        if name is not None:
            if cls.role not in ROLES:
                raise TypeError(f"method {cls.__name__}: role must be one of {ROLES}, got {cls.role!r}")
            cls.name = name
            REGISTRY[name] = cls

    def __init__(self, config):
        super().__init__()
        check_instance("config", config, self.config_class, f"a {self.config_class.__name__}")
        self.config = config

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen_teachers:
            getattr(self, name).eval()
        return self

    @property
    def ema_teacher_backbone(self) -> nn.Module | None:
        """The EMA teacher's copy of :attr:`student` (MoCo v3's momentum backbone, MOKD's teacher of the
        evaluated model): the submodule at the student's path in an :class:`fastkd.models.EMATeacher`
        that follows it; None without one."""
        student = self.student
        for module in self.modules():
            if isinstance(module, EMATeacher):
                for name, candidate in module.student.named_modules():
                    if candidate is student:
                        return module.module.get_submodule(name)
        return None

    def frozen_teacher_features(self, teacher: nn.Module, images: torch.Tensor, **kwargs) -> Features:
        """``teacher.forward_features(images, **kwargs)`` of a frozen teacher under ``no_grad`` (not
        ``inference_mode``: the outputs are targets the student's backward saves), autocast to
        :attr:`frozen_teacher_dtype` when set (fp32: autocast off); outside autocast the outputs come
        back in ``images``' dtype, so a bf16 teacher feeds an fp32 student's losses."""
        dtype = self.frozen_teacher_dtype
        device_type = images.device.type
        context = (contextlib.nullcontext() if dtype is None
                   else torch.autocast(device_type, enabled=False) if dtype == torch.float32
                   else torch.autocast(device_type, dtype=dtype))
        with torch.no_grad(), context:
            features = teacher.forward_features(images, **kwargs)
        if dtype is None or torch.is_autocast_enabled(device_type):
            return features
        return features.to_dtype(images.dtype)
