"""Hybrid Distill (Shi et al., ICLR 2024): features of a contrastive/supervised teacher plus token
relations of a MIM teacher, with progressive redundant-token masking.

Both teachers see the whole image; the student runs on the ``K = round(keep_ratio * N)`` patches
that the feature teacher's last-block CLS attention ranks highest (``keep_ratio`` steps down over
training by ``keep_schedule``). Losses apply on the kept tokens::

    s = student.forward_features(x, keep=keep_idx, return_qk=student_layers)
    F = feature_teacher.forward_features(x).tokens                           # no gradient
    feature_cls   = FeatureAlignLoss(P(s.tokens)[:, 0],  F[:, 0])
    feature_patch = FeatureAlignLoss(P(s.tokens)[:, 1:], gather_tokens(F[:, 1:], keep_idx))
    relation = mean over (l_s, l_t) in relation_layers of
               TokenRelationLoss(*s.qk[l_s], *kept(relation_teacher.qk[l_t]))  # KL of softmax(q k^T scale)
    loss = alpha * (feature_cls + feature_patch) + beta * relation

``kept`` selects the teacher's ``q, k`` rows of the CLS token and the kept patches; no ``N x N``
map is materialised (the streaming ``token_relation`` op). Teachers as published: a supervised
(``deit`` format) or contrastive (CLIP: ``clip``; MoCo v3 loads too) feature teacher, an MAE
relation teacher. A feature teacher of another patch size than the student (CLIP ViT-L/14 for a
ViT-L/16 student) sees the image resized to ``teachers.feature.input_size``: one patch grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from fastkd.checks import check_choice, check_number, check_positive_ints, check_shape
from fastkd.data.batch import Batch
from fastkd.losses import FeatureAlignLoss, TokenRelationLoss
from fastkd.methods.backbones import BackboneSpec, backbone_spec, backbone_specs
from fastkd.methods.base import (ALIGN_TARGET_NORMS, ALIGN_TARGETS, PROJECTORS, Method, align_parts, build_projector,
                                 check_batch, check_typed_fields, loss_dict)
from fastkd.ops import DIRECTIONS, LOSSES, topk_keep

SCORE_TEACHERS = ("feature", "relation")
LAYER_PRESETS = ("intermediate", "last")  # relation_layers given by name instead of block pairs
INTERMEDIATE_FRACTIONS = (0.25, 0.5, 0.75)  # student blocks of the "intermediate" preset, as depth fractions


def intermediate_layer_pairs(student_depth: int, teacher_depth: int,
                             fractions: tuple[float, ...] = INTERMEDIATE_FRACTIONS) -> list[list[int]]:
    """``[student_block, teacher_block]`` pairs of the ``intermediate`` preset: student block
    ``s = ceil(f * D_s) - 1`` for each depth fraction ``f`` (0-based; ViT-B, depth 12: blocks 2, 5, 8),
    paired with the teacher block at the same relative depth, ``t = ceil((s + 1) * D_t / D_s) - 1``.
    Duplicates (shallow students) are dropped. The paper distils relations "at intermediate layers"
    without a list we could confirm: these three blocks are chosen here."""
    check_positive_ints(student_depth=student_depth, teacher_depth=teacher_depth)
    pairs = []
    for fraction in fractions:
        s = max(0, math.ceil(fraction * student_depth) - 1)
        t = max(0, math.ceil((s + 1) * teacher_depth / student_depth) - 1)
        if [s, t] not in pairs:
            pairs.append([s, t])
    return pairs


def cls_attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix_tokens: int = 1) -> torch.Tensor:
    """How much the CLS token attends to each patch, ``[B, N]`` for ``q, k [B, H, P+N, d]``::

        softmax(q[:, :, 0:1] @ k.transpose(-2, -1) * scale, dim=-1)[:, :, 0, P:].mean(dim=1)

    Only the CLS row is computed (``[B, H, P+N]``), never the ``(P+N) x (P+N)`` map."""
    check_shape("q", q, ("B", "H", "N", "d"))
    check_shape("k", k, tuple(q.shape))
    check_number("num_prefix_tokens", num_prefix_tokens, low=1, high=q.shape[2], high_open=True, integer=True)
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), k.float()) * scale
    return logits.softmax(dim=-1)[:, :, num_prefix_tokens:].mean(dim=1)


def _layer_pairs_or_preset(pairs) -> list[list[int]] | str:
    """``pairs`` as a list of ``[student_block, teacher_block]`` int pairs, or a preset name of
    :data:`LAYER_PRESETS` unchanged."""
    if isinstance(pairs, str):
        check_choice("relation_layers", pairs, LAYER_PRESETS)
        return pairs
    if not (isinstance(pairs, (list, tuple)) and pairs and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(type(i) is int for i in p) for p in pairs)):
        raise TypeError(f"relation_layers must be one of {LAYER_PRESETS} or a non-empty list of [student_block, "
                        f"teacher_block] int pairs, got {pairs!r}")
    return [list(p) for p in pairs]


def _keep_stages(schedule) -> list[list[float]]:
    """``keep_schedule`` checked: ``[start_fraction, keep_ratio]`` stages from fraction 0.0 on, with
    increasing start fractions and non-increasing keep ratios."""
    if not (isinstance(schedule, (list, tuple)) and all(isinstance(s, (list, tuple)) and len(s) == 2
                                                        for s in schedule)):
        raise TypeError(f"keep_schedule must be a list of [start_fraction, keep_ratio] stages, got {schedule!r}")
    for start, ratio in schedule:
        check_number("keep_schedule start_fraction", start, low=0.0, high=1.0)
        check_number("keep_schedule keep_ratio", ratio, low=0.0, high=1.0, low_open=True)
    stages = [[float(start), float(ratio)] for start, ratio in schedule]
    steps = zip(stages, stages[1:])
    if not stages or stages[0][0] != 0.0 or any(s1 <= s0 or r1 > r0 for (s0, r0), (s1, r1) in steps):
        raise ValueError(f"keep_schedule must start with a stage at fraction 0.0, with increasing start fractions "
                         f"and non-increasing keep ratios, got {schedule!r}")
    return stages


@dataclass
class HybridDistillConfig:
    """``keep_schedule``: stages ``[start_fraction_of_training, keep_ratio]`` (default, an unconfirmed
    choice: all tokens for the first 30%, then 85%, from 60% on 70%). ``relation_layers``:
    ``[student_block, teacher_block]`` pairs (negative: from the end), ``"intermediate"``
    (:func:`intermediate_layer_pairs`) or ``"last"``. ``mask_score_teacher``: whose last-block CLS
    attention ranks the tokens. ``student``: the ViT student (``path``: optional initial weights);
    ``teachers``: ``{"feature": spec, "relation": spec}`` (``path`` required); the feature teacher's
    ``input_size`` resizes the image for it alone, the relation teacher sees the student's input."""

    student: BackboneSpec = BackboneSpec()
    teachers: dict = field(default_factory=dict)
    attention: str | None = None
    checkpointing: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    feature_target: str = "both"
    target_norm: str = "layernorm"
    feature_loss: str = "smooth_l1"
    smooth_l1_beta: float = 2.0
    projector: str = "linear"
    projector_hidden_dim: int = 2048
    relation_layers: list | str = "intermediate"
    relation_temperature: float = 1.0
    relation_direction: str = "teacher_to_student"
    head_map: str | None = None
    keep_schedule: list = field(default_factory=lambda: [[0.0, 1.0], [0.3, 0.85], [0.6, 0.7]])
    mask_score_teacher: str = "feature"

    def __post_init__(self):
        self.student = backbone_spec("student", self.student, BackboneSpec())
        self.teachers = backbone_specs("teachers", self.teachers, {"feature": BackboneSpec(), "relation": BackboneSpec()})
        if self.teachers["relation"].input_size is not None:
            raise ValueError("teachers.relation.input_size must be None: the relation teacher's tokens are "
                             "matched to the student's, so it sees the student's input")
        check_typed_fields(self)
        check_number("alpha", self.alpha, low=0.0)
        check_number("beta", self.beta, low=0.0)
        check_choice("feature_target", self.feature_target, ALIGN_TARGETS)
        check_choice("target_norm", self.target_norm, ALIGN_TARGET_NORMS)
        check_choice("feature_loss", self.feature_loss, LOSSES)
        check_number("smooth_l1_beta", self.smooth_l1_beta, low=0.0, low_open=True)
        check_choice("projector", self.projector, PROJECTORS)
        self.relation_layers = _layer_pairs_or_preset(self.relation_layers)
        check_number("relation_temperature", self.relation_temperature, low=0.0, low_open=True)
        check_choice("relation_direction", self.relation_direction, DIRECTIONS)
        check_choice("head_map", self.head_map, (None, "mean"))
        self.keep_schedule = _keep_stages(self.keep_schedule)
        check_choice("mask_score_teacher", self.mask_score_teacher, SCORE_TEACHERS)


class HybridDistill(Method, name="hybrid_distill", recipe="mae", role="distill",
                   config=HybridDistillConfig):
    """Hybrid Distill on one view (recipe ``mae``). Parts ``feature_cls`` / ``feature_patch`` (by
    ``feature_target``, weight ``alpha``) and ``relation`` (weight ``beta``); metric ``kept_tokens``."""

    frozen_teachers = ("feature_teacher", "relation_teacher")

    def __init__(self, config: HybridDistillConfig):
        super().__init__(config)
        self.backbone = config.student.build(attention=config.attention, checkpointing=config.checkpointing)
        for role in ("feature", "relation"):
            setattr(self, f"{role}_teacher", config.teachers[role].load_frozen(f"teachers.{role}",
                                                                               attention=config.attention))
        student, relation_teacher = self.backbone, self.relation_teacher
        for name, model in (("student", student), ("feature teacher", self.feature_teacher),
                            ("relation teacher", relation_teacher)):
            prefix = student.num_prefix_tokens if model is relation_teacher else model.num_prefix_tokens
            if not model.is_vit or model.num_patches != student.num_patches or model.num_prefix_tokens != prefix:
                raise ValueError(f"the {name} must be a ViT with {student.num_patches} patches (the relation teacher "
                                 f"with the student's {student.num_prefix_tokens} prefix tokens), got {model.name} "
                                 f"with {model.num_patches} patches and {model.num_prefix_tokens} prefix tokens")
        self._check_feature_teacher_size(config.teachers["feature"].input_size)
        layers = config.relation_layers
        if isinstance(layers, str):
            layers = intermediate_layer_pairs(student.depth, relation_teacher.depth) \
                if layers == "intermediate" else [[-1, -1]]
        self.layer_pairs = [(self._block(student, s, "student"), self._block(relation_teacher, t, "relation teacher"))
                            for s, t in layers]
        self.projector = build_projector(config.projector, student.embed_dim, self.feature_teacher.embed_dim,
                                         config.projector_hidden_dim)
        self.feature_align = FeatureAlignLoss(target_norm=config.target_norm, loss=config.feature_loss,
                                              beta=config.smooth_l1_beta)
        self.relation = TokenRelationLoss(temperature=config.relation_temperature,
                                          direction=config.relation_direction, head_map=config.head_map)
        self.keep_stages = [tuple(stage) for stage in config.keep_schedule]
        self.register_buffer("keep_ratio", torch.tensor(self.keep_stages[0][1], dtype=torch.float64))
        # the kept-token count as a host int (the buffer is what checkpoints hold): a compiled forward
        # reads it without a device read, as one dynamic size across the keep-ratio stages
        self.kept_patches = self.num_kept(self.keep_stages[0][1])
        self.register_load_state_dict_post_hook(
            lambda module, _: setattr(module, "kept_patches", module.num_kept(float(module.keep_ratio))))

    def _check_feature_teacher_size(self, size: int | None) -> None:
        """The feature teacher must be built for the size it is fed: ``size`` or else the student's."""
        teacher, student = self.feature_teacher.model, self.backbone.model
        fed = (size, size) if size is not None else getattr(student.patch_embed, "img_size", None)
        built = getattr(teacher.patch_embed, "img_size", None)
        if getattr(teacher, "dynamic_img_size", False) or fed is None or built is None or tuple(built) == tuple(fed):
            return
        raise ValueError(f"teachers.feature.input_size={size} but the feature teacher is built for {tuple(built)} "
                         f"px: give teachers.feature.kwargs img_size: {size}" if size is not None else
                         f"the feature teacher is built for {tuple(built)} px images but would see the student's "
                         f"{tuple(fed)} px: set teachers.feature.input_size: {built[0]} (its patch grid must match "
                         "the student's)")

    @staticmethod
    def _block(model, index: int, name: str) -> int:
        if not -model.depth <= index < model.depth:
            raise ValueError(f"relation_layers: block {index} out of range for the {name} of depth {model.depth}")
        return index % model.depth

    @property
    def student(self) -> nn.Module:
        return self.backbone

    def keep_ratio_at(self, step: int, total_steps: int) -> float:
        """The keep ratio of the schedule stage containing ``step / total_steps``."""
        fraction = step / total_steps
        return [ratio for start, ratio in self.keep_stages if start <= fraction][-1]

    def num_kept(self, keep_ratio: float | None = None) -> int:
        """Patches the student keeps: ``max(1, round(keep_ratio * num_patches))``; without
        ``keep_ratio``, those of the current stage."""
        if keep_ratio is None:
            return self.kept_patches
        return max(1, round(keep_ratio * self.backbone.num_patches))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = check_batch(batch, 1, type(self).__name__)[0]
        B, N = x.shape[0], self.backbone.num_patches
        score_teacher = self.feature_teacher if self.config.mask_score_teacher == "feature" else self.relation_teacher
        last = score_teacher.depth - 1
        relation_blocks = {t for _, t in self.layer_pairs}
        x_feat = self.config.teachers["feature"].resize(x)
        feat = self.frozen_teacher_features(self.feature_teacher, x_feat, return_qk=(last,) if score_teacher is
                                            self.feature_teacher else ())
        rel = self.frozen_teacher_features(
            self.relation_teacher, x,
            return_qk=relation_blocks | ({last} if score_teacher is self.relation_teacher else set()))
        with torch.no_grad():
            K = self.num_kept()
            if K < N:
                scored = feat if score_teacher is self.feature_teacher else rel
                q, k = scored.qk[last]
                scores = cls_attention_scores(q, k, score_teacher.model.blocks[last].attn.scale,
                                              score_teacher.num_prefix_tokens)
                keep_idx = topk_keep(scores, K)
            else:
                keep_idx = torch.arange(N, device=x.device).expand(B, N)
        s = self.backbone.forward_features(x, keep=keep_idx if K < N else None,
                                           return_qk={ls for ls, _ in self.layer_pairs})
        prefix_s = self.backbone.num_prefix_tokens
        parts = {f"feature_{part}": value for part, value in align_parts(
            self.feature_align, self.projector(s.tokens), feat.tokens, keep_idx, self.config.feature_target,
            prefix_s, self.feature_teacher.num_prefix_tokens).items()}
        weights = {name: self.config.alpha for name in parts}
        rows = torch.cat([torch.arange(prefix_s, device=x.device).expand(B, prefix_s), keep_idx + prefix_s], dim=1)
        relation = 0.0
        for ls, lt in self.layer_pairs:
            q_t, k_t = (self._rows(t, rows) for t in rel.qk[lt])
            relation = relation + self.relation(*s.qk[ls], q_t, k_t)
        parts["relation"] = relation / len(self.layer_pairs)
        weights["relation"] = self.config.beta
        return loss_dict(parts, weights, {"kept_tokens": torch.tensor(float(keep_idx.shape[1]))})

    @staticmethod
    def _rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``t[b, :, rows[b]]`` for ``t [B, H, N, d]``, ``rows [B, M]`` -> ``[B, H, M, d]``."""
        index = rows[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
        return torch.gather(t, 2, index)

    def after_step(self, step: int, total_steps: int, found_inf: torch.Tensor | None = None) -> None:
        """Moves the keep ratio to the schedule stage of the next step, ``step + 1`` (a function of the
        step number, so it moves on a skipped step too: ``found_inf`` changes nothing)."""
        ratio = self.keep_ratio_at(min(step + 1, total_steps), total_steps)
        self.keep_ratio.fill_(ratio)
        self.kept_patches = self.num_kept(ratio)
