"""Independent, straightforward re-implementations the method tests compare against: a ViT forward
through timm's modules with materialised attention maps, and the plain-PyTorch losses."""

from __future__ import annotations

import math

import torch

from fastkd.data import Batch
from fastkd.models import build_backbone, save_backbone

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
TINY_VIT_ARCH = "vit_tiny_patch16_224"
TINY_MOCO = dict(backbone=dict(arch=TINY_VIT_ARCH, kwargs=TINY_VIT), proj_hidden_dim=32, pred_hidden_dim=32, out_dim=16)


def tiny_batch(views: int = 1, B: int = 3, size: int = 32, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch([torch.randn(B, 3, size, size, generator=g) for _ in range(views)],
                 torch.full((B,), -1, dtype=torch.long), torch.arange(B))


def write_tiny_teacher(path, seed: int, **overrides) -> str:
    """Save a randomly initialised tiny ViT in fastkd's checkpoint format; returns the path."""
    torch.manual_seed(seed)
    save_backbone(build_backbone(TINY_VIT_ARCH, **{**TINY_VIT, **overrides}), path)
    return str(path)


def dino_interpolate_pos_encoding(pos_embed: torch.Tensor, h: int, w: int, patch: int, prefix: int = 1) -> torch.Tensor:
    """DINO's / the official MOKD code's ``interpolate_pos_encoding`` for an ``h x w`` input of
    ``patch``-pixel patches: ``prefix`` leading entries (CLS) kept, the square patch grid resized by
    bicubic interpolation with scale factors ``(h // patch + 0.1) / side``; unchanged for its own grid."""
    head, grid = pos_embed[:, :prefix], pos_embed[:, prefix:]
    n, dim = grid.shape[1], pos_embed.shape[-1]
    side = int(math.sqrt(n))
    h0, w0 = h // patch, w // patch
    if h0 * w0 == n and h0 == w0:
        return pos_embed
    grid = torch.nn.functional.interpolate(grid.reshape(1, side, side, dim).permute(0, 3, 1, 2),
                                           scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side), mode="bicubic")
    return torch.cat([head, grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def plain_block(block, h: torch.Tensor, maps: list | None = None) -> torch.Tensor:
    """A timm / DINO ViT block with an explicit softmax(q k^T * scale) (appended to ``maps``)."""
    a = block.attn
    y = block.norm1(h)
    B, M, _ = y.shape
    q, k, v = a.qkv(y).reshape(B, M, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) * a.scale, dim=-1)
    if maps is not None:
        maps.append(attn)
    h = h + a.proj((attn @ v).transpose(1, 2).reshape(B, M, -1))
    return h + block.mlp(block.norm2(h))


def plain_vit(backbone, x: torch.Tensor, keep: torch.Tensor | None = None):
    """``(tokens after the final norm, [attention map [B, H, M, M] per block])`` computed with
    timm's submodules and an explicit softmax(q k^T * scale); on another image size than the ViT's
    own, DINO's position-embedding interpolation."""
    m = backbone.model
    patches = m.patch_embed(x)  # [B, N, D] (or [B, h, w, D] for a dynamic-size ViT)
    patches = patches.flatten(1, 2) if patches.dim() == 4 else patches
    pos = dino_interpolate_pos_encoding(m.pos_embed, x.shape[-2], x.shape[-1], backbone.patch_size)
    cls = m.cls_token.expand(x.shape[0], -1, -1) + pos[:, :1]
    patches = patches + pos[:, 1:]
    if keep is not None:
        patches = torch.stack([patches[b, keep[b]] for b in range(x.shape[0])])
    h = torch.cat([cls, patches], dim=1)
    maps = []
    for block in m.blocks:
        h = plain_block(block, h, maps)
    return m.norm(h), maps


def plain_align(student: torch.Tensor, teacher: torch.Tensor, target_norm: str = "layernorm",
                loss: str = "smooth_l1", beta: float = 2.0) -> torch.Tensor:
    """Mean over rows of the feature-alignment loss (teacher normalised without gradient)."""
    t = teacher.detach()
    if target_norm == "layernorm":
        t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-6)
    elif target_norm == "l2":
        t = t / t.norm(dim=-1, keepdim=True)
    if loss == "smooth_l1":
        d = (student - t).abs()
        return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta).mean()
    if loss == "mse":
        return ((student - t) ** 2).mean()
    return (1 - (student * t).sum(-1) / (student.norm(dim=-1) * t.norm(dim=-1))).mean()


def plain_relation_kl(attn_s: torch.Tensor, attn_t: torch.Tensor) -> torch.Tensor:
    """Mean over rows and heads of KL(attn_t || attn_s) for materialised maps ``[B, H, M, M]``."""
    return (attn_t * (attn_t.log() - attn_s.log())).sum(-1).mean()


def plain_contrastive(q, k, T):
    """One direction of MoCo v3's loss: cross-entropy of cosine logits / T, positives on the diagonal, x 2T."""
    q = q / q.norm(dim=1, keepdim=True)
    k = k / k.norm(dim=1, keepdim=True)
    logits = q @ k.t() / T
    return -(logits.diagonal() - torch.logsumexp(logits, dim=1)).mean() * 2 * T


def plain_branches(method, views):
    """Online ``q`` and momentum ``k`` per view through timm modules (materialised attention)."""
    backbone, projector = method.base_encoder
    momentum_backbone, momentum_projector = method.momentum_encoder.module
    q = [method.predictor(projector(plain_vit(backbone, x)[0][:, 0])) for x in views]
    with torch.no_grad():
        k = [momentum_projector(plain_vit(momentum_backbone, x)[0][:, 0]) for x in views]
    return q, k
