"""timm backbones behind one interface: ViTs with pluggable attention and a masked encoder, ResNets.

For a ViT with prefix tokens ``P`` (CLS, optional registers), patch tokens ``x_p [B, N, D]`` and
positional embedding ``pos``::

    tokens = cat(prefix + pos_prefix, x_p + pos_patch)                     # unmasked (timm's _pos_embed)
    tokens = cat(prefix + pos_prefix, gather(x_p + pos_patch, keep))       # keep [B, K]: visible patches only
    tokens = norm(blocks(norm_pre(tokens)))                                # -> Features.tokens [B, P+K, D]

``gather`` is the fused ``fastkd.ops.gather_tokens``. On images of another size (``dynamic_img_size=True``,
multi-crop's local crops) ``pos_patch`` is resized to their grid: ``pos_embed_resize="timm"`` (timm's
antialiased bicubic resize) or ``"dino"`` (:func:`fastkd.models.position_embedding.resize_pos_embed_dino`).
``backbone(x)`` is the CLS token (ViT) or the average-pooled last stage (ResNet).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastkd import ops
from fastkd.checks import check_bool, check_choice, check_number, check_str
from fastkd.models.attention import check_backend, check_vit_block, resolve_backend, vit_block_forward
from fastkd.models.position_embedding import resize_pos_embed_dino


POS_EMBED_RESIZES = ("timm", "dino")


@dataclass
class Features:
    """ViT: ``tokens [B, P+K, D]`` (after the final norm), ``qk``: block -> ``(q, k)`` ``[B, H, P+K, d]``,
    ``layers``: block -> output ``[B, P+K, D]`` (before the final norm). ResNet: the last stage's ``pooled`` and
    ``feature_map``."""

    tokens: torch.Tensor | None = None
    qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    pooled: torch.Tensor | None = None
    feature_map: torch.Tensor | None = None

    def to_dtype(self, dtype: torch.dtype) -> "Features":
        """The same features with every floating-point tensor in ``dtype`` (others unchanged)."""
        def cast(t):
            return t.to(dtype) if t is not None and t.is_floating_point() else t

        return Features(tokens=cast(self.tokens), qk={i: (cast(q), cast(k)) for i, (q, k) in self.qk.items()},
                        layers={i: cast(t) for i, t in self.layers.items()}, pooled=cast(self.pooled),
                        feature_map=cast(self.feature_map))


class Backbone(nn.Module):
    """A timm ViT or ResNet (``self.model``, timm parameter names) with fastkd's forward paths."""

    def __init__(self, model: nn.Module, name: str, *, attention: str | None = None, checkpointing: bool = False,
                 timm_kwargs: dict | None = None, pos_embed_resize: str = "timm"):
        super().__init__()
        if not isinstance(model, (VisionTransformer, ResNet)):
            raise TypeError(f"model must be a timm VisionTransformer or ResNet, got {type(model).__name__}")
        check_bool("checkpointing", checkpointing)
        self.model = model
        self.name = name
        self.timm_kwargs = dict(timm_kwargs or {})
        self.attention = check_backend(attention)
        self.checkpointing = checkpointing
        check_choice("pos_embed_resize", pos_embed_resize, POS_EMBED_RESIZES)
        self.pos_embed_resize = pos_embed_resize  # see the module doc; a copy (an EMA teacher) keeps it
        self.is_vit = isinstance(model, VisionTransformer)
        self.embed_dim = model.num_features
        if self.is_vit:
            if type(model)._pos_embed is not VisionTransformer._pos_embed:
                raise TypeError(f"{name}: {type(model).__name__} overrides the token embedding; fastkd supports "
                                "timm VisionTransformer token layouts (CLS, registers, patches)")
            if model.cls_token is None:
                raise ValueError(f"{name}: fastkd ViT backbones need a class token (class_token=True)")
            for index, block in enumerate(model.blocks):
                check_vit_block(block, index)
            self.num_heads = model.blocks[0].attn.num_heads
            self.depth = len(model.blocks)
            self.patch_size = model.patch_embed.patch_size[0]
            self.num_patches = model.patch_embed.num_patches
            self.num_prefix_tokens = model.num_prefix_tokens
        else:
            self.num_heads = self.depth = self.patch_size = self.num_patches = None
            self.num_prefix_tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global feature ``[B, D]``: CLS after the final norm (ViT), average-pooled last stage (ResNet)."""
        features = self.forward_features(x)
        return features.tokens[:, 0] if self.is_vit else features.pooled

    def forward_features(self, x: torch.Tensor, *, keep: torch.Tensor | None = None, return_qk: Iterable[int] = (),
                         return_layers: Iterable[int] = ()) -> Features:
        """:class:`Features` of ``x [B, C, H, W]``; ``keep [B, K]`` int64: patch tokens kept; ``return_qk`` /
        ``return_layers``: block indices (negative from the end; keys >= 0)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be an image batch [B, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
        qk_blocks = tuple(sorted(self._block_indices(return_qk, "return_qk")))
        layer_blocks = tuple(sorted(self._block_indices(return_layers, "return_layers")))
        if not self.is_vit:
            if keep is not None or qk_blocks or layer_blocks:
                raise ValueError(f"{self.name} is a ResNet: keep, return_qk and return_layers apply to ViTs only")
        elif keep is not None:
            self._check_keep(keep, x)
        out = self._features_pass(x, keep, qk_blocks, layer_blocks)
        if not self.is_vit:
            return Features(pooled=out[0], feature_map=out[1])
        tokens, qk, layers = out
        return Features(tokens=tokens, qk=dict(zip(qk_blocks, qk)), layers=dict(zip(layer_blocks, layers)))

    def _features_pass(self, x: torch.Tensor, keep: torch.Tensor | None, qk_blocks: tuple[int, ...],
                       layer_blocks: tuple[int, ...]) -> tuple:
        """The traced part of :meth:`forward_features` (checked arguments, tensors and tuples out)."""
        if not self.is_vit:
            feature_map = self.model.forward_features(x)
            return feature_map.mean(dim=(2, 3)), feature_map
        tokens = self._embed(x, keep)
        backend = resolve_backend(self.attention, tokens.device, tokens.dtype)
        qk, layers = [], []
        for index, block in enumerate(self.model.blocks):
            if self.checkpointing and torch.is_grad_enabled():
                tokens, q, k = checkpoint(vit_block_forward, block, tokens, backend, use_reentrant=False)
            else:
                tokens, q, k = vit_block_forward(block, tokens, backend)
            if index in qk_blocks:
                qk.append((q, k))
            if index in layer_blocks:
                layers.append(tokens)
        return self.model.norm(tokens), tuple(qk), tuple(layers)

    def _block_indices(self, indices: Iterable[int], argument: str) -> set[int]:
        if isinstance(indices, (int, str)) or not isinstance(indices, Iterable):
            raise TypeError(f"{argument} must be an iterable of block indices, got {indices!r}")
        indices = tuple(indices)
        if not self.is_vit:
            return set(indices)  # a ResNet has no blocks: forward_features refuses any index
        for index in indices:
            check_number(f"{argument} index", index, low=-self.depth, high=self.depth - 1, integer=True)
        return {index % self.depth for index in indices}

    def _embed(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Patch embedding + positional embedding (+ gather of ``keep``), prefix tokens first."""
        model = self.model
        patches = model.patch_embed(x)
        pos = model.pos_embed
        grid, built = tuple(patches.shape[1:3]), tuple(model.patch_embed.grid_size)
        if pos is not None and model.dynamic_img_size and grid != built:
            prefix = 0 if model.no_embed_class else self.num_prefix_tokens
            if self.pos_embed_resize == "dino":
                pos = torch.cat([pos[:, :prefix], resize_pos_embed_dino(pos[:, prefix:], built, grid)], dim=1)
            else:
                pos = resample_abs_pos_embed(pos, new_size=grid, old_size=built, num_prefix_tokens=prefix)
        patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        prefix = [model.cls_token] + ([model.reg_token] if model.reg_token is not None else [])
        prefix = torch.cat(prefix, dim=1).expand(patches.shape[0], -1, -1)
        pos_patch = pos
        if pos is not None and not model.no_embed_class:
            prefix = prefix + pos[:, : self.num_prefix_tokens]
            pos_patch = pos[:, self.num_prefix_tokens:]
        if keep is None:
            visible = patches if pos_patch is None else patches + pos_patch
        else:
            visible = ops.gather_tokens(patches, keep, pos_patch)
        tokens = model.pos_drop(torch.cat([prefix, visible], dim=1))
        return model.norm_pre(model.patch_drop(tokens))

    def _check_keep(self, keep: torch.Tensor, x: torch.Tensor) -> None:
        """``keep`` indexes patches of the images ``x`` (their own grid when the ViT takes dynamic sizes)."""
        patches = (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size) \
            if self.model.dynamic_img_size else self.num_patches
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.int64 or keep.dim() != 2 or \
                keep.shape[0] != x.shape[0] or not 0 < keep.shape[1] <= patches or keep.device != x.device:
            raise ValueError(f"keep must be an int64 tensor [B={x.shape[0]}, K] with 0 < K <= {patches} patches on "
                             f"{x.device}, got {getattr(keep, 'dtype', type(keep).__name__)} "
                             f"{tuple(getattr(keep, 'shape', ()))} on {getattr(keep, 'device', None)}")


def build_backbone(name: str, *, attention: str | None = None, checkpointing: bool = False,
                   pos_embed_resize: str = "timm", **timm_kwargs) -> Backbone:
    """``Backbone`` over ``timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)`` (weights:
    :func:`fastkd.models.load_teacher`); ``checkpointing`` recomputes each ViT block in the backward."""
    check_str("name", name)
    if timm_kwargs.pop("pretrained", False):
        raise ValueError("pretrained=True is not supported: load weights from a local file with load_teacher")
    if (classes := timm_kwargs.pop("num_classes", 0)) != 0:
        raise ValueError(f"backbones have no classifier: num_classes must be 0, got {classes}")
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)
    except (AssertionError, TypeError, ValueError) as error:  # timm checks its arguments with assert
        raise ValueError(f"timm rejected the arguments of {name} {timm_kwargs}: "
                         f"{error or type(error).__name__}") from None
    return Backbone(model, name, attention=attention, checkpointing=checkpointing, timm_kwargs=timm_kwargs,
                    pos_embed_resize=pos_embed_resize)
