"""MoCo v3's initialisation of a timm ViT (``VisionTransformerMoCo.__init__`` of the official ``vits.py``).

For every ``nn.Linear`` (attention ``qkv`` / ``proj``, MLP ``fc1`` / ``fc2``), weight ``W [out, in]``, bias ``b``::

    W_qkv ~ U(-a, a),  a = sqrt(6 / (out / 3 + in))     # Q, K and V as three xavier-uniform matrices
    W     ~ U(-a, a),  a = sqrt(6 / (out + in))         # every other linear: xavier-uniform
    b     = 0

the class token ``~ N(0, 1e-6^2)``, and the patch projection (a conv ``[D, C, p, p]``) as one ``[D, C p p]``
matrix: ``U(-a, a)``, ``a = sqrt(6 / (C p p + D))``, bias 0. LayerNorms and the position embedding are
left alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastkd.models.position_embedding import vit_of


@torch.no_grad()
def init_mocov3_vit(model: nn.Module) -> None:
    """Re-initialise a timm ViT (or a Backbone over one) in place (module docstring)."""
    vit = vit_of(model, "MoCo v3's ViT init")
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
