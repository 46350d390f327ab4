"""The papers' linear-probe protocols: DINO's ``eval_linear.py`` and MoCo v3's ``main_lincls.py``.

Unlike the cached-feature probe of :mod:`fastkd.eval.linear_probe`, these run the frozen backbone on freshly
augmented images every step, as the papers did. For a train batch ``x`` (the ``linear`` recipe) with labels ``y``
and a ViT with blocks ``1..L``, final norm ``norm`` and ``P`` prefix tokens (CLS first, then registers)::

    h_l = block_l(h_{l-1})                                      # [B, P + N, D], h_0 = embedded tokens
    f   = concat(norm(h_{L-n+1})[:, 0], ..., norm(h_L)[:, 0])   # CLS of the last n blocks, [B, n D]
    f   = concat(f, mean_{i >= P} norm(h_L)[:, i])              # when avgpool_patches: [B, (n + 1) D]
    f   = (f - mean_B f) / sqrt(var_B f + 1e-6)                 # only when batchnorm (MAE; off for both)
    logits_h = W_h f + b_h                                      # one head per swept base lr  lr_h
    loss     = sum_h CE(logits_h, y)                            # dloss/dW_h = dCE_h/dW_h: heads are independent
    lr_h(t)  = lr_h * B / 256 * 0.5 * (1 + cos(pi * t / T))     # t = step, T = epochs * batches per epoch

with ``W_h ~ N(0, 0.01^2)``, ``b_h = 0`` and SGD or LARS. A ResNet's feature is its pooled last stage, any other
module's ``f = model(x)``. The backbone runs frozen in eval mode, so each swept lr costs one matrix product per step.

Evaluation: ``top1`` / ``top5`` of every head on the val images (resize ``resize``, centre crop ``image_size``); the
result reports the best. Departures are in each protocol's ``sources``; besides them, the patch average comes after
the CLS tokens (DINO interleaves them: a permutation of the inputs) and skips register tokens too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastkd.checks import check_bool, check_choice, check_instance, check_number, check_str
from fastkd.data import build_loader
from fastkd.data.loader import BACKENDS
from fastkd.data.recipes import INTERPOLATIONS, Recipe, ViewSpec
from fastkd.eval.evaluate import (aligned_splits, check_eval_options, check_run_options, extract_features,
                                  model_features)
from fastkd.eval.linear_probe import EvalResult, fold_linear, init_linear, topk_accuracy, train_epoch
from fastkd.eval.models import native_image_size
from fastkd.models.backbone import Backbone
from fastkd.progress import progress_disable
from fastkd.train.optim import apply_schedules, build_optimizer
from fastkd.train.schedules import WarmupCosine, scaled_lr

OPTIMIZERS = ("sgd", "lars")
# DINO's rule: below this width (ViT-S) 4 blocks without patch average, from it on (ViT-B) 1 block with it
WIDE_EMBED_DIM = 768
REFERENCE_BATCH = 256  # lr = base_lr * batch_size / 256 (linear scaling rule)
BN_EPS = 1e-6  # MAE's BatchNorm1d(affine=False, eps=1e-6) in front of its linear head


def _check_lrs(name: str, lrs, *, allow_empty: bool = False) -> tuple[float, ...]:
    """``lrs`` as a tuple of distinct finite base lrs > 0."""
    if isinstance(lrs, (str, bytes)) or not isinstance(lrs, Sequence):
        raise ValueError(f"{name} must be a list of base learning rates, got {lrs!r}")
    if not lrs and not allow_empty:
        raise ValueError(f"{name} must hold at least one learning rate, got {lrs!r}")
    for index, lr in enumerate(lrs):
        check_number(f"{name}[{index}]", lr, low=0.0, low_open=True, finite=True)
    if len(set(lrs)) != len(lrs):
        raise ValueError(f"{name} must not repeat a learning rate, got {list(lrs)!r}")
    return tuple(float(lr) for lr in lrs)


@dataclass(frozen=True)
class LinearProtocol:
    """One linear-probe protocol; ``sources`` says where each value comes from. ``base_lr`` is per 256 images
    (``resnet_base_lr`` for ResNets, None: ``base_lr``); ``lrs``: base lrs trained side by side (empty: the one)."""

    name: str
    epochs: int
    base_lr: float
    lrs: tuple[float, ...] = ()
    resnet_base_lr: float | None = None
    batch_size: int = 1024
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    # the probe's input; None: DINO's width rule (see feature_layout); batchnorm: MAE's BatchNorm without affine
    n_last_blocks: int | None = 1
    avgpool_patches: bool | None = False
    batchnorm: bool = False
    # the crops: train_interpolation of the random resized crop, val_interpolation of the val resize
    image_size: int = 224
    resize: int = 256
    train_interpolation: str = "bilinear"
    val_interpolation: str = "bicubic"
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        check_str("LinearProtocol.name", self.name)
        count, positive = dict(low=1, integer=True), dict(low=0.0, low_open=True, finite=True)
        for name, bounds in (("epochs", count), ("batch_size", count), ("image_size", count),
                             ("resize", dict(low=self.image_size, integer=True)), ("base_lr", positive),
                             ("resnet_base_lr", positive), ("momentum", dict(low=0.0, high=1.0, high_open=True)),
                             ("weight_decay", dict(low=0.0, finite=True)), ("n_last_blocks", count)):
            if getattr(self, name) is not None or name not in ("resnet_base_lr", "n_last_blocks"):  # optional ones
                check_number(f"LinearProtocol.{name}", getattr(self, name), **bounds)
        object.__setattr__(self, "lrs", _check_lrs("LinearProtocol.lrs", self.lrs, allow_empty=True))
        check_choice("LinearProtocol.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("LinearProtocol.avgpool_patches", self.avgpool_patches, (True, False, None))
        check_bool("LinearProtocol.batchnorm", self.batchnorm)
        for name in ("train_interpolation", "val_interpolation"):
            check_choice(f"LinearProtocol.{name}", getattr(self, name), INTERPOLATIONS)

    def base_lrs(self, is_resnet: bool = False) -> tuple[float, ...]:
        """The base lrs (per 256 images) to train: ``lrs``, else the architecture's base lr."""
        return self.lrs or (self.resnet_base_lr if is_resnet and self.resnet_base_lr is not None else self.base_lr,)


_AUGMENT = ("official code: RandomResizedCrop(224) (torchvision defaults: scale 0.08-1, ratio 3/4-4/3, "
            "bilinear) + RandomHorizontalFlip, nothing else")
_PER_EPOCH = "once per epoch; here per step (chosen here)"

LINEAR_PROTOCOLS: dict[str, LinearProtocol] = {
    "dino": LinearProtocol(
        name="dino", epochs=100, base_lr=0.001, n_last_blocks=None, avgpool_patches=None, val_interpolation="bicubic",
        sources={
            "epochs": "official code: eval_linear.py --epochs default 100",
            "base_lr": "official code: --lr default 0.001 'for a reference batch size of 256', to tweak per "
                       "checkpoint: pass lrs= to sweep (the paper's own grid: unconfirmed)",
            "batch_size": "official code: --batch_size_per_gpu 128 x the README's 8 GPUs = 1024",
            "optimizer": "official code: SGD, momentum 0.9, weight_decay 0",
            "schedule": "official code: CosineAnnealingLR(T_max=epochs, eta_min=0) stepped " + _PER_EPOCH,
            "n_last_blocks": "official code help: n=4 for ViT-S, n=1 for ViT-B; the rule embed_dim < 768 (at most the "
                             "depth) is chosen here",
            "avgpool_patches": "official code help: false for ViT-S, true for ViT-B (README's ViT-B commands)",
            "features": "official code: get_intermediate_layers = norm(output of each of the last n blocks), "
                        "CLS = [:, 0], patch average over [:, 1:]; ResNets: model(x) with fc = Identity",
            "init": "official code: LinearClassifier weight normal(0, 0.01), bias 0",
            "batchnorm": "official code: none",
            "train_augmentation": _AUGMENT,
            "val_augmentation": "official code: Resize(256, bicubic) + CenterCrop(224)",
            "evaluation": "official code prints the best val top-1 over epochs; here the last epoch's (chosen here)",
        },
    ),
    "mocov3": LinearProtocol(
        name="mocov3", epochs=90, base_lr=3.0, resnet_base_lr=0.1, n_last_blocks=1, avgpool_patches=False,
        val_interpolation="bilinear", sources={
            "epochs": "official code: main_lincls.py --epochs default 90",
            "base_lr": "official CONFIG.md: --lr=3 for ViT-S and ViT-B, a base lr the code scales (lr * batch / 256)",
            "resnet_base_lr": "official code: --lr default 0.1 (CONFIG.md's ResNet-50 command passes none)",
            "batch_size": "official code: -b default 1024; README: 'momentum-SGD and a batch size of 1024'",
            "optimizer": "official code: SGD for every architecture, momentum 0.9, --wd default 0; optimizer='lars' "
                         "(fastkd's LARS, for ResNet-50 probes reported with LARS) is unconfirmed for MoCo v3",
            "schedule": "official code: adjust_learning_rate, cosine to 0, set " + _PER_EPOCH,
            "n_last_blocks": "official code: the model's own head input, CLS after the final norm (1 block)",
            "avgpool_patches": "official code: no patch average",
            "features": "official code: ViT head on norm(tokens)[:, 0]; ResNet fc on the pooled last stage",
            "init": "official code: fc / head weight normal(0, 0.01), bias 0",
            "batchnorm": "official code: none",
            "train_augmentation": _AUGMENT,
            "val_augmentation": "official code: Resize(256) + CenterCrop(224), bilinear (torchvision default)",
            "evaluation": "official code keeps the best val top-1 over epochs; here the last epoch's (chosen here)",
        },
    ),
}


@dataclass
class LinearProtocolResult(EvalResult):
    """Scores of the best head (base ``lr``, ``scaled_lr`` after batch scaling); ``sweep``: the same per trained lr;
    ``classifiers``: the heads in that order as ``nn.Linear`` on raw features (BatchNorm folded in)."""

    protocol: str
    lr: float
    scaled_lr: float
    train_loss: float
    sweep: list[dict]
    feature_dim: int
    n_last_blocks: int
    avgpool_patches: bool
    features: str  # what the feature is, in words (says when model(x) stood in for the last blocks)
    epochs: int
    batch_size: int
    image_size: int
    resize: int
    optimizer: str
    num_classes: int
    classifier: nn.Linear
    classifiers: list[nn.Linear]

    @property
    def top1_per_lr(self) -> dict[float, float]:
        """``{base lr: top-1}`` of every trained head."""
        return {entry["lr"]: entry["top1"] for entry in self.sweep}


def resolve_protocol(protocol: str | LinearProtocol) -> LinearProtocol:
    """A :data:`LINEAR_PROTOCOLS` entry by name, or ``protocol`` itself."""
    if isinstance(protocol, LinearProtocol):
        return protocol
    check_choice("protocol", protocol, sorted(LINEAR_PROTOCOLS))
    return LINEAR_PROTOCOLS[protocol]


def _vit_backbone(model: nn.Module):
    """``model`` when it is a fastkd ViT :class:`~fastkd.models.backbone.Backbone`, else None."""
    return model if isinstance(model, Backbone) and model.is_vit else None


def feature_layout(model: nn.Module, protocol: str | LinearProtocol = "dino", *, n_last_blocks: int | None = None,
                   avgpool_patches: bool | None = None) -> tuple[int, bool]:
    """``(n_last_blocks, avgpool_patches)``: the arguments, else the protocol's, else DINO's width rule
    (``embed_dim < 768``: ``(min(4, depth), False)``, else ``(1, True)``); ``(1, False)`` for non-ViTs.
    Raises ValueError for more blocks / patch average on a non-ViT and for ``n_last_blocks > depth``."""
    protocol = resolve_protocol(protocol)
    if n_last_blocks is not None:
        check_number("n_last_blocks", n_last_blocks, low=1, integer=True)
    check_choice("avgpool_patches", avgpool_patches, (True, False, None))
    vit = _vit_backbone(model)
    if vit is None:
        if (n_last_blocks or 1) != 1 or avgpool_patches:
            kind = ("a ResNet backbone" if hasattr(model, "is_vit")
                    else f"a {type(model).__name__}, not a fastkd Backbone")
            raise ValueError(f"n_last_blocks={n_last_blocks!r} / avgpool_patches={avgpool_patches!r} need a fastkd ViT "
                             f"backbone; the model is {kind}, whose model(x) is the feature (n_last_blocks=1, no "
                             f"patch average)")
        return 1, False
    wide = vit.embed_dim >= WIDE_EMBED_DIM
    name = "n_last_blocks" if n_last_blocks is not None else "LinearProtocol.n_last_blocks"
    n_last_blocks = n_last_blocks or protocol.n_last_blocks or (1 if wide else min(4, vit.depth))
    if n_last_blocks > vit.depth:
        raise ValueError(f"{name} must be at most the model's depth {vit.depth}, got {n_last_blocks}")
    if avgpool_patches is None:
        avgpool_patches = protocol.avgpool_patches if protocol.avgpool_patches is not None else wide
    return n_last_blocks, avgpool_patches


class ProtocolFeatures(nn.Module):
    """``forward(images)``: the probe's input ``f [B, D']`` (module docstring); sets neither grad nor eval mode."""

    def __init__(self, model: nn.Module, n_last_blocks: int = 1, avgpool_patches: bool = False):
        super().__init__()
        self.model, self.n_last_blocks, self.avgpool_patches = model, n_last_blocks, avgpool_patches

    def describe(self) -> str:
        """What the feature is, in words."""
        if _vit_backbone(self.model) is None:
            kind = "ResNet backbone: pooled last stage" if hasattr(self.model, "is_vit") else \
                f"{type(self.model).__name__} is not a fastkd Backbone: its output"
            return f"model(x) ({kind}; n_last_blocks=1, no patch average)"
        blocks = f"{self.n_last_blocks} block{'s' if self.n_last_blocks > 1 else ''}"
        return f"CLS after the final norm of the last {blocks}" + (
            " + mean of the last block's normed patch tokens" if self.avgpool_patches else "")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = _vit_backbone(self.model)
        if vit is None:
            assert self.n_last_blocks == 1 and not self.avgpool_patches, "more blocks and avgpool_patches need a ViT"
            return model_features(self.model, images)
        out = vit.forward_features(images, return_layers=range(vit.depth - self.n_last_blocks, vit.depth - 1))
        normed = [vit.model.norm(out.layers[index]) for index in sorted(out.layers)] + [out.tokens]  # = norm(h_L)
        parts = [tokens[:, 0] for tokens in normed]
        if self.avgpool_patches:
            parts.append(out.tokens[:, vit.num_prefix_tokens:].mean(dim=1))
        return torch.cat(parts, dim=1)


def protocol_features(model: nn.Module, images: torch.Tensor, *, n_last_blocks: int = 1,
                      avgpool_patches: bool = False) -> torch.Tensor:
    """:class:`ProtocolFeatures` of ``model`` on ``images``."""
    return ProtocolFeatures(model, n_last_blocks, avgpool_patches)(images)


class _Head(nn.Module):
    """``W BN(f) + b`` (BN only when ``batchnorm``), ``W ~ N(0, 0.01^2)`` seeded alike for every head of a sweep."""

    def __init__(self, dim: int, num_classes: int, batchnorm: bool, seed: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=BN_EPS) if batchnorm else nn.Identity()
        self.linear = init_linear(dim, num_classes, torch.Generator().manual_seed(seed))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))

    def folded(self) -> nn.Linear:
        """The eval-mode head as one frozen CPU ``nn.Linear`` (the BatchNorm's running statistics folded in)."""
        if not isinstance(self.norm, nn.BatchNorm1d):
            return fold_linear(self.linear)
        return fold_linear(self.linear, self.norm.running_mean, (self.norm.running_var + self.norm.eps).sqrt())


def evaluate_linear_protocol(model: nn.Module, train_dir, val_dir, protocol: str | LinearProtocol = "dino", *,
                             epochs: int | None = None, lrs: Sequence[float] | None = None,
                             batch_size: int | None = None, image_size: int | None = None, resize: int | None = None,
                             n_last_blocks: int | None = None, avgpool_patches: bool | None = None,
                             backend: str = "auto", num_workers: int = 2, device: str | torch.device = "cpu",
                             seed: int = 0, progress: bool = True) -> LinearProtocolResult:
    """Linear probe of the frozen ``model`` (on ``device``; its mode restored) by ``protocol`` on ImageFolder splits
    (module doc). Options left None take the protocol's values; ``lrs``: base lrs per 256 images, one head each;
    ``image_size``: the model's own (else 224), ``resize``: ``image_size * 256 / 224``."""
    protocol = resolve_protocol(protocol)
    epochs = protocol.epochs if epochs is None else epochs
    batch_size = protocol.batch_size if batch_size is None else batch_size
    check_instance("model", model, nn.Module, "an nn.Module")
    check_eval_options(dict(epochs=epochs, batch_size=batch_size, image_size=image_size, resize=resize))
    check_choice("backend", backend, BACKENDS)
    device = check_run_options(device=device, num_workers=num_workers, seed=seed, progress=progress)
    base_lrs = _check_lrs("lrs", protocol.base_lrs(getattr(model, "is_vit", True) is False) if lrs is None else lrs)
    n_last_blocks, avgpool_patches = feature_layout(model, protocol, n_last_blocks=n_last_blocks,
                                                    avgpool_patches=avgpool_patches)
    image_size = image_size or native_image_size(model, default=protocol.image_size)  # check_eval_options refused 0
    resize = resize or max(image_size, round(image_size * protocol.resize / protocol.image_size))
    if resize < image_size:
        raise ValueError(f"resize must be >= image_size ({image_size}), got {resize!r}")

    train_images, val_images, class_counts = aligned_splits(train_dir, val_dir)
    num_classes = len(train_images.classes)
    if protocol.batchnorm:  # a BatchNorm head cannot train on a last batch of one image: drop it then (MAE does)
        check_number(f"batch_size (at most the {len(train_images)} train images with a batchnorm head)", batch_size,
                     high=len(train_images))
    options = dict(batch_size=batch_size, backend=backend, device=str(device), num_workers=num_workers, seed=seed)
    was_training = model.training
    features = ProtocolFeatures(model, n_last_blocks, avgpool_patches).eval()  # the backbone too
    train_loader = val_loader = None
    try:
        train_loader = build_loader(train_images, "linear", shuffle=True, drop_last=protocol.batchnorm,
                                    size=image_size, interpolation=protocol.train_interpolation, **options)
        val_view = ViewSpec(size=image_size, scale=None, resize=resize, interpolation=protocol.val_interpolation,
                            flip_p=0.0)  # the eval recipe, resized with the protocol's interpolation
        val_loader = build_loader(val_images, Recipe("eval", (val_view,), shuffle=False), drop_last=False, **options)
        with torch.no_grad():
            dim = features(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1]
        peak_lrs = [scaled_lr(lr, batch_size, REFERENCE_BATCH) for lr in base_lrs]
        heads = nn.ModuleList(_Head(dim, num_classes, protocol.batchnorm, seed) for _ in base_lrs).to(device).train()
        groups = []  # one per head and tensor, lr_scale its peak lr; SGD decays biases too (torch's SGD, as both
        for head, peak in zip(heads, peak_lrs):  # scripts), fastkd's LARS neither decays nor trust-ratios them
            groups += [{"params": [head.linear.weight], "weight_decay": 1.0, "lr_scale": peak},
                       {"params": [head.linear.bias], "weight_decay": float(protocol.optimizer == "sgd"),
                        "lr_scale": peak}]
        optimizer = build_optimizer(groups, protocol.optimizer, momentum=protocol.momentum)
        cosine = WarmupCosine(peak=1.0, total_steps=max(1, epochs * len(train_loader)))  # x each head's lr_scale

        def head_losses(batch) -> torch.Tensor:  # one CE per head on the same frozen features
            labels = batch.labels.to(device, non_blocking=True)
            with torch.no_grad():
                f = features(batch.views[0].to(device, non_blocking=True)).float()
            return torch.stack([F.cross_entropy(head(f), labels) for head in heads])

        step = 0
        with tqdm(total=epochs * len(train_loader), desc=f"linear {protocol.name}", unit="batch",
                  disable=progress_disable(progress)) as bar:
            for epoch in range(epochs):
                train_loader.set_epoch(epoch)
                train_losses, step = train_epoch(train_loader, head_losses, optimizer,
                                                 lambda t: apply_schedules(optimizer, cosine(t), protocol.weight_decay),
                                                 step, bar)
                bar.set_postfix(epoch=epoch + 1, loss=f"{train_losses.min():.4g}", refresh=False)
        val = extract_features(features, val_loader, device=device, progress=progress, desc="val features")
    finally:
        for loader in (train_loader, val_loader):
            if loader is not None:
                loader.close()
        model.train(was_training)
    classifiers = [head.eval().folded() for head in heads]
    sweep = []
    with torch.no_grad():
        for lr, peak, classifier, loss in zip(base_lrs, peak_lrs, classifiers, train_losses.tolist()):
            top1, top5 = topk_accuracy(classifier(val.features), val.labels)
            sweep.append({"lr": lr, "scaled_lr": peak, "top1": top1, "top5": top5, "train_loss": loss})
    best = max(range(len(sweep)), key=lambda i: (sweep[i]["top1"], sweep[i]["top5"], -i))
    return LinearProtocolResult(
        protocol=protocol.name, **sweep[best], sweep=sweep, feature_dim=dim, n_last_blocks=n_last_blocks,
        avgpool_patches=avgpool_patches, features=features.describe(), epochs=epochs, batch_size=batch_size,
        image_size=image_size, resize=resize, optimizer=protocol.optimizer, num_classes=num_classes,
        class_counts=class_counts, classifier=classifiers[best], classifiers=classifiers,
    )
