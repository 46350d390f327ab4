"""MOKD's T-head: a small transformer over patch tokens with an optional prepended query token::

    t = adapter(tokens)                  # Linear in_dim -> dim (identity if equal), or for ResNet maps
                                         # a 1x1 Conv2d in_dim -> dim then flatten to [B, h*w, dim]
    t = cat(query, t) if query given     # query [B, dim]: a (detached) representation from the other model
    t = LayerNorm(blocks(t))             # ``depth`` timm ViT blocks, attention via fastkd.models.attention
    e = mean(t[:, 1:] if query else t)   # embed(): [B, dim]
    logits = WeightNormLinear(e / ||e||) # forward(): [B, out_dim]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from fastkd.checks import check_positive_ints
from fastkd.models.attention import check_backend, resolve_backend
from fastkd.models.vit_block import vit_block_forward
from fastkd.models.weight_norm_linear import WeightNormLinear

INPUT_KINDS = ("tokens", "feature_map")


class THead(nn.Module):
    """Transformer head over tokens ``[B, N, in_dim]`` or (``input="feature_map"``) maps ``[B, in_dim, h, w]``."""

    def __init__(self, in_dim: int, out_dim: int = 65536, dim: int = 384, depth: int = 3, num_heads: int = 6, *,
                 input: str = "tokens", mlp_ratio: float = 4.0, norm_last_layer: bool = True,
                 attention: str | None = None):
        super().__init__()
        check_positive_ints(in_dim=in_dim, dim=dim, depth=depth, num_heads=num_heads)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if input not in INPUT_KINDS:
            raise ValueError(f"input must be one of {INPUT_KINDS}, got {input!r}")
        self.in_dim, self.dim, self.input = in_dim, dim, input
        self.attention = check_backend(attention)
        if input == "feature_map":
            self.adapter = nn.Conv2d(in_dim, dim, kernel_size=1)
        else:
            self.adapter = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.last_layer = WeightNormLinear(dim, out_dim, fix_gain=norm_last_layer)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.input == "feature_map":
            if x.dim() != 4 or x.shape[1] != self.in_dim:
                raise ValueError(f"THead(input='feature_map') expects [B, {self.in_dim}, h, w], got {tuple(x.shape)}")
            return self.adapter(x).flatten(2).transpose(1, 2)
        if x.dim() != 3 or x.shape[2] != self.in_dim:
            raise ValueError(f"THead expects tokens [B, N, {self.in_dim}], got {tuple(x.shape)}")
        return self.adapter(x)

    def embed(self, tokens: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """Mean-pooled head tokens ``[B, dim]`` (the query token, if any, excluded)."""
        x = self._tokens(tokens)
        if query is not None:
            if query.dim() == 2:
                query = query[:, None]
            if query.shape != (x.shape[0], 1, self.dim):
                raise ValueError(f"query must be [B={x.shape[0]}, {self.dim}] or [B, 1, {self.dim}], "
                                 f"got {tuple(query.shape)}")
            x = torch.cat([query.to(x.dtype), x], dim=1)
        backend = resolve_backend(self.attention, x.device)
        for block in self.blocks:
            x = vit_block_forward(block, x, backend)[0]
        x = self.norm(x)
        return (x[:, 1:] if query is not None else x).mean(dim=1)

    def forward(self, tokens: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, out_dim]`` of the weight-normalised last layer on the l2-normalised embedding."""
        return self.last_layer(F.normalize(self.embed(tokens, query), dim=-1))

    def cancel_last_layer_grad(self) -> None:
        """Drop the gradients of the last layer (freeze it for the first epoch(s), as in DINO)."""
        self.last_layer.cancel_grad()
