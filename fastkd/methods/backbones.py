"""Backbones of a method: building (trainable) students and loading frozen teachers from a method
config's names and paths."""

from __future__ import annotations

from fastkd.models import Backbone, build_backbone, load_teacher


def build_student(arch: str, arch_kwargs: dict, *, init_path: str | None = None, init_format: str = "auto",
                  attention: str | None = None, checkpointing: bool = False) -> Backbone:
    """A trainable backbone: random init, or (``init_path``) the weights of a checkpoint read by
    :func:`fastkd.models.load_teacher` (e.g. an MAE or MoCo v3 checkpoint), unfrozen."""
    if init_path is None:
        return build_backbone(arch, attention=attention, checkpointing=checkpointing, **arch_kwargs)
    return load_teacher(arch, init_path, format=init_format, attention=attention, checkpointing=checkpointing,
                        frozen=False, **arch_kwargs)


def load_frozen_teacher(role: str, arch: str, arch_kwargs: dict, path: str | None, *, format: str = "auto",
                        attention: str | None = None) -> Backbone:
    """The frozen teacher ``role`` (no gradients, eval mode) from the checkpoint at ``path``."""
    if path is None:
        raise ValueError(f"{role}_path is required: give the {role} checkpoint to load with load_teacher")
    return load_teacher(arch, path, format=format, attention=attention, frozen=True, **arch_kwargs)
