"""Frozen-feature extraction and the k-NN and linear-probe evaluation of a model on two ImageFolder splits (train:
memory bank / probe training set, val: scored). Features are ``model(batch.views[0])`` ``[B, D]`` of the ``eval``
recipe, in dataset-index order, optionally cached as ``<cache_dir>/<cache_key>-<split>.pt`` (a linear probe after
a k-NN run re-uses them). Val classes are matched to train classes by name (:func:`aligned_splits`)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from fastkd.checks import check_bool, check_instance, check_number, check_positive_ints
from fastkd.data import ImageList, build_loader, load_images
from fastkd.durable import atomic_torch_save
from fastkd.eval.knn import KNNResult, knn_classify
from fastkd.eval.linear_probe import LinearProbeResult, train_linear_probe
from fastkd.progress import progress_disable


@dataclass
class FeatureSet:
    """``features [N, D]`` float32 on CPU, ``labels [N]`` int64, ``indices [N]`` (dataset indices, ascending)."""

    features: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


def model_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model(images)``, which must be features ``[B, D]`` (ValueError otherwise)."""
    output = model(images)
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != images.shape[0]:
        raise ValueError(f"model(images) must return features [B, D] for images {tuple(images.shape)}, "
                         f"got {type(output).__name__} {tuple(getattr(output, 'shape', ()))}")
    return output


@torch.no_grad()
def extract_features(model: nn.Module, loader, *, device: str | torch.device | None = None,
                     autocast_dtype: torch.dtype | None = None, progress: bool = True,
                     desc: str = "features") -> FeatureSet:
    """Features of every image the loader yields (one pass in eval mode; the mode is restored)."""
    check_instance("model", model, nn.Module, "an nn.Module")
    device = torch.device(device if device is not None else next(model.parameters(), torch.empty(0)).device)
    was_training = model.training
    model.eval()
    features, labels, indices = [], [], []
    try:
        total = len(loader) if hasattr(loader, "__len__") else None
        for batch in tqdm(loader, total=total, desc=desc, unit="batch", disable=progress_disable(progress)):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                output = model_features(model, batch.views[0].to(device, non_blocking=True))
            features.append(output.float().cpu())
            labels.append(batch.labels.cpu().long())
            indices.append(batch.indices.cpu().long())
    finally:
        model.train(was_training)
    if not features:
        raise ValueError("the loader yielded no batch: nothing to evaluate")
    index = torch.cat(indices)
    order = index.argsort()
    return FeatureSet(torch.cat(features)[order], torch.cat(labels)[order], index[order])


def cached_features(cache: str | os.PathLike | None, compute) -> FeatureSet:
    """``compute()``, stored at ``cache`` (None: not stored); a later call with the same path loads the file."""
    if cache is not None and Path(cache).is_file():
        return FeatureSet(**torch.load(cache, map_location="cpu", weights_only=True))
    result = compute()
    if cache is not None:
        atomic_torch_save(vars(result), cache)
    return result


# option -> (lower bound, bound included, None allowed); ints are the options with an int bound
_NUMERIC_OPTIONS = {"k": (1, True, False), "temperature": (0.0, False, False), "epochs": (1, True, False),
                    "lr": (0.0, True, False), "weight_decay": (0.0, True, False), "probe_batch_size": (1, True, False),
                    "batch_size": (1, True, False), "num_workers": (0, True, False), "image_size": (1, True, True),
                    "resize": (1, True, True)}


def check_eval_options(options: dict, *, cli: bool = False) -> None:
    """ValueError naming the first option of ``_NUMERIC_OPTIONS`` out of its range (others ignored); ``cli`` names
    them as command-line options (``--probe-batch-size``)."""
    for name, value in options.items():
        low, inclusive, optional = _NUMERIC_OPTIONS.get(name, (None, True, True))
        if low is None or value is None and optional:
            continue
        integer = isinstance(low, int)  # the int options' bounds are all inclusive
        ok = (isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
              and (integer or math.isfinite(value)) and (value >= low if inclusive else value > low))
        expected = f"an integer >= {low}" if integer else f"a finite number {'>=' if inclusive else '>'} {low:g}"
        if not ok:
            raise ValueError(f"{'--' + name.replace('_', '-') if cli else name} must be {expected}, got {value!r}")


def check_run_options(*, device, num_workers, seed, progress) -> torch.device:
    """Check the run options of the fine-tune and linear-protocol evaluations; returns the device."""
    check_eval_options(dict(num_workers=num_workers))
    check_number("seed", seed, low=0, integer=True)
    check_bool("progress", progress)
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda") or parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device must be cpu or an available cuda device, got {device!r}")
    return parsed


def default_resize(image_size: int) -> int:
    """The shorter-side resize before a centre crop of ``image_size``: ``round(image_size * 256 / 224)``."""
    return round(image_size * 256 / 224)


def split_features(model: nn.Module, source, *, image_size: int = 224, resize: int | None = None,
                   batch_size: int = 64, backend: str = "auto", num_workers: int = 2,
                   device: str | torch.device = "cpu", cache: str | os.PathLike | None = None,
                   desc: str = "features") -> FeatureSet:
    """Features of every image of the ImageFolder / file list ``source`` (cached at ``cache``)."""
    check_positive_ints(image_size=image_size)
    resize = resize if resize is not None else default_resize(image_size)

    def compute() -> FeatureSet:
        loader = build_loader(source, "eval", batch_size=batch_size, backend=backend, device=str(device),
                              drop_last=False, num_workers=num_workers, size=image_size, resize=resize)
        try:
            return extract_features(model, loader, device=device, desc=desc)
        finally:
            loader.close()

    return cached_features(cache, compute)


def aligned_splits(train_source, val_source):
    """``(train, val, {"train" | "val": {class: images}})``, val labels mapped onto train's by class name; raises
    ValueError naming every val class (with images) the train split lacks."""
    train, val = load_images(train_source), load_images(val_source)
    index = {name: label for label, name in enumerate(train.classes)}
    val_names = [val.classes[label] for label in val.labels]
    missing = sorted(set(val_names) - set(index))
    if missing:
        shown = ", ".join(map(repr, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ValueError(f"the val split {str(val_source)!r} has classes the train split {str(train_source)!r} "
                         f"lacks: {shown}; an evaluation can only score classes it was trained or indexed on")
    val = ImageList(val.files, tuple(index[name] for name in val_names), train.classes, val.root)
    counts = {split: dict(sorted(Counter(images.classes[label] for label in images.labels).items()))
              for split, images in (("train", train), ("val", val))}
    return train, val, counts


def _both_splits(model, train_source, val_source, cache_dir, cache_key, loader_options,
                 **numeric) -> tuple[FeatureSet, FeatureSet, dict]:
    """Both splits' features (``numeric``: the evaluation's own options, checked with the loader's first)."""
    check_eval_options({**numeric, **loader_options})  # before extracting anything
    if cache_dir is not None and not cache_key:
        raise ValueError("cache_key is required with cache_dir (it names the model whose features are cached)")
    train_images, val_images, counts = aligned_splits(train_source, val_source)
    caches = [None, None] if cache_dir is None else [Path(cache_dir) / f"{cache_key}-{s}.pt" for s in ("train", "val")]
    return (split_features(model, train_images, cache=caches[0], desc="train features", **loader_options),
            split_features(model, val_images, cache=caches[1], desc="val features", **loader_options), counts)


def evaluate_knn(model: nn.Module, train_source, val_source, *, k: int = 20, temperature: float = 0.07,
                 cache_dir: str | os.PathLike | None = None, cache_key: str | None = None,
                 **loader_options) -> KNNResult:
    """Weighted k-NN accuracy of ``model``'s features (train split as memory bank)."""
    train, val, counts = _both_splits(model, train_source, val_source, cache_dir, cache_key, loader_options, k=k,
                                      temperature=temperature)
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    result = knn_classify(train.features, train.labels, val.features, val.labels, num_classes=num_classes,
                          k=k, temperature=temperature)
    return dataclasses.replace(result, class_counts=counts)


def evaluate_linear(model: nn.Module, train_source, val_source, *, epochs: int = 100, lr: float = 0.1,
                    weight_decay: float = 0.0, probe_batch_size: int = 256,
                    cache_dir: str | os.PathLike | None = None, cache_key: str | None = None,
                    **loader_options) -> LinearProbeResult:
    """Linear-probe accuracy of ``model``'s frozen features."""
    train, val, counts = _both_splits(model, train_source, val_source, cache_dir, cache_key, loader_options,
                                      epochs=epochs, lr=lr, weight_decay=weight_decay,
                                      probe_batch_size=probe_batch_size)
    result = train_linear_probe(train.features, train.labels, val.features, val.labels, epochs=epochs, lr=lr,
                                weight_decay=weight_decay, batch_size=probe_batch_size)
    return dataclasses.replace(result, class_counts=counts)
