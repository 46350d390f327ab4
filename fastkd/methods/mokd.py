"""MOKD (Song et al., CVPR 2023): two different models trained together from scratch, each with
its own EMA teacher, DINO head and T-head, distilling into each other. Defaults follow the official
code (github.com/skyoux/mokd) with its README's ResNet-50 / ViT-S recipe.

Views: DINO multi-crop, ``num_global_views`` global crops first (the teachers see only those), then
local crops. For model ``X`` and the other model ``Y`` (``S`` = student outputs on every crop, ``T``
= EMA-teacher outputs on the global crops; each DINO loss is a ``fastkd.losses.DINOLoss`` with its
own centre)::

    self_mlp     = DINO(S_X.dino,  T_X.dino)                    # DINO head on pooled feature / CLS
    self_thead   = DINO(S_X.thead, T_X.thead)                   # T-head on patch tokens / feature map
    cross_mlp    = DINO(S_X.dino,  T_Y.dino)                    # the other model's teacher, detached
    cross_search = mean_{local v} CE(softmax(T_Y.thead(T_Y.patches[0], query=sg[q_X[v]]) / tau_t),
                                     log_softmax(S_X.thead[v] / tau_s))       # no centring
    total_X = self_mlp + self_thead + lambda_X * (cross_mlp + cross_search)
    loss = total_a + total_b

``DINO`` averages over (teacher crop i, student crop v) pairs with ``v != i``. T-head
(``fastkd.models.THead``): adapter to ``thead_dim``, + a learnable positional embedding (resized for
local crops), ``thead_depth`` blocks, mean over tokens, weight-normalised last layer. The search
query ``q_X[v]`` of local crop ``v`` is X's student CLS token through X's T-head adapter (ViT) or
the average-pooled output of X's T-head 1x1 conv (ResNet), prepended to Y's teacher patch tokens of
global view 0. No gradient crosses from one model into the other.

``after_step`` moves both teachers by EMA (momentum ``0.996 -> 1``, cosine) and the teacher
temperatures (``0.04 -> 0.07``, linear over a per-term fraction of training, see :class:`MOKDConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fastkd.checks import check_choice, check_number, check_str
from fastkd.data.batch import Batch
from fastkd.losses.dino import DINOLoss
from fastkd.method_protocol import grouped_parameters
from fastkd.methods.backbones import TRAINED_KEYS, BackboneSpec, backbone_specs
from fastkd.methods.base import Method, check_batch, check_typed_fields, loss_dict
from fastkd.models import DINOHead, EMATeacher, THead, momentum_schedule
from fastkd.models.backbone import POS_EMBED_RESIZES

MODELS = ("a", "b")
SELF_TERMS = ("self_mlp", "self_thead")
CROSS_TERMS = ("cross_mlp", "cross_search")
MODEL_DEFAULTS = {"a": BackboneSpec("resnet50"), "b": BackboneSpec("vit_small_patch16_224")}
RESNET_POS_GRID = 224 // 32  # the official featuremap_size = input_size // 32 for the CNN's T-head


@dataclass
class MOKDConfig:
    """``lambda_a`` / ``lambda_b`` weight each model's cross terms (official: 1.0 for the CNN, 0.1 for
    the ViT); ``evaluate`` names the model that ``.student`` returns. Official values by default:
    ``norm_last_layer_a`` / ``_b`` freeze the weight-norm gain of model a's / b's DINO head,
    ``thead_norm_last_layer`` that of both T-heads; ``thead_pos_embed``: the T-heads' learnable
    positional embedding on a ``thead_pos_grid_a`` / ``_b`` grid (``None``: a ViT's patch grid, a
    ResNet's ``224 // 32 = 7``). Teacher temperature ``warmup_teacher_temp -> teacher_temp`` linearly
    over ``warmup_fraction_self_a`` / ``_b`` (``self_*`` terms) and ``warmup_fraction_cross_a`` /
    ``_b`` (``cross_*`` terms) of training: the official 50 (CNN self terms) and 30 of 100 epochs.

    ``thead_tag_a`` / ``_b``: the ``"model"`` tag of each T-head's parameter groups (the official
    code trains the CNN's T-head with the ViT's schedules: ``a_thead`` gets its own
    ``optim.per_model.a_thead``; ``"a"``: with the rest of model a). ``thead_a_decay_all``: every
    parameter of model a's T-head is decayed, biases and norms included (the official
    ``get_params_groups2``); elsewhere biases and norm weights are not. ``pos_embed_resize``: how a
    ViT's position embedding meets the local crops' grid, ``dino`` (bicubic by scale factor) or
    ``timm`` (antialiased); see :class:`fastkd.models.Backbone`."""

    models: dict = field(default_factory=dict)
    attention: str | None = None
    checkpointing: bool = False
    out_dim: int = 65536
    dino_hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer_a: bool = True
    norm_last_layer_b: bool = False
    thead_norm_last_layer: bool = False
    thead_dim: int = 384
    thead_depth: int = 3
    thead_heads: int = 6
    thead_pos_embed: bool = True
    thead_pos_grid_a: int | None = None
    thead_pos_grid_b: int | None = None
    thead_tag_a: str = "a_thead"
    thead_tag_b: str = "b"
    thead_a_decay_all: bool = True
    pos_embed_resize: str = "dino"
    lambda_a: float = 1.0
    lambda_b: float = 0.1
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_fraction_self_a: float = 0.5
    warmup_fraction_self_b: float = 0.3
    warmup_fraction_cross_a: float = 0.3
    warmup_fraction_cross_b: float = 0.3
    center_momentum: float = 0.9
    base_momentum: float = 0.996
    num_global_views: int = 2
    evaluate: str = "b"
    freeze_last_layer_epochs: float = 1.0

    def __post_init__(self):
        self.models = backbone_specs("models", self.models, MODEL_DEFAULTS, TRAINED_KEYS)
        check_typed_fields(self)
        for name in ("thead_tag_a", "thead_tag_b"):
            check_str(name, getattr(self, name))
        for name in ("lambda_a", "lambda_b", "freeze_last_layer_epochs"):
            check_number(name, getattr(self, name), low=0.0)
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            check_number(name, getattr(self, name), low=0.0, low_open=True)
        for name in ("warmup_fraction_self_a", "warmup_fraction_self_b", "warmup_fraction_cross_a",
                     "warmup_fraction_cross_b", "center_momentum", "base_momentum"):
            check_number(name, getattr(self, name), low=0.0, high=1.0)
        check_choice("evaluate", self.evaluate, MODELS)
        check_choice("pos_embed_resize", self.pos_embed_resize, POS_EMBED_RESIZES)

    def warmup_fraction_of(self, x: str, term: str) -> float:
        """The teacher-temperature warm-up fraction of model ``x``'s ``term``."""
        kind = "self" if term in SELF_TERMS else "cross"
        return getattr(self, f"warmup_fraction_{kind}_{x}")


class MOKDBranch(nn.Module):
    """One model of the pair: backbone, DINO head on its global feature, T-head on its patch
    tokens (ViT) or last-stage map (ResNet)."""

    def __init__(self, backbone: nn.Module, config: MOKDConfig, name: str = "a"):
        super().__init__()
        check_choice("name", name, MODELS)
        self.backbone = backbone
        self.dino_head = DINOHead(backbone.embed_dim, config.out_dim, config.dino_hidden_dim, config.bottleneck_dim,
                                  norm_last_layer=getattr(config, f"norm_last_layer_{name}"))
        pos_grid = None
        if config.thead_pos_embed:
            pos_grid = getattr(config, f"thead_pos_grid_{name}")
            if pos_grid is None:
                pos_grid = tuple(backbone.model.patch_embed.grid_size) if backbone.is_vit else RESNET_POS_GRID
        self.thead = THead(backbone.embed_dim, config.out_dim, config.thead_dim, config.thead_depth,
                           config.thead_heads, input="tokens" if backbone.is_vit else "feature_map",
                           norm_last_layer=config.thead_norm_last_layer,
                           pos_grid=pos_grid, attention=config.attention)

    def grid(self, crop: torch.Tensor) -> tuple[int, int] | None:
        """The patch grid of a ViT on ``crop`` (``None`` for a ResNet: its map has the shape)."""
        if not self.backbone.is_vit:
            return None
        return crop.shape[-2] // self.backbone.patch_size, crop.shape[-1] // self.backbone.patch_size

    def forward(self, crops: list[torch.Tensor]) -> dict[str, list]:
        """Per crop: ``dino`` logits, T-head ``embed`` and ``thead`` logits, the search ``query``
        (``[B, thead_dim]``, see the module doc), the ``patches`` the T-head read and their ``grid``.
        Crops of one resolution go through the backbone together (as in DINO)."""
        out = {key: [None] * len(crops) for key in ("dino", "embed", "thead", "query", "patches", "grid")}
        groups: dict[tuple, list[int]] = {}
        for i, crop in enumerate(crops):
            groups.setdefault(tuple(crop.shape[1:]), []).append(i)
        for indices in groups.values():
            batch = torch.cat([crops[i] for i in indices])
            features = self.backbone.forward_features(batch)
            grid = self.grid(batch)
            if self.backbone.is_vit:
                pooled, patches = features.tokens[:, 0], features.tokens[:, self.backbone.num_prefix_tokens:]
            else:
                pooled, patches = features.pooled, features.feature_map
            embed, input_mean = self.thead.embed(patches, grid=grid, return_input_mean=True)
            query = self.thead.project(pooled) if self.backbone.is_vit else input_mean
            values = {
                "dino": self.dino_head(pooled),
                "embed": embed,
                "thead": self.thead.logits(embed),
                "query": query,
                "patches": patches,
            }
            for key, value in values.items():
                for i, chunk in zip(indices, value.chunk(len(indices))):
                    out[key][i] = chunk
            for i in indices:
                out["grid"][i] = grid
        return out


class MOKD(Method, name="mokd", recipe="dino_multicrop", role="distill", config=MOKDConfig):
    """MOKD on DINO multi-crop views (recipe ``dino_multicrop``). Parts, for ``X`` in (``a``, ``b``):
    ``X_self_mlp``, ``X_self_thead`` (weight 1), ``X_cross_mlp``, ``X_cross_search`` (weight ``lambda_X``)."""

    def __init__(self, config: MOKDConfig):
        super().__init__(config)
        self.branches = nn.ModuleDict()
        self.teachers = nn.ModuleDict()
        self.losses = nn.ModuleDict()
        for x in MODELS:
            backbone = config.models[x].build(attention=config.attention, checkpointing=config.checkpointing)
            backbone.pos_embed_resize = config.pos_embed_resize
            self.branches[x] = MOKDBranch(backbone, config, x)
            self.teachers[x] = EMATeacher(self.branches[x])
            dino = dict(student_temp=config.student_temp, teacher_temp=config.teacher_temp,
                        warmup_teacher_temp=config.warmup_teacher_temp, center_momentum=config.center_momentum)
            self.losses[x] = nn.ModuleDict({
                term: DINOLoss(config.out_dim, warmup_fraction=config.warmup_fraction_of(x, term), **dino,
                               **(dict(centering=False, skip_same_view=False) if term == "cross_search" else {}))
                for term in SELF_TERMS + CROSS_TERMS
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
                queries = torch.cat([s["query"][v] for v in local]).detach()
                targets = self.teachers[y].module.thead(patches, query=queries,
                                                        grid=teacher[y]["grid"][0]).chunk(len(local))
            search = [losses["cross_search"]([s["thead"][v]], [t]) for v, t in zip(local, targets)]
            parts[f"{x}_cross_search"] = sum(search) / len(search)
            lam = getattr(self.config, f"lambda_{x}")
            weights.update({f"{x}_{t}": 1.0 for t in SELF_TERMS})
            weights.update({f"{x}_{t}": lam for t in CROSS_TERMS})
        return loss_dict(parts, weights)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Per model, decay / no-decay groups (biases and norm weights undecayed but with
        ``thead_a_decay_all``) tagged ``"model": "a" | "b"``, each T-head's ``thead_tag_a`` /
        ``thead_tag_b``: a trainer can give each tag its own optimiser and schedules."""
        groups = []
        for x in MODELS:
            branch = self.branches[x]
            thead_ids = {id(p) for p in branch.thead.parameters()}
            rest = [(n, p) for n, p in branch.named_parameters() if id(p) not in thead_ids]
            tag = getattr(self.config, f"thead_tag_{x}")
            decay_all = x == "a" and self.config.thead_a_decay_all
            for params, model, prefix, everything in ((rest, x, f"{x}/", False),
                                                      (branch.thead.named_parameters(), tag, f"{x}/thead/", decay_all)):
                for group in grouped_parameters(params, weight_decay, prefix=prefix, decay_all=everything):
                    groups.append({**group, "model": model})
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

    def after_step(self, step: int, total_steps: int, found_inf: torch.Tensor | None = None) -> None:
        """EMA update of both teachers (dropped on the device when ``found_inf`` is 1); the teacher
        temperature moves to that of ``step + 1`` (a function of the step number, also on a skipped step)."""
        momentum = momentum_schedule(step, total_steps, self.config.base_momentum)
        for x in MODELS:
            self.teachers[x].update(momentum, skip=found_inf)
            for loss in self.losses[x].values():
                loss.set_progress(step + 1, total_steps)
