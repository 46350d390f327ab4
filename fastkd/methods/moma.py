"""MOMA (Yao, Desai, Palaniswami 2023): distil self-supervised teachers into a heavily masked student.

Each teacher sees the whole image ``x``; the student encodes only ``K = round((1 - mask_ratio) N)``
random visible patches. Per teacher ``t`` a projector ``P_t`` maps the student tokens to its width::

    s = P_t(student.forward_features(x, keep=keep_idx).tokens)        # [B, 1+K, D_t]
    T = teacher_t.forward_features(x).tokens                          # [B, 1+N, D_t], no gradient
    cls_t   = FeatureAlignLoss(s[:, 0], T[:, 0])                      # target "cls" / "both"
    patch_t = FeatureAlignLoss(s[:, 1:], gather_tokens(T[:, 1:], keep_idx))   # "patch" / "both"
    loss = sum_t weight_t * (cls_t + patch_t)

(the target normalised without gradient by ``target_norm``; smooth-L1 / MSE / cosine). Modes:
``mocov3_to_mae`` (MoCo v3 teacher, student from an MAE checkpoint), ``mae_to_mocov3`` (the
reverse), ``both_to_random`` (both teachers, one projector each, randomly initialised student).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fastkd.checks import check_choice, check_number
from fastkd.data.batch import Batch
from fastkd.losses import FeatureAlignLoss
from fastkd.methods.backbones import BackboneSpec, backbone_spec, backbone_specs
from fastkd.methods.base import (ALIGN_TARGET_NORMS, ALIGN_TARGETS, PROJECTORS, Method, align_parts, build_projector,
                                 check_batch, check_typed_fields, loss_dict, masked_forward)
from fastkd.ops import LOSSES

MODES = {"mocov3_to_mae": ("mocov3",), "mae_to_mocov3": ("mae",), "both_to_random": ("mocov3", "mae")}
STUDENT = BackboneSpec("vit_small_patch16_224")
TEACHER = BackboneSpec("vit_base_patch16_224")
STUDENT_INITS = {"mocov3_to_mae": "MAE", "mae_to_mocov3": "MoCo v3"}  # modes 1 and 2: the student's init


@dataclass
class MOMAConfig:
    """``student``: the masked ViT student (:class:`BackboneSpec`); its ``path`` is the checkpoint it
    starts from, required by the single-teacher modes (MAE for ``mocov3_to_mae``, MoCo v3 for
    ``mae_to_mocov3``: their student is the other pre-trained model, so a missing one is an error
    rather than a silently random student) and refused by ``both_to_random`` (random init).
    ``teachers``: ``{"mocov3": spec, "mae": spec}``, each read onto :data:`TEACHER`; only the
    mode's teachers are loaded (``path`` required)."""

    mode: str = "mocov3_to_mae"
    student: BackboneSpec = STUDENT
    teachers: dict = field(default_factory=dict)
    attention: str | None = None
    checkpointing: bool = False
    target: str = "both"
    target_norm: str = "layernorm"
    projector: str = "linear"
    projector_hidden_dim: int = 2048
    loss: str = "smooth_l1"
    beta: float = 2.0
    mask_ratio: float = 0.9
    mocov3_weight: float = 1.0
    mae_weight: float = 1.0

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        self.student = backbone_spec("student", self.student, STUDENT)
        self.teachers = backbone_specs("teachers", self.teachers, {name: TEACHER for name in ("mocov3", "mae")})
        check_typed_fields(self)
        check_choice("target", self.target, ALIGN_TARGETS)
        check_choice("target_norm", self.target_norm, ALIGN_TARGET_NORMS)
        check_choice("projector", self.projector, PROJECTORS)
        check_choice("loss", self.loss, LOSSES)
        check_number("beta", self.beta, low=0.0, low_open=True)
        check_number("mask_ratio", self.mask_ratio, low=0.0, high=1.0)
        check_number("mocov3_weight", self.mocov3_weight, low=0.0)
        check_number("mae_weight", self.mae_weight, low=0.0)
        if self.mode == "both_to_random" and self.student.path is not None:
            raise ValueError("mode 'both_to_random' trains a randomly initialised student: student.path must be "
                             f"None, got {self.student.path!r}")
        if self.mode in STUDENT_INITS and self.student.path is None:
            raise ValueError(f"mode {self.mode!r} distils into a pre-trained student: student.path is required "
                             f"(the {STUDENT_INITS[self.mode]} checkpoint the student starts from), got None")


class MOMA(Method, name="moma", recipe="mae", role="distill", config=MOMAConfig):
    """MOMA on one view (recipe ``mae``). Parts, per active teacher ``t`` in (``mocov3``, ``mae``):
    ``{t}_cls`` and/or ``{t}_patch`` by ``target``; metric ``visible_tokens`` (K)."""

    def __init__(self, config: MOMAConfig):
        super().__init__(config)
        self.teacher_names = MODES[config.mode]
        self.frozen_teachers = tuple(f"{name}_teacher" for name in self.teacher_names)
        self.backbone = config.student.build(attention=config.attention, checkpointing=config.checkpointing)
        if not self.backbone.is_vit:
            raise ValueError(f"MOMA's masked student must be a ViT, got {config.student.arch!r}")
        self.projectors = nn.ModuleDict()
        for name in self.teacher_names:
            teacher = config.teachers[name].load_frozen(f"teachers.{name}", attention=config.attention)
            if not teacher.is_vit or teacher.num_patches != self.backbone.num_patches:
                raise ValueError(
                    f"the {name} teacher must be a ViT with the student's {self.backbone.num_patches} patches, got "
                    f"{teacher.name} with {teacher.num_patches}"
                )
            setattr(self, f"{name}_teacher", teacher)
            self.projectors[name] = build_projector(config.projector, self.backbone.embed_dim, teacher.embed_dim,
                                                    config.projector_hidden_dim)
        self.align = FeatureAlignLoss(target_norm=config.target_norm, loss=config.loss, beta=config.beta)
        self.num_visible = max(1, round((1.0 - config.mask_ratio) * self.backbone.num_patches))

    @property
    def student(self) -> nn.Module:
        return self.backbone

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = check_batch(batch, 1, type(self).__name__)[0]
        student_tokens, keep_idx = masked_forward(self.backbone, x, self.num_visible)
        prefix = self.backbone.num_prefix_tokens
        parts, weights = {}, {}
        for name in self.teacher_names:
            teacher = getattr(self, f"{name}_teacher")
            target = self.frozen_teacher_features(teacher, self.config.teachers[name].resize(x)).tokens
            projected = self.projectors[name](student_tokens)
            for part, value in align_parts(self.align, projected, target, keep_idx, self.config.target, prefix,
                                           teacher.num_prefix_tokens).items():
                parts[f"{name}_{part}"], weights[f"{name}_{part}"] = value, getattr(self.config, f"{name}_weight")
        return loss_dict(parts, weights, {"visible_tokens": torch.tensor(float(keep_idx.shape[1]))})
