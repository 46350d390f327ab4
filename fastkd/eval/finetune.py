"""End-to-end fine-tuning top-1 (the DeiT / MAE recipe from timm's parts), the headline metric of MAE-family
papers and of Hybrid Distill.

The Backbone is rebuilt, not modified: ``build_backbone(arch, drop_path_rate, global_pool, img_size)`` (stochastic
depth ``rate_i = drop_path * i / (L - 1)``), the loaded weights copied in (``pos_embed`` resampled), then
``reset_classifier`` with a head ``trunc_normal(std=head_init_std)``, bias 0. Pooling: ``token`` (DeiT) ``logits =
head(norm(tokens)[:, 0])``; ``avg`` (MAE) ``logits = head(fc_norm(mean_{j >= P} tokens_j))`` over patch tokens. timm
puts the norm after the pool only in a model built with ``avg`` (hence the rebuild); as in MAE the final ``norm`` is
dropped and ``fc_norm`` starts at 1, 0, so evaluate such a model as a classifier (:func:`load_finetuned`).

Optimisation (MAE ``main_finetune.py`` / BEiT; DeiT ``main.py``), ``L`` blocks, ``t`` of ``T`` optimizer steps:

- AdamW, weight decay except on 1-D parameters and ``no_weight_decay()``; peak ``lr = blr * B / lr_batch_divisor``;
- layer-wise lr decay ``d``: layer ``l`` trains at ``lr * d^(L + 1 - l)`` (``l = 0`` embeddings, ``l = i``
  block ``i = 1..L``, ``l = L + 1`` ``fc_norm`` and head; the final ``norm`` joins the last block as in
  timm's ``group_matcher``, where MAE's ``lr_decay.py`` would give it ``d^0``);
- ``lr_t = warmup_lr + (lr - warmup_lr) * t / W`` for ``t < W`` (``W`` warm-up steps, at most half the
  run), then ``min_lr + (lr - min_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2``; group lr ``lr_t * scale``;
- mixup (``lam ~ Beta(0.8, 0.8)``, ``x = lam * x_i + (1 - lam) * x_j``) or, with probability ``switch_prob``,
  cutmix (``lam ~ Beta(1, 1)``, a box of area ``1 - lam`` from ``x_j``), ``j`` the flipped batch (even batches),
  on targets ``y = (1 - eps) * onehot + eps / C`` mixed alike; loss ``-sum_c y_c log softmax(z)_c``;
- train ``create_transform(is_training=True)`` (random-resized crop, flip, RandAugment, random erasing, bicubic);
  val resize ``floor(S / crop_pct)`` + centre crop ``S``.

Not reproduced: gradient accumulation, DeiT's repeated augmentation and model EMA, distributed evaluation; the
schedule steps per step, not per epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import default_loader
from tqdm import tqdm

from fastkd.checks import check_choice, check_instance, check_number, check_positive_ints, check_str
from fastkd.data.recipes import INTERPOLATIONS
from fastkd.durable import atomic_write_json, read_torch_file
from fastkd.eval.evaluate import aligned_splits, check_run_options
from fastkd.eval.linear_probe import EvalResult, topk_accuracy, train_epoch
from fastkd.eval.models import native_image_size
from fastkd.models.backbone import Backbone, build_backbone
from fastkd.models.weights import _resize_pos_embed, load_teacher, save_backbone
from fastkd.progress import progress_disable
from fastkd.train.optim import apply_schedules, build_optimizer
from fastkd.train.rng import capture_rng_state, restore_rng_state, seed_everything
from fastkd.train.schedules import WarmupCosine

__all__ = ["FINETUNE_RECIPES", "FinetuneRecipe", "FinetuneResult", "build_finetune_model", "finetune",
           "layer_decay_param_groups", "load_finetuned"]

GLOBAL_POOLS = ("avg", "token")
PRECISIONS = ("fp32", "bf16")
MODEL_FILE = "finetuned.pt"  # what finetune(output=DIR) writes into DIR (save_backbone's fastkd format)
HISTORY_FILE = "finetune.json"


@dataclass(frozen=True)
class FinetuneRecipe:
    """One fine-tuning recipe, checked on construction; ``batch_size`` is the paper's effective batch."""

    name: str
    epochs: int
    batch_size: int
    blr: float
    lr_batch_divisor: int
    min_lr: float
    warmup_epochs: float
    warmup_lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    layer_decay: float
    drop_path: float
    global_pool: str
    head_init_std: float
    auto_augment: str | None
    color_jitter: float | None  # timm disables colour jitter when RandAugment is on
    re_prob: float
    mixup: float
    cutmix: float
    mixup_prob: float
    switch_prob: float
    label_smoothing: float
    crop_pct: float
    interpolation: str = "bicubic"

    def __post_init__(self):
        check_str("name", self.name)
        check_positive_ints(epochs=self.epochs, batch_size=self.batch_size, lr_batch_divisor=self.lr_batch_divisor)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise TypeError(f"betas must be a tuple (beta1, beta2), got {self.betas!r}")
        values = {**vars(self), "betas[0]": self.betas[0], "betas[1]": self.betas[1]}
        for names, bounds in ((("blr", "eps", "head_init_std"), dict(low=0, low_open=True)),
                              (("min_lr", "warmup_epochs", "warmup_lr", "weight_decay", "mixup", "cutmix"),
                               dict(low=0)),
                              (("re_prob", "mixup_prob", "switch_prob"), dict(low=0, high=1)),
                              (("layer_decay", "crop_pct"), dict(low=0, high=1, low_open=True)),
                              (("drop_path", "label_smoothing", "betas[0]", "betas[1]"),
                               dict(low=0, high=1, high_open=True))):
            for name in names:
                check_number(name, values[name], finite=True, **bounds)
        if self.color_jitter is not None:
            check_number("color_jitter", self.color_jitter, low=0, finite=True)
        check_str("auto_augment (a timm policy)", self.auto_augment, optional=True)
        check_choice("global_pool", self.global_pool, GLOBAL_POOLS)
        check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        if self.mixes and self.batch_size % 2:
            raise ValueError(f"batch_size must be even with mixup / cutmix (timm's Mixup pairs each sample with "
                             f"the flipped batch), got {self.batch_size}")

    @property
    def mixes(self) -> bool:
        """Whether mixup or cutmix is on."""
        return self.mixup > 0 or self.cutmix > 0

    @property
    def lr(self) -> float:
        """The peak lr: ``blr * batch_size / lr_batch_divisor``."""
        return self.blr * self.batch_size / self.lr_batch_divisor


FINETUNE_RECIPES = {
    # MAE (He et al., CVPR 2022), ViT-B: FINETUNE.md's command (batch 32 x 32 GPUs, the values below), the rest
    # main_finetune.py defaults; util/lr_sched.py (warm-up from 0, cosine to min_lr), util/datasets.py (crop 224/256).
    "mae": FinetuneRecipe(
        name="mae", epochs=100, batch_size=1024, blr=5e-4, lr_batch_divisor=256, min_lr=1e-6, warmup_epochs=5,
        warmup_lr=0.0, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8,  # torch's AdamW defaults, as MAE uses
        layer_decay=0.65, drop_path=0.1,
        global_pool="avg",  # --global_pool (default True): mean of patch tokens + fc_norm
        head_init_std=2e-5,  # main_finetune.py: trunc_normal_(model.head.weight, std=2e-5)
        auto_augment="rand-m9-mstd0.5-inc1", color_jitter=None, re_prob=0.25, mixup=0.8, cutmix=1.0, mixup_prob=1.0,
        switch_prob=0.5, label_smoothing=0.1, crop_pct=224 / 256,
    ),
    # DeiT (Touvron et al., ICML 2021): Table 9 and main.py defaults; CLS-token head with timm's ViT init.
    "deit": FinetuneRecipe(
        name="deit", epochs=300, batch_size=1024, blr=5e-4, lr_batch_divisor=512, min_lr=1e-5, warmup_epochs=5,
        warmup_lr=1e-6, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, layer_decay=1.0, drop_path=0.1,
        global_pool="token", head_init_std=0.02, auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.3,
        re_prob=0.25, mixup=0.8, cutmix=1.0, mixup_prob=1.0, switch_prob=0.5, label_smoothing=0.1, crop_pct=0.875,
    ),
}


@dataclass
class FinetuneResult(EvalResult):
    """``top1`` / ``top5`` after the last epoch, ``best_*`` of the 1-based ``best_epoch``; ``history``: per-epoch
    scores (``lr`` of the peak group); ``recipe_values``: the recipe as run (``new_parameters``: keys not loaded)."""

    best_top1: float
    best_top5: float
    best_epoch: int
    history: list[dict]
    recipe: str
    recipe_values: dict
    image_size: int
    num_classes: int
    classes: tuple[str, ...]
    model: nn.Module | None = field(default=None, repr=False)
    model_file: str | None = None


def _classifier_prefix(net: nn.Module) -> str:
    """The timm classifier's module name (``head`` for ViTs, ``fc`` for ResNets)."""
    return getattr(net, "pretrained_cfg", {}).get("classifier", "head")


def build_finetune_model(model: nn.Module, num_classes: int, *, global_pool: str = "avg", drop_path: float = 0.1,
                         image_size: int | None = None, head_init_std: float = 2e-5) -> Backbone:
    """A trainable copy of ``model`` with a ``num_classes`` classifier (module doc), head from torch's global RNG."""
    _check_model(model, image_size=image_size, global_pool=global_pool)
    check_positive_ints(num_classes=num_classes)
    check_number("drop_path", drop_path, low=0, high=1, high_open=True, finite=True)
    check_number("head_init_std", head_init_std, low=0, low_open=True, finite=True)
    kwargs = {**model.timm_kwargs, "drop_path_rate": float(drop_path)}
    if model.is_vit:
        kwargs.update(global_pool=global_pool, img_size=image_size or native_image_size(model))
    copy = build_backbone(model.name, attention=model.attention, checkpointing=model.checkpointing, **kwargs)
    # the loaded weights, pos_embed resampled, all but the head and the pooling's final norm (norm / fc_norm)
    net, head = copy.model, f"{_classifier_prefix(copy.model)}."
    target = net.state_dict()
    state = _resize_pos_embed({k: v for k, v in model.model.state_dict().items() if not k.startswith(head)}, copy)
    odd = [k for k in set(state) ^ set(target) if not k.startswith(("norm.", "fc_norm.", head))]
    assert not odd, f"the loaded model and its rebuilt copy ({model.name}) differ in keys {sorted(odd)[:20]}"
    net.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    copy.model.reset_classifier(num_classes, global_pool)
    trunc_normal_(copy.model.get_classifier().weight, std=head_init_std)
    nn.init.zeros_(copy.model.get_classifier().bias)
    return copy.to(next(model.parameters()).device).train()


def layer_decay_param_groups(model: nn.Module, *, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's ``param_groups_layer_decay``: ``lr_scale = layer_decay ** (L + 1 - layer)``, no decay on 1-D
    parameters and ``no_weight_decay()`` names."""
    check_number("weight_decay", weight_decay, low=0, finite=True)
    check_number("layer_decay", layer_decay, low=0, high=1, low_open=True, finite=True)
    net = model.model if isinstance(model, Backbone) else model
    no_decay = tuple(net.no_weight_decay()) if hasattr(net, "no_weight_decay") else ()
    return param_groups_layer_decay(net, weight_decay=weight_decay, no_weight_decay_list=no_decay,
                                    layer_decay=layer_decay)


def load_finetuned(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Backbone:
    """The frozen classifier :func:`finetune` saved (file or folder); ``model.model(images)`` gives logits."""
    path = Path(path) / MODEL_FILE if Path(path).is_dir() else Path(path)
    state = read_torch_file(path)
    model = head = None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict) and "arch" in state:
        model = load_teacher(state["arch"], path, frozen=False)
        prefix = f"{_classifier_prefix(model.model)}."
        head = {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    if not head or "weight" not in head:
        raise ValueError(f"{str(path)!r} is not a fine-tuned model: a file of fastkd's save_backbone with a classifier")
    model.model.reset_classifier(int(head["weight"].shape[0]))
    model.model.get_classifier().load_state_dict(head)
    return model.to(device).eval().requires_grad_(False)


class _ImageDataset(Dataset):
    """``(transform(image), label)`` for an :class:`fastkd.data.ImageList`, read as ``ImageFolder`` does."""

    def __init__(self, images, transform):
        self.files, self.labels, self.transform = images.files, images.labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        return self.transform(default_loader(self.files[index])), self.labels[index]


def _loaders(train_images, val_images, recipe: FinetuneRecipe, image_size: int, num_workers: int, seed: int,
             device: torch.device) -> tuple[DataLoader, DataLoader]:
    train_transform = create_transform(
        image_size, is_training=True, auto_augment=recipe.auto_augment, color_jitter=recipe.color_jitter,
        re_prob=recipe.re_prob, re_mode="pixel", re_count=1, interpolation=recipe.interpolation)
    val_transform = create_transform(image_size, is_training=False, interpolation=recipe.interpolation,
                                     crop_pct=recipe.crop_pct)
    common = dict(batch_size=recipe.batch_size, num_workers=num_workers, pin_memory=device.type == "cuda",
                  persistent_workers=num_workers > 0)
    train = DataLoader(_ImageDataset(train_images, train_transform), shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(seed), **common)
    return train, DataLoader(_ImageDataset(val_images, val_transform), shuffle=False, **common)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed Python's, NumPy's (timm's Mixup and augmentations) and torch's generators; restore them after."""
    if device.type == "cuda":
        torch.cuda.init()  # else capture_rng_state, finding CUDA uninitialised, would leave its generators seeded
    state = capture_rng_state()
    seed_everything(seed)
    try:
        yield
    finally:
        restore_rng_state(state)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def _evaluate(net: nn.Module, loader: DataLoader, *, device, precision: str) -> dict:
    """Val ``loss`` (cross-entropy), ``top1`` / ``top5`` in percent."""
    net.eval()
    loss = top1 = top5 = count = 0
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with _autocast(device, precision):
            logits = net(images).float()
        acc1, acc5 = topk_accuracy(logits, targets)
        loss += F.cross_entropy(logits, targets, reduction="sum").item()
        top1, top5, count = top1 + acc1 * len(targets), top5 + acc5 * len(targets), count + len(targets)
    return {"val_loss": loss / count, "top1": top1 / count, "top5": top5 / count}


def _optimizer_and_schedule(model: Backbone, recipe: FinetuneRecipe, steps_per_epoch: int):
    """``(AdamW, schedule(step) setting lr and weight decay, warmup_epochs capped at half the run)``."""
    groups = layer_decay_param_groups(model, weight_decay=1.0, layer_decay=recipe.layer_decay)  # decay: 1 or 0
    optimizer = build_optimizer(groups, "adamw", betas=recipe.betas, eps=recipe.eps)
    total = recipe.epochs * steps_per_epoch
    warmup_epochs = min(recipe.warmup_epochs, recipe.epochs / 2)
    cosine = WarmupCosine(peak=recipe.lr, total_steps=total, start=recipe.warmup_lr, end=recipe.min_lr,
                          warmup_steps=min(round(warmup_epochs * steps_per_epoch), total - 1))
    return optimizer, lambda step: apply_schedules(optimizer, cosine(step), recipe.weight_decay), warmup_epochs


def _check_model(model: nn.Module, *, image_size: int | None, global_pool: str) -> None:
    check_instance("model", model, Backbone, "a fastkd Backbone (what load_eval_model returns for backbone files "
                   "and runs' students)")
    check_choice("global_pool", global_pool, GLOBAL_POOLS)
    if not model.is_vit and global_pool != "avg":
        raise ValueError(f"global_pool must be 'avg' for the ResNet {model.name}, got {global_pool!r}")
    if image_size is not None:
        check_positive_ints(image_size=image_size)
        if model.is_vit and image_size % model.patch_size:
            raise ValueError(f"image_size must be a multiple of the patch size {model.patch_size} of {model.name}, "
                             f"got {image_size}")


def resolve_finetune_recipe(recipe, **overrides) -> FinetuneRecipe:
    """The recipe (a name or a :class:`FinetuneRecipe`) with the non-None overrides applied and checked."""
    if not isinstance(recipe, FinetuneRecipe):
        check_choice("recipe", recipe, FINETUNE_RECIPES)
        recipe = FINETUNE_RECIPES[recipe]
    return dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})


def finetune(model: nn.Module, train_dir: str | os.PathLike, val_dir: str | os.PathLike,
             recipe: str | FinetuneRecipe = "mae", *, epochs: int | None = None, batch_size: int | None = None,
             blr: float | None = None, layer_decay: float | None = None, drop_path: float | None = None,
             image_size: int | None = None, global_pool: str | None = None, precision: str = "fp32",
             device: str | torch.device = "cpu", num_workers: int = 2, seed: int = 0,
             output: str | os.PathLike | None = None, progress: bool = True) -> FinetuneResult:
    """Fine-tune a copy of ``model`` on the ImageFolder ``train_dir``, scoring ``val_dir`` every epoch; keyword
    options override ``recipe``'s fields; ``output``: a folder for ``finetuned.pt`` and ``finetune.json``."""
    recipe = resolve_finetune_recipe(recipe, epochs=epochs, batch_size=batch_size, blr=blr, layer_decay=layer_decay,
                                     drop_path=drop_path, global_pool=global_pool)
    device = check_run_options(device=device, num_workers=num_workers, seed=seed, progress=progress)
    check_choice("precision", precision, PRECISIONS)
    if output is not None and (not isinstance(output, (str, os.PathLike)) or Path(output).is_file()):
        raise ValueError(f"output must be a folder path or None, got {output!r}")
    _check_model(model, image_size=image_size, global_pool=recipe.global_pool)
    image_size = image_size or native_image_size(model)

    train_images, val_images, class_counts = aligned_splits(train_dir, val_dir)
    if len(train_images) < recipe.batch_size:
        raise ValueError(f"batch_size {recipe.batch_size} exceeds the {len(train_images)} train images: with "
                         "drop_last (even batches for mixup) no batch would be left; give a smaller batch_size")
    num_classes = len(train_images.classes)

    with _seeded(seed, device):
        net = build_finetune_model(model, num_classes, global_pool=recipe.global_pool, drop_path=recipe.drop_path,
                                   image_size=image_size, head_init_std=recipe.head_init_std).to(device)
        new_parameters = sorted(set(net.model.state_dict()) - set(model.model.state_dict()))
        train_loader, val_loader = _loaders(train_images, val_images, recipe, image_size, num_workers, seed, device)
        optimizer, schedule, warmup_epochs = _optimizer_and_schedule(net, recipe, len(train_loader))
        mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mixup_prob,
                      switch_prob=recipe.switch_prob, mode="batch", label_smoothing=recipe.label_smoothing,
                      num_classes=num_classes) if recipe.mixes else None
        criterion = (SoftTargetCrossEntropy() if mixup is not None else  # soft-target CE on mixed, smoothed targets
                     LabelSmoothingCrossEntropy(smoothing=recipe.label_smoothing) if recipe.label_smoothing > 0
                     else nn.CrossEntropyLoss())

        def loss_of(batch) -> torch.Tensor:
            images, targets = (t.to(device, non_blocking=True) for t in batch)
            if mixup is not None:
                images, targets = mixup(images, targets)
            with _autocast(device, precision):
                logits = net.model(images)
            loss = criterion(logits.float(), targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning loss is {loss.item()} at epoch {epoch}")
            return loss

        history, step = [], 0
        with tqdm(total=recipe.epochs * len(train_loader), desc="fine-tune", unit="batch",
                  disable=progress_disable(progress)) as bar:
            for epoch in range(1, recipe.epochs + 1):
                start = time.perf_counter()
                net.train()
                train_loss, step = train_epoch(train_loader, loss_of, optimizer, schedule, step, bar)
                scores = _evaluate(net.model, val_loader, device=device, precision=precision)
                history.append({"epoch": epoch, "lr": max(g["lr"] for g in optimizer.param_groups),
                                "train_loss": float(train_loss), **scores, "seconds": time.perf_counter() - start})
    net.eval().requires_grad_(False)

    best = max(history, key=lambda h: h["top1"])
    values = {**dataclasses.asdict(recipe), "betas": list(recipe.betas), "lr": recipe.lr, "precision": precision,
              "warmup_epochs": warmup_epochs, "seed": seed, "new_parameters": new_parameters}
    result = FinetuneResult(
        top1=history[-1]["top1"], top5=history[-1]["top5"], best_top1=best["top1"], best_top5=best["top5"],
        best_epoch=best["epoch"], history=history, recipe=recipe.name, recipe_values=values,
        image_size=image_size, num_classes=num_classes, classes=tuple(train_images.classes),
        class_counts=class_counts, model=net)
    if output is not None:
        result.model_file = str(save_backbone(net, Path(output) / MODEL_FILE))
        atomic_write_json(Path(output) / HISTORY_FILE, result.to_dict())
    return result
