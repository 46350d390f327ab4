"""MAE pretraining (He et al. 2022), used to train MIM teachers in the demo and the tests.

The encoder runs on ``K = round((1 - mask_ratio) N)`` random visible patches (``random_keep``,
the backbone's ``gather_tokens`` path); the decoder predicts every patch's pixels::

    keep_idx, _ = random_keep(B, N, K)                       # argsort of uniform noise
    tokens = backbone.forward_features(x, keep=keep_idx).tokens
    loss = masked_pixel_loss(decoder(tokens, keep_idx), x, keep_idx, patch_size, norm_pix=norm_pix_loss)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastkd.checks import check_number
from fastkd.data.batch import Batch
from fastkd.methods.backbones import TRAINED_KEYS, BackboneSpec, backbone_spec
from fastkd.methods.base import Method, check_batch, check_typed_fields, loss_dict, masked_forward
from fastkd.models import MAEDecoder, masked_pixel_loss
from fastkd.models.position_embedding import set_sincos_pos_embed


@dataclass
class MAEConfig:
    """``sincos_pos_embed``: the encoder's position embedding is MAE's fixed (frozen) 2-D sin-cos
    table, column coordinate first (the official ``models_mae.py``); False: timm's learned one."""

    backbone: BackboneSpec = BackboneSpec("vit_base_patch16_224")
    attention: str | None = None
    checkpointing: bool = False
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = True
    sincos_pos_embed: bool = True

    def __post_init__(self):
        self.backbone = backbone_spec("backbone", self.backbone, BackboneSpec("vit_base_patch16_224"), TRAINED_KEYS)
        check_typed_fields(self)
        check_number("mask_ratio", self.mask_ratio, low=0.0, high=1.0, low_open=True)


class MAE(Method, name="mae", recipe="mae", role="pretrain", config=MAEConfig):
    """MAE on one view (recipe ``mae``). Part: ``reconstruction``; metric ``visible_tokens``."""

    def __init__(self, config: MAEConfig):
        super().__init__(config)
        self.backbone = config.backbone.build(attention=config.attention, checkpointing=config.checkpointing)
        if not self.backbone.is_vit:
            raise ValueError(f"MAE needs a ViT encoder, got {config.backbone.arch!r}")
        if config.sincos_pos_embed:
            set_sincos_pos_embed(self.backbone, columns_first=True)
        self.decoder = MAEDecoder.for_backbone(self.backbone, decoder_dim=config.decoder_dim,
                                               depth=config.decoder_depth, num_heads=config.decoder_num_heads,
                                               attention=config.attention)
        N = self.backbone.num_patches
        self.num_visible = min(N - 1, max(1, round((1.0 - config.mask_ratio) * N)))

    @property
    def student(self) -> nn.Module:
        return self.backbone

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = check_batch(batch, 1, type(self).__name__)[0]
        tokens, keep_idx = masked_forward(self.backbone, x, self.num_visible)
        pred = self.decoder(tokens, keep_idx)
        loss = masked_pixel_loss(pred, x, keep_idx, self.backbone.patch_size, norm_pix=self.config.norm_pix_loss)
        return loss_dict({"reconstruction": loss}, {"reconstruction": 1.0},
                         {"visible_tokens": torch.tensor(float(self.num_visible))})
