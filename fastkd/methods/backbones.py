"""One description for every backbone of a method (students, teachers, MOKD's two models):
:class:`BackboneSpec`, read from a config's nested mapping (YAML ``method.teachers.mocov3:
{arch: ..., path: ...}``) onto the method's default for that role, and built or loaded from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch.nn.functional as F

from fastkd.checks import check_instance, check_kwargs, check_number, check_str
from fastkd.models import Backbone, build_backbone, load_teacher
from fastkd.methods.base import check_known

SPEC_KEYS = ("arch", "kwargs", "path", "format", "input_size")
TRAINED_KEYS = SPEC_KEYS[:4]  # a backbone that sees the batch as given (no input_size)


@dataclass(frozen=True)
class BackboneSpec:
    """``arch`` (a timm / fastkd architecture) built with ``kwargs``; ``path``: a checkpoint read by
    :func:`fastkd.models.load_teacher` as ``format`` (a teacher's weights, or a student's initial
    ones; None: random init); ``input_size``: side length the images are resized to (bicubic) for
    this backbone only (None: as given), e.g. a teacher of another patch size than the student."""

    arch: str = "vit_base_patch16_224"
    kwargs: dict = field(default_factory=dict)
    path: str | None = None
    format: str = "auto"
    input_size: int | None = None

    def build(self, *, attention: str | None = None, checkpointing: bool = False) -> Backbone:
        """A trainable backbone: random init, or the weights at ``path`` (unfrozen)."""
        if self.path is None:
            return build_backbone(self.arch, attention=attention, checkpointing=checkpointing, **self.kwargs)
        return load_teacher(self.arch, self.path, format=self.format, attention=attention,
                            checkpointing=checkpointing, frozen=False, **self.kwargs)

    def load_frozen(self, where: str, *, attention: str | None = None) -> Backbone:
        """The frozen backbone (no gradients, eval mode) of the checkpoint at ``path``, required."""
        if self.path is None:
            raise ValueError(f"{where}.path is required: give the checkpoint of this teacher")
        return load_teacher(self.arch, self.path, format=self.format, attention=attention, frozen=True, **self.kwargs)

    def resize(self, images):
        """``images`` resized (bicubic) to ``input_size`` when it is set and differs."""
        size = self.input_size
        if size is None or tuple(images.shape[-2:]) == (size, size):
            return images
        return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)


def backbone_spec(where: str, value: Any, default: BackboneSpec, keys: tuple[str, ...] = SPEC_KEYS) -> BackboneSpec:
    """``value`` (a :class:`BackboneSpec` or a mapping of some of ``keys``) over ``default``, checked;
    errors name ``where.<key>``."""
    if isinstance(value, BackboneSpec):
        given = {key: item for key, item in dataclasses.asdict(value).items() if item != getattr(default, key)}
    else:
        check_instance(where, value, Mapping, f"a mapping with keys {keys}")
        given = dict(value)
    check_known(f"{where} key", given, keys)
    spec = dataclasses.replace(default, **given)
    check_str(f"{where}.arch", spec.arch)
    check_kwargs(f"{where}.kwargs", spec.kwargs)
    check_str(f"{where}.path", spec.path, optional=True)
    check_str(f"{where}.format", spec.format)
    if spec.input_size is not None:
        check_number(f"{where}.input_size", spec.input_size, low=1, integer=True)
    return spec


def backbone_specs(where: str, value: Any, defaults: Mapping[str, BackboneSpec],
                   keys: tuple[str, ...] = SPEC_KEYS) -> dict[str, BackboneSpec]:
    """A mapping role -> spec (``method.teachers``, MOKD's ``models``) over ``defaults``: every role
    of ``defaults`` is present; a role ``defaults`` lacks is refused by name."""
    check_instance(where, value, Mapping, f"a mapping of {', '.join(defaults)} to backbone specs")
    check_known(f"{where} entry", value, list(defaults))
    return {role: backbone_spec(f"{where}.{role}", value.get(role, {}), default, keys)
            for role, default in defaults.items()}
