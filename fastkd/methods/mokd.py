"""MOKD (Song et al., CVPR 2023): two different models trained together from scratch, each with
its own EMA teacher, DINO head and T-head, distilling into each other.

Views: DINO multi-crop, ``num_global_views`` global crops first (the teachers see only those),
then local crops. For model ``X`` with the other model ``Y`` (``S`` = student outputs on every
crop, ``T`` = EMA-teacher outputs on the global crops, all DINO losses of ``fastkd.losses.DINOLoss``
with their own centre)::

    self_mlp     = DINO(S_X.dino,  T_X.dino)                    # DINO head on pooled feature / CLS
    self_thead   = DINO(S_X.thead, T_X.thead)                   # T-head on patch tokens / feature map
    cross_mlp    = DINO(S_X.dino,  T_Y.dino)                    # the other model's teacher, detached
    cross_search = mean_{local v} CE(softmax(T_Y.thead(T_Y.patches[0], query=sg[S_X.embed[v]]) / tau_t),
                                     log_softmax(S_X.thead[v] / tau_s))       # no centring
    total_X = self_mlp + self_thead + lambda_X * (cross_mlp + cross_search)
    loss = total_a + total_b

``DINO`` averages over (teacher crop i, student crop v) pairs with ``v != i`` (DINO's rule, kept
for the cross term too). ``S_X.embed[v]`` is X's T-head embedding (``THead.embed``, dim
``thead_dim``) of local crop ``v``, used as a query token prepended to Y's teacher patch tokens of
global view 1 (cross-attention feature search). Nothing carries a gradient from one model into
the other: every cross term uses the other model's teacher (no gradient) and a detached query.
``after_step`` moves both teachers with ``ema_`` (momentum ``0.996 -> 1``, cosine) and the teacher
temperature (``0.04 -> 0.07``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.checks import check_bool, check_choice, check_kwargs, check_number, check_str
from fastkd.data.batch import Batch
from fastkd.losses.dino import DINOLoss
from fastkd.methods.base import Method, check_batch, check_progress, grouped_parameters, loss_dict
from fastkd.models import DINOHead, EMATeacher, THead, build_backbone, momentum_schedule

MODELS = ("a", "b")
SELF_TERMS = ("self_mlp", "self_thead")
CROSS_TERMS = ("cross_mlp", "cross_search")


@dataclass
class MOKDConfig:
    """``lambda_a`` / ``lambda_b`` weight each model's cross terms (0.1 for the stronger model, 1.0
    for the weaker); ``evaluate`` names the model that ``.student`` returns."""

    model_a_arch: str = "resnet50"
    model_a_kwargs: dict = field(default_factory=dict)
    model_b_arch: str = "vit_small_patch16_224"
    model_b_kwargs: dict = field(default_factory=dict)
    attention: str | None = None
    checkpointing: bool = False
    out_dim: int = 65536
    dino_hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    thead_dim: int = 384
    thead_depth: int = 3
    thead_heads: int = 6
    lambda_a: float = 1.0
    lambda_b: float = 0.1
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_fraction: float = 0.3
    center_momentum: float = 0.9
    base_momentum: float = 0.996
    num_global_views: int = 2
    evaluate: str = "b"
    freeze_last_layer_epochs: float = 1.0

    def __post_init__(self):
        for name in ("model_a_arch", "model_b_arch"):
            check_str(name, getattr(self, name))
        for name in ("model_a_kwargs", "model_b_kwargs"):
            check_kwargs(name, getattr(self, name))
        check_str("attention", self.attention, optional=True)
        check_bool("checkpointing", self.checkpointing)
        check_bool("norm_last_layer", self.norm_last_layer)
        for name in ("out_dim", "dino_hidden_dim", "bottleneck_dim", "thead_dim", "thead_depth", "thead_heads",
                     "num_global_views"):
            check_number(name, getattr(self, name), low=1, integer=True)
        for name in ("lambda_a", "lambda_b"):
            check_number(name, getattr(self, name), low=0.0)
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            check_number(name, getattr(self, name), low=0.0, low_open=True)
        for name in ("warmup_fraction", "center_momentum", "base_momentum"):
            check_number(name, getattr(self, name), low=0.0, high=1.0)
        check_choice("evaluate", self.evaluate, MODELS)
        check_number("freeze_last_layer_epochs", self.freeze_last_layer_epochs, low=0.0)


class MOKDBranch(nn.Module):
    """One model of the pair: backbone, DINO head on its global feature, T-head on its patch
    tokens (ViT) or last-stage map (ResNet)."""

    def __init__(self, backbone: nn.Module, config: MOKDConfig):
        super().__init__()
        self.backbone = backbone
        self.dino_head = DINOHead(backbone.embed_dim, config.out_dim, config.dino_hidden_dim, config.bottleneck_dim,
                                  norm_last_layer=config.norm_last_layer)
        self.thead = THead(backbone.embed_dim, config.out_dim, config.thead_dim, config.thead_depth,
                           config.thead_heads, input="tokens" if backbone.is_vit else "feature_map",
                           norm_last_layer=config.norm_last_layer, attention=config.attention)

    def forward(self, crops: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Per crop: ``dino`` logits, T-head ``embed`` and ``thead`` logits, and the ``patches`` the
        T-head read. Crops of one resolution go through the backbone together (as in DINO)."""
        out = {key: [None] * len(crops) for key in ("dino", "embed", "thead", "patches")}
        groups: dict[tuple, list[int]] = {}
        for i, crop in enumerate(crops):
            groups.setdefault(tuple(crop.shape[1:]), []).append(i)
        for indices in groups.values():
            features = self.backbone.forward_features(torch.cat([crops[i] for i in indices]))
            if self.backbone.is_vit:
                pooled, patches = features.tokens[:, 0], features.tokens[:, self.backbone.num_prefix_tokens:]
            else:
                pooled, patches = features.pooled, features.feature_map
            embed = self.thead.embed(patches)
            values = {
                "dino": self.dino_head(pooled),
                "embed": embed,
                "thead": self.thead.last_layer(F.normalize(embed, dim=-1)),
                "patches": patches,
            }
            for key, value in values.items():
                for i, chunk in zip(indices, value.chunk(len(indices))):
                    out[key][i] = chunk
        return out


class MOKD(Method):
    """MOKD on DINO multi-crop views (recipe ``dino_multicrop``). Parts, for ``X`` in (``a``, ``b``):
    ``X_self_mlp``, ``X_self_thead`` (weight 1), ``X_cross_mlp``, ``X_cross_search`` (weight ``lambda_X``)."""

    recipe = "dino_multicrop"
    role = "distill"
    config_class = MOKDConfig

    def __init__(self, config: MOKDConfig):
        super().__init__(config)
        self.branches = nn.ModuleDict()
        self.teachers = nn.ModuleDict()
        self.losses = nn.ModuleDict()
        for x in MODELS:
            backbone = build_backbone(getattr(config, f"model_{x}_arch"), attention=config.attention,
                                      checkpointing=config.checkpointing, **getattr(config, f"model_{x}_kwargs"))
            self.branches[x] = MOKDBranch(backbone, config)
            self.teachers[x] = EMATeacher(self.branches[x])
            dino = dict(student_temp=config.student_temp, teacher_temp=config.teacher_temp,
                        warmup_teacher_temp=config.warmup_teacher_temp, warmup_fraction=config.warmup_fraction,
                        center_momentum=config.center_momentum)
            self.losses[x] = nn.ModuleDict({
                "self_mlp": DINOLoss(config.out_dim, **dino),
                "self_thead": DINOLoss(config.out_dim, **dino),
                "cross_mlp": DINOLoss(config.out_dim, **dino),
                "cross_search": DINOLoss(config.out_dim, centering=False, skip_same_view=False, **dino),
            })

    @property
    def student(self) -> nn.Module:
        return self.branches[self.config.evaluate].backbone

    @property
    def students(self) -> dict[str, nn.Module]:
        """Both trained backbones, by model name."""
        return {x: self.branches[x].backbone for x in MODELS}

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        G = self.config.num_global_views
        views = check_batch(batch, G + 1, type(self).__name__)
        student = {x: self.branches[x](views) for x in MODELS}
        with torch.no_grad():
            teacher = {x: self.teachers[x].module(views[:G]) for x in MODELS}
        parts, weights = {}, {}
        for x, y in (("a", "b"), ("b", "a")):
            losses, s = self.losses[x], student[x]
            parts[f"{x}_self_mlp"] = losses["self_mlp"](s["dino"], teacher[x]["dino"])
            parts[f"{x}_self_thead"] = losses["self_thead"](s["thead"], teacher[x]["thead"])
            parts[f"{x}_cross_mlp"] = losses["cross_mlp"](s["dino"], teacher[y]["dino"])
            local = range(G, len(views))
            with torch.no_grad():  # all local queries in one pass over Y's teacher T-head
                patches = teacher[y]["patches"][0]
                patches = patches.repeat(len(local), *([1] * (patches.dim() - 1)))
                queries = torch.cat([s["embed"][v] for v in local]).detach()
                targets = self.teachers[y].module.thead(patches, query=queries).chunk(len(local))
            search = [losses["cross_search"]([s["thead"][v]], [t]) for v, t in zip(local, targets)]
            parts[f"{x}_cross_search"] = sum(search) / len(search)
            lam = getattr(self.config, f"lambda_{x}")
            weights.update({f"{x}_{t}": 1.0 for t in SELF_TERMS})
            weights.update({f"{x}_{t}": lam for t in CROSS_TERMS})
        return loss_dict(parts, weights)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Per model, decay / no-decay groups (biases and norm weights undecayed), each tagged with
        ``"model": "a" | "b"`` so a trainer can give the two models their own optimiser/schedule."""
        check_number("weight_decay", weight_decay, low=0.0)
        groups = []
        for x in MODELS:
            for group in grouped_parameters(self.branches[x].named_parameters(), weight_decay, prefix=f"{x}/"):
                groups.append({**group, "model": x})
        return groups

    @torch.no_grad()
    def before_optimizer_step(self, epoch: float) -> None:
        """DINO's stabiliser: during the first ``freeze_last_layer_epochs`` epochs the weight-normed
        last layers of both models' DINO heads and T-heads get no update (their gradients are
        dropped after clipping, so the optimiser skips them, weight decay included)."""
        if epoch < self.config.freeze_last_layer_epochs:
            for branch in self.branches.values():
                branch.dino_head.cancel_last_layer_grad()
                branch.thead.cancel_last_layer_grad()

    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update of both teachers; the teacher temperature moves to that of ``step + 1``."""
        check_progress(step, total_steps)
        momentum = momentum_schedule(step, total_steps, self.config.base_momentum)
        for x in MODELS:
            self.teachers[x].update(momentum)
            for loss in self.losses[x].values():
                loss.set_progress(step + 1, total_steps)
