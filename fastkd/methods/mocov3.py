"""MoCo v3 (Chen, Xie, He 2021): the momentum-contrast teacher family and ResidualMoCo's base.

Online branch ``q_v = predictor(projector(backbone(x_v)))``; momentum branch
``k_v = momentum_encoder(x_v)`` (an EMA copy of ``backbone + projector``, no gradient; in eval mode
but for its BatchNorm layers, see :class:`fastkd.models.EMATeacher`)::

    loss = InfoNCE(q_1, k_2) + InfoNCE(q_2, k_1)        # fastkd.losses.InfoNCELoss, scaled by 2T

``after_step`` moves the momentum encoder with ``ema_`` at
``m = 1 - 0.5 (1 + cos(pi step / total)) (1 - base_momentum)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastkd.checks import check_choice, check_number
from fastkd.data.batch import Batch
from fastkd.losses.infonce import InfoNCELoss
from fastkd.methods.backbones import TRAINED_KEYS, BackboneSpec, backbone_spec
from fastkd.methods.base import Method, check_batch, check_typed_fields, loss_dict
from fastkd.models import EMATeacher, MoCoPredictor, MoCoProjector, momentum_schedule
from fastkd.models.ema_teacher import BN_STATS
from fastkd.method_protocol import grouped_parameters
from fastkd.models.mocov3_init import init_mocov3_vit
from fastkd.models.position_embedding import set_sincos_pos_embed


def per_view(module: nn.Module, views: list[torch.Tensor], joint: bool) -> list[torch.Tensor]:
    """``[module(x) for x in views]``; with ``joint``, computed as ``module(cat(views)).chunk(V)``."""
    if joint and len(views) > 1:
        return list(module(torch.cat(views)).chunk(len(views)))
    return [module(x) for x in views]


@dataclass
class MoCoV3Config:
    """``None`` (``proj_layers``, ``temperature``, ``pred_last_bn``, ``freeze_patch_embed``,
    ``sincos_pos_embed``, ``mocov3_init``): MoCo v3's choice for the architecture. ViTs: 3 projector
    layers, T = 0.2, a predictor ending in ``BatchNorm1d(affine=False)`` (``pred_last_bn``), the
    frozen random patch projection (``freeze_patch_embed``), the fixed 2-D sin-cos position embedding
    (``sincos_pos_embed``) and MoCo v3's init (``mocov3_init``: xavier-uniform linears, Q, K, V drawn
    separately; not for a backbone loaded from ``backbone.path``); ResNets: 2 layers, T = 1.0, no last
    predictor BN, and the three ViT options must stay unset.

    - ``decay_all_params``: weight decay on every parameter, as the official ``model.parameters()``
      (LARS still skips tensors of <= 1 dim); False: biases and norm weights are not decayed.
    - ``momentum_bn_stats``: BatchNorm statistics of the momentum encoder, ``"batch"`` (its own, as
      the official code) or ``"ema"``; see :class:`fastkd.models.EMATeacher`.
    """

    backbone: BackboneSpec = BackboneSpec("vit_small_patch16_224")
    attention: str | None = None
    checkpointing: bool = False
    proj_layers: int | None = None
    proj_hidden_dim: int = 4096
    pred_hidden_dim: int = 4096
    out_dim: int = 256
    temperature: float | None = None
    base_momentum: float = 0.99
    freeze_patch_embed: bool | None = None
    sincos_pos_embed: bool | None = None
    mocov3_init: bool | None = None
    decay_all_params: bool = True
    pred_last_bn: bool | None = None
    momentum_bn_stats: str = "batch"

    def __post_init__(self):
        self.backbone = backbone_spec("backbone", self.backbone, BackboneSpec("vit_small_patch16_224"), TRAINED_KEYS)
        check_typed_fields(self)
        if self.temperature is not None:
            check_number("temperature", self.temperature, low=0.0, low_open=True)
        check_number("base_momentum", self.base_momentum, low=0.0, high=1.0)
        check_choice("momentum_bn_stats", self.momentum_bn_stats, BN_STATS)


class MoCoV3(Method, name="mocov3", recipe="mocov3", role="pretrain", config=MoCoV3Config):
    """MoCo v3 on two augmented views (recipe ``mocov3``). Parts: ``contrastive``."""

    def __init__(self, config: MoCoV3Config):
        super().__init__(config)
        backbone = config.backbone.build(attention=config.attention, checkpointing=config.checkpointing)
        for name in ("freeze_patch_embed", "sincos_pos_embed", "mocov3_init"):
            if getattr(config, name) and not backbone.is_vit:
                raise ValueError(f"{name} applies to ViTs only, {config.backbone.arch!r} is not one: leave it unset")
        if backbone.is_vit and config.mocov3_init is not False and config.backbone.path is None:
            init_mocov3_vit(backbone)
        if backbone.is_vit and config.sincos_pos_embed is not False:
            set_sincos_pos_embed(backbone)
        if backbone.is_vit and config.freeze_patch_embed is not False:
            backbone.model.patch_embed.requires_grad_(False)
        layers = config.proj_layers or (3 if backbone.is_vit else 2)
        projector = MoCoProjector(backbone.embed_dim, config.proj_hidden_dim, config.out_dim, layers)
        self.base_encoder = nn.Sequential(backbone, projector)
        last_bn = config.pred_last_bn if config.pred_last_bn is not None else backbone.is_vit
        self.predictor = MoCoPredictor(config.out_dim, config.pred_hidden_dim, config.out_dim, last_bn=last_bn)
        self.momentum_encoder = EMATeacher(self.base_encoder, bn_stats=config.momentum_bn_stats)
        temperature = config.temperature if config.temperature is not None else (0.2 if backbone.is_vit else 1.0)
        self.contrastive = InfoNCELoss(temperature=temperature)
        self.views_together = not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())

    @property
    def student(self) -> nn.Module:
        return self.base_encoder[0]

    def encode(self, views: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Per view: online backbone feature ``h``, projection ``z``, prediction ``q``; momentum
        backbone feature ``h_m`` and projection ``k`` (no gradient).

        A backbone whose samples are independent (no BatchNorm: the ViTs) reads views of one shape
        as one batch, ``backbone(cat(views)).chunk(V)``: the same features as one call per view, in
        fewer and larger GEMMs. The heads (BatchNorm over each view's batch, as in the official
        code) and a ResNet backbone see each view on its own."""
        backbone, projector = self.base_encoder
        momentum_backbone, momentum_projector = self.momentum_encoder.module
        joint = self.views_together and len({tuple(x.shape) for x in views}) == 1
        with torch.no_grad():
            h_m = per_view(momentum_backbone, views, joint)
        out = {"h": per_view(backbone, views, joint), "h_m": h_m}
        out["z"] = [projector(h) for h in out["h"]]
        out["q"] = [self.predictor(z) for z in out["z"]]
        with torch.no_grad():
            out["k"] = [momentum_projector(h) for h in h_m]
        return out

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        views = check_batch(batch, 2, type(self).__name__)[:2]
        enc = self.encode(views)
        contrastive = self.contrastive(enc["q"][0], enc["q"][1], enc["k"][0], enc["k"][1])
        return loss_dict({"contrastive": contrastive}, {"contrastive": 1.0})

    def param_groups(self, weight_decay: float) -> list[dict]:
        """One decayed group of every trained parameter (``decay_all_params``, the official
        recipe), else weights decayed and biases / norm weights not."""
        return grouped_parameters(self.named_parameters(), weight_decay, decay_all=self.config.decay_all_params)

    def momentum_at(self, step: int, total_steps: int) -> float:
        return momentum_schedule(step, total_steps, self.config.base_momentum)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int, found_inf: torch.Tensor | None = None) -> None:
        """EMA update of the momentum encoder at the scheduled momentum; with ``found_inf`` (the
        trainer's device-side skip flag) the update is decided on the device and dropped when it is 1."""
        self.momentum_encoder.update(self.momentum_at(step, total_steps), skip=found_inf)
