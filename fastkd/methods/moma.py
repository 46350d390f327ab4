"""MOMA (Yao, Desai, Palaniswami 2023): distil self-supervised teachers into a heavily masked student.

Each teacher sees the whole image ``x``; the student encodes only ``K = round((1 - mask_ratio) N)``
random visible patches (``random_keep`` + the backbone's ``gather_tokens`` path). Per teacher
``t`` a projector ``P_t`` maps the student tokens to the teacher's width and::

    s = P_t(student.forward_features(x, keep=keep_idx).tokens)        # [B, 1+K, D_t]
    T = teacher_t.forward_features(x).tokens                          # [B, 1+N, D_t], no gradient
    cls_t   = FeatureAlignLoss(s[:, 0], T[:, 0])                      # target "cls" / "both"
    patch_t = FeatureAlignLoss(s[:, 1:], gather_tokens(T[:, 1:], keep_idx))   # "patch" / "both"
    loss = sum_t weight_t * (cls_t + patch_t)

with the teacher target normalised without gradient (``target_norm``) and ``loss`` smooth-L1 /
MSE / cosine (fastkd's fused ``feature_align``). Modes: ``mocov3_to_mae`` (MoCo v3 teacher,
student initialised from an MAE checkpoint), ``mae_to_mocov3`` (the reverse), ``both_to_random``
(both teachers, one projector each, randomly initialised student).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fastkd.checks import check_bool, check_choice, check_kwargs, check_number, check_str
from fastkd.data.batch import Batch
from fastkd.losses import FeatureAlignLoss
from fastkd.methods.backbones import build_student, load_frozen_teacher
from fastkd.methods.base import Method, check_batch, check_progress, loss_dict, masked_forward
from fastkd.models import LinearProjector, MLPProjector
from fastkd.ops import TARGET_NORMS as OP_TARGET_NORMS
from fastkd.ops import LOSSES, gather_tokens

MODES = {"mocov3_to_mae": ("mocov3",), "mae_to_mocov3": ("mae",), "both_to_random": ("mocov3", "mae")}
TARGETS = ("cls", "patch", "both")
TARGET_NORMS = tuple(n for n in OP_TARGET_NORMS if n != "none")  # the papers normalise the target
PROJECTORS = ("linear", "mlp")
STUDENT_INITS = {"mocov3_to_mae": "MAE", "mae_to_mocov3": "MoCo v3"}  # modes 1 and 2: the student's init


@dataclass
class MOMAConfig:
    """``student_init``: checkpoint the student starts from, required by the single-teacher modes
    (MAE for ``mocov3_to_mae``, MoCo v3 for ``mae_to_mocov3``: their student is the other
    pre-trained model, so a missing one is an error rather than a silently random student) and
    refused by ``both_to_random`` (random init). Teacher paths are read by
    ``fastkd.models.load_teacher`` (``teacher_format``)."""

    mode: str = "mocov3_to_mae"
    student_arch: str = "vit_small_patch16_224"
    student_kwargs: dict = field(default_factory=dict)
    student_init: str | None = None
    student_init_format: str = "auto"
    mocov3_teacher_arch: str = "vit_base_patch16_224"
    mocov3_teacher_kwargs: dict = field(default_factory=dict)
    mocov3_teacher_path: str | None = None
    mae_teacher_arch: str = "vit_base_patch16_224"
    mae_teacher_kwargs: dict = field(default_factory=dict)
    mae_teacher_path: str | None = None
    teacher_format: str = "auto"
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
        for name in ("student_arch", "mocov3_teacher_arch", "mae_teacher_arch", "student_init_format",
                     "teacher_format"):
            check_str(name, getattr(self, name))
        for name in ("student_init", "mocov3_teacher_path", "mae_teacher_path", "attention"):
            check_str(name, getattr(self, name), optional=True)
        for name in ("student_kwargs", "mocov3_teacher_kwargs", "mae_teacher_kwargs"):
            check_kwargs(name, getattr(self, name))
        check_bool("checkpointing", self.checkpointing)
        check_choice("target", self.target, TARGETS)
        check_choice("target_norm", self.target_norm, TARGET_NORMS)
        check_choice("projector", self.projector, PROJECTORS)
        check_number("projector_hidden_dim", self.projector_hidden_dim, low=1, integer=True)
        check_choice("loss", self.loss, LOSSES)
        check_number("beta", self.beta, low=0.0, low_open=True)
        check_number("mask_ratio", self.mask_ratio, low=0.0, high=1.0)
        check_number("mocov3_weight", self.mocov3_weight, low=0.0)
        check_number("mae_weight", self.mae_weight, low=0.0)
        if self.mode == "both_to_random" and self.student_init is not None:
            raise ValueError("mode 'both_to_random' trains a randomly initialised student: student_init must be None, "
                             f"got {self.student_init!r}")
        if self.mode in STUDENT_INITS and self.student_init is None:
            raise ValueError(f"mode {self.mode!r} distils into a pre-trained student: student_init is required "
                             f"(the {STUDENT_INITS[self.mode]} checkpoint the student starts from), got None")


class MOMA(Method):
    """MOMA on one view (recipe ``mae``). Parts, per active teacher ``t`` in (``mocov3``, ``mae``):
    ``{t}_cls`` and/or ``{t}_patch`` by ``target``; metric ``visible_tokens`` (K)."""

    recipe = "mae"
    name = "moma"
    role = "distill"
    config_class = MOMAConfig

    def __init__(self, config: MOMAConfig):
        super().__init__(config)
        self.teacher_names = MODES[config.mode]
        self.frozen_teachers = tuple(f"{name}_teacher" for name in self.teacher_names)
        self.backbone = build_student(config.student_arch, config.student_kwargs, init_path=config.student_init,
                                      init_format=config.student_init_format, attention=config.attention,
                                      checkpointing=config.checkpointing)
        if not self.backbone.is_vit:
            raise ValueError(f"MOMA's masked student must be a ViT, got {config.student_arch!r}")
        self.projectors = nn.ModuleDict()
        for name in self.teacher_names:
            teacher = load_frozen_teacher(
                f"{name}_teacher", getattr(config, f"{name}_teacher_arch"), getattr(config, f"{name}_teacher_kwargs"),
                getattr(config, f"{name}_teacher_path"), format=config.teacher_format, attention=config.attention,
            )
            if not teacher.is_vit or teacher.num_patches != self.backbone.num_patches:
                raise ValueError(
                    f"the {name} teacher must be a ViT with the student's {self.backbone.num_patches} patches, got "
                    f"{teacher.name} with {teacher.num_patches}"
                )
            setattr(self, f"{name}_teacher", teacher)
            self.projectors[name] = (
                LinearProjector(self.backbone.embed_dim, teacher.embed_dim) if config.projector == "linear"
                else MLPProjector(self.backbone.embed_dim, teacher.embed_dim, config.projector_hidden_dim)
            )
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
            target = self.frozen_teacher_features(teacher, x).tokens
            projected = self.projectors[name](student_tokens)
            weight = getattr(self.config, f"{name}_weight")
            if self.config.target in ("cls", "both"):
                parts[f"{name}_cls"] = self.align(projected[:, 0], target[:, 0])
                weights[f"{name}_cls"] = weight
            if self.config.target in ("patch", "both"):
                visible_target = gather_tokens(target[:, teacher.num_prefix_tokens:].contiguous(), keep_idx)
                parts[f"{name}_patch"] = self.align(projected[:, prefix:], visible_target)
                weights[f"{name}_patch"] = weight
        return loss_dict(parts, weights, {"visible_tokens": torch.tensor(float(keep_idx.shape[1]))})

    def after_step(self, step: int, total_steps: int, found_inf: torch.Tensor | None = None) -> None:
        """MOMA's teachers are frozen: nothing moves between steps (``found_inf`` changes nothing)."""
        check_progress(step, total_steps)
