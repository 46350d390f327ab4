"""Forward of a timm ViT ``Block`` through :func:`fastkd.models.attention.attention`.

Equals timm's ``Block.forward`` (pre-norm, layer scale, drop path, optional qk-norm, scale-norm
and output gate)::

    h = norm1(x)
    q, k, v = split(qkv(h))                        # each [B, H, N, d]
    q, k = q_norm(q), k_norm(k)
    a = proj(gate * norm(merge_heads(attention(q, k, v, scale=attn.scale))))
    x = x + drop_path1(ls1(a))
    x = x + drop_path2(ls2(mlp(norm2(x))))

and also returns the ``(q, k)`` the attention consumed, for relation distillation.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block

from fastkd.models.attention import attention


def check_vit_block(block: torch.nn.Module, index: int) -> None:
    """Raise ``TypeError`` unless ``block`` is a timm ``Block`` with a timm ``Attention``."""
    if not isinstance(block, Block) or not isinstance(block.attn, Attention):
        raise TypeError(
            f"block {index} is {type(block).__name__} with attention {type(getattr(block, 'attn', None)).__name__}; "
            "fastkd supports timm VisionTransformer models built from timm Block + Attention"
        )


def _self_attention(attn: Attention, x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    out = attention(q, k, v, backend=backend, scale=attn.scale, dropout_p=dropout_p)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), q, k


def vit_block_forward(
    block: Block, x: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(block(x), q, k)`` with attention through ``backend``; ``q, k`` are ``[B, H, N, d]``."""
    a, q, k = _self_attention(block.attn, block.norm1(x), backend)
    x = x + block.drop_path1(block.ls1(a))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, q, k
