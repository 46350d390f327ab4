"""MOKD's T-head: a small transformer over patch tokens with a learnable positional embedding and
an optional prepended query token::

    t = adapter(tokens)                  # Linear in_dim -> dim (identity if equal); for ResNet maps a
                                         # 1x1 Conv2d in_dim -> dim, flattened to [B, h*w, dim]
    m = mean(t)                          # the pooled adapter output (MOKD's CNN search query)
    t = t + pos(h, w)                    # pos_embed [1, gh*gw, dim], DINO-resized to the input's grid
    t = cat(query, t) if query given     # query [B, dim]: a (detached) representation from the other model
    t = LayerNorm(blocks(t))             # ``depth`` timm ViT blocks (LayerNorm eps 1e-6)
    e = mean(t[:, 1:] if query else t)   # embed(): [B, dim]
    logits = WeightNormLinear(e)         # forward(): [B, out_dim], no l2 normalisation, trainable gain

as the official MOKD code's ``THead_CNN`` / ``THead_ViT``; ``pos_grid=None``: no positional embedding.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from fastkd.checks import check_bool, check_choice, check_positive_ints, check_shape
from fastkd.models.attention import check_backend, resolve_backend, vit_block_forward
from fastkd.models.dino_head import WeightNormLinear, init_linear
from fastkd.models.position_embedding import resize_pos_embed_dino

INPUT_KINDS = ("tokens", "feature_map")


def _grid(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of them, got {value!r}")
    return int(value[0]), int(value[1])


class THead(nn.Module):
    """Head over tokens ``[B, N, in_dim]`` or (``input="feature_map"``) maps ``[B, in_dim, h, w]``; ``pos_grid``: an
    int or ``(gh, gw)``; ``norm_last_layer``: freeze the last layer's weight-norm gain at 1."""

    def __init__(self, in_dim: int, out_dim: int = 65536, dim: int = 384, depth: int = 3, num_heads: int = 6, *,
                 input: str = "tokens", mlp_ratio: float = 4.0, norm_last_layer: bool = False,
                 pos_grid: int | tuple[int, int] | None = None, norm_eps: float = 1e-6,
                 attention: str | None = None):
        super().__init__()
        check_positive_ints(in_dim=in_dim, dim=dim, depth=depth, num_heads=num_heads)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        check_choice("input", input, INPUT_KINDS)
        check_bool("norm_last_layer", norm_last_layer)
        self.in_dim, self.dim, self.input = in_dim, dim, input
        self.attention = check_backend(attention)
        if input == "feature_map":
            self.adapter = nn.Conv2d(in_dim, dim, kernel_size=1)
        else:
            self.adapter = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.pos_grid = None if pos_grid is None else _grid(pos_grid, "pos_grid")
        if self.pos_grid is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_parameter("pos_embed", None)
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)
        )
        self.norm = norm_layer(dim)
        self.blocks.apply(init_linear)
        self.adapter.apply(init_linear)
        self.last_layer = WeightNormLinear(dim, out_dim, fix_gain=norm_last_layer)

    def _tokens(self, x: torch.Tensor, grid) -> tuple[torch.Tensor, tuple[int, int]]:
        """Adapter output ``[B, N, dim]`` and the ``(h, w)`` grid of its tokens."""
        if self.input == "feature_map":
            check_shape("THead(input='feature_map') input", x, ("B", self.in_dim, "h", "w"))
            if grid is not None:
                raise ValueError("grid applies to token inputs only (a feature map has its own h x w)")
            return self.adapter(x).flatten(2).transpose(1, 2), tuple(x.shape[2:])
        check_shape("THead tokens", x, ("B", "N", self.in_dim))
        n = x.shape[1]
        if grid is not None:
            grid = _grid(grid, "grid")
        elif self.pos_grid is not None:  # the head's grid, else a square one
            grid = self.pos_grid if self.pos_grid[0] * self.pos_grid[1] == n else (math.isqrt(n),) * 2
        if grid is not None and grid[0] * grid[1] != n:
            raise ValueError(f"grid {grid} does not hold the {n} tokens: pass grid=(h, w) for the positional embedding")
        return self.adapter(x), grid

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter on vectors ``[B, in_dim]`` -> ``[B, dim]`` (a 1x1 convolution as a linear map), e.g. to put
        MOKD's ViT CLS query in the head's token space."""
        check_shape("THead.project input", x, ("B", self.in_dim))
        if self.input == "feature_map":
            return F.linear(x, self.adapter.weight.flatten(1), self.adapter.bias)
        return self.adapter(x)

    def embed(self, tokens: torch.Tensor, query: torch.Tensor | None = None, *, grid=None,
              return_input_mean: bool = False):
        """``e`` (module doc), with ``return_input_mean`` also ``m``; ``grid (h, w)`` lays out token inputs (default:
        the head's grid or, for another count, a square one)."""
        x, size = self._tokens(tokens, grid)
        input_mean = x.mean(dim=1) if return_input_mean else None
        if self.pos_embed is not None:
            x = x + resize_pos_embed_dino(self.pos_embed, self.pos_grid, size).to(x.dtype)
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
        embed = (x[:, 1:] if query is not None else x).mean(dim=1)
        return (embed, input_mean) if return_input_mean else embed

    def logits(self, embed: torch.Tensor) -> torch.Tensor:
        """The last layer on an embedding (as it is: no l2 normalisation)."""
        return self.last_layer(embed)

    def forward(self, tokens: torch.Tensor, query: torch.Tensor | None = None, *, grid=None) -> torch.Tensor:
        """Logits ``[B, out_dim]`` of the weight-normalised last layer on the embedding."""
        return self.logits(self.embed(tokens, query, grid=grid))

    def cancel_last_layer_grad(self) -> None:
        """Drop the gradients of the last layer (freeze it for the first epoch(s), as in DINO)."""
        self.last_layer.cancel_grad()
