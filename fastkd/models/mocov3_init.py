"""MoCo v3's initialisation of a timm ViT (``VisionTransformerMoCo.__init__`` of the official ``vits.py``).

For every ``nn.Linear`` of the ViT (attention ``qkv`` / ``proj``, MLP ``fc1`` / ``fc2``), weight
``W [out, in]`` and bias ``b``::

    W_qkv ~ U(-a, a),  a = sqrt(6 / (out / 3 + in))     # Q, K and V as three xavier-uniform matrices
    W     ~ U(-a, a),  a = sqrt(6 / (out + in))         # every other linear: xavier-uniform
    b     = 0

the class token ``~ N(0, 1e-6^2)``, and the patch projection (a conv ``[D, C, p, p]``) as one
``[D, C p p]`` matrix: ``U(-a, a)``, ``a = sqrt(6 / (C p p + D))``, bias 0. LayerNorms keep
``(1, 0)``; the position embedding is left alone (MoCo v3 fixes it to sin-cos:
:func:`fastkd.models.position_embedding.set_sincos_pos_embed`). timm's own init draws the patch
projection at about half this scale, which matters because MoCo v3 then freezes that layer.
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn


@torch.no_grad()
def init_mocov3_vit(model: nn.Module) -> None:
    """Re-initialise the timm ``VisionTransformer`` ``model`` (or a fastkd ``Backbone`` over one)
    in place as the module docstring states."""
    vit = getattr(model, "model", model)
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"MoCo v3's ViT init needs a timm VisionTransformer, got {type(vit).__name__}")
    for name, module in vit.named_modules():
        if isinstance(module, nn.Linear):
            out_features, in_features = module.weight.shape
            fan_out = out_features // 3 if name.endswith("qkv") else out_features
            bound = math.sqrt(6.0 / (fan_out + in_features))
            module.weight.uniform_(-bound, bound)
            if module.bias is not None:
                module.bias.zero_()
    vit.cls_token.normal_(std=1e-6)
    proj = vit.patch_embed.proj
    bound = math.sqrt(6.0 / (proj.weight[0].numel() + proj.weight.shape[0]))
    proj.weight.uniform_(-bound, bound)
    if proj.bias is not None:
        proj.bias.zero_()
