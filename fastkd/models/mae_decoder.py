"""MAE decoder, ``patchify`` and the normalised-pixel reconstruction loss. For encoder tokens
``e [B, P+K, E]`` of the visible patches ``keep [B, K]``::

    h = Linear_E->D(e)
    full = mask_token.expand(B, N, D); full[b, keep[b, j]] = h[b, P + j]     # unshuffle by scatter
    x = cat(h[:, :P], full) + sincos_pos          # MAE's fixed 2-D sin-cos (column first), 0 for prefix
    pred = Linear_D->p*p*C(LayerNorm(blocks(x)))[:, P:]                      # [B, N, p*p*C]

Loss (``norm_pix=True``): per patch ``t = (patchify(img) - mean) / sqrt(var + 1e-6)`` (unbiased var),
``loss = sum_masked mean((pred - t)^2) / #masked``, the masked patches being those not in ``keep``.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from fastkd.checks import check_number, check_positive_ints, check_shape
from fastkd.models.attention import check_backend, resolve_backend, vit_block_forward
from fastkd.models.position_embedding import sincos_2d_pos_embed


# The decoder's LayerNorm, in its blocks and at its end: eps 1e-6, as the official MAE decoder (models_mae.py).
_layer_norm = partial(nn.LayerNorm, eps=1e-6)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), p*p*C]``, patches row-major, pixels ``(p, p, C)`` (MAE order)."""
    check_positive_ints(patch_size=patch_size)
    if images.dim() != 4 or images.shape[2] % patch_size or images.shape[3] % patch_size:
        raise ValueError(f"images must be [B, C, H, W] with H, W divisible by patch_size={patch_size}, "
                         f"got {tuple(images.shape)}")
    B, C, H, W = images.shape
    h, w = H // patch_size, W // patch_size
    x = images.reshape(B, C, h, patch_size, w, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, patch_size * patch_size * C)


def masked_pixel_loss(pred: torch.Tensor, images: torch.Tensor, keep: torch.Tensor, patch_size: int, *,
                      norm_pix: bool = True) -> torch.Tensor:
    """MAE loss: mean squared error on the patches not in ``keep``, against (normalised) pixels."""
    target = patchify(images, patch_size)
    check_shape("pred (patchified images)", pred, tuple(target.shape))
    check_shape("keep", keep, (pred.shape[0], "K"), dtype=torch.int64)
    if keep.shape[1] >= pred.shape[1]:
        raise ValueError(f"keep hides no patch: K={keep.shape[1]} of N={pred.shape[1]}")
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    masked = torch.ones(pred.shape[:2], device=pred.device, dtype=pred.dtype).scatter(1, keep, 0.0)
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * masked).sum() / masked.sum()


class MAEDecoder(nn.Module):
    """Light transformer decoder predicting the pixels of every patch from the visible tokens."""

    def __init__(self, encoder_dim: int, grid_size: int | tuple[int, int], patch_size: int, *, in_chans: int = 3,
                 decoder_dim: int = 512, depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0,
                 num_prefix_tokens: int = 1, attention: str | None = None):
        super().__init__()
        grid = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)  # (h, w)
        check_positive_ints(encoder_dim=encoder_dim, grid_h=grid[0], grid_w=grid[1], patch_size=patch_size,
                            in_chans=in_chans, decoder_dim=decoder_dim, depth=depth, num_heads=num_heads)
        check_number("num_prefix_tokens", num_prefix_tokens, low=0, integer=True)
        if decoder_dim % 4 or decoder_dim % num_heads:
            raise ValueError(f"decoder_dim ({decoder_dim}) must be divisible by 4 and by num_heads ({num_heads})")
        self.encoder_dim, self.patch_size, self.num_prefix_tokens = encoder_dim, patch_size, num_prefix_tokens
        self.num_patches = grid[0] * grid[1]
        self.attention = check_backend(attention)
        self.embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        pos = sincos_2d_pos_embed(grid[0], grid[1], decoder_dim, columns_first=True)  # MAE's table
        pos = torch.cat([torch.zeros(num_prefix_tokens, decoder_dim), pos])[None]
        self.register_buffer("pos_embed", pos, persistent=False)
        self.blocks = nn.ModuleList(
            Block(decoder_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=_layer_norm)
            for _ in range(depth)
        )
        self.norm = _layer_norm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, patch_size * patch_size * in_chans)

    @classmethod
    def for_backbone(cls, backbone: nn.Module, **kwargs) -> "MAEDecoder":
        """A decoder matching a ViT :class:`~fastkd.models.Backbone` (dims, grid, patch size, prefix)."""
        assert backbone.is_vit, "the MAE decoder follows a ViT backbone (the MAE config checks it)"
        return cls(backbone.embed_dim, tuple(backbone.model.patch_embed.grid_size), backbone.patch_size,
                   in_chans=backbone.model.patch_embed.proj.in_channels,
                   num_prefix_tokens=backbone.num_prefix_tokens, **kwargs)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Pixel predictions ``[B, N, p*p*C]`` for all patches from encoder tokens ``[B, P+K, E]``."""
        P = self.num_prefix_tokens
        check_shape("tokens", tokens, ("B", "P+K", self.encoder_dim))
        check_shape(f"keep (for tokens {tuple(tokens.shape)})", keep, (tokens.shape[0], tokens.shape[1] - P),
                    dtype=torch.int64)
        h = self.embed(tokens)
        B, _, D = h.shape
        full = self.mask_token.to(h.dtype).expand(B, self.num_patches, D)
        full = full.scatter(1, keep[..., None].expand(-1, -1, D), h[:, P:])
        x = torch.cat([h[:, :P], full], dim=1) + self.pos_embed.to(h.dtype)
        backend = resolve_backend(self.attention, x.device, x.dtype)
        for block in self.blocks:
            x = vit_block_forward(block, x, backend)[0]
        return self.pred(self.norm(x))[:, P:]
