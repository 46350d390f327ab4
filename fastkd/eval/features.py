"""Frozen-feature extraction for evaluation, with an on-disk cache: ``extract_features(model, loader)``
runs ``model(batch.views[0])`` (a backbone's global feature ``[B, D]``) over every batch, no grad, in
eval mode, and returns the features in dataset-index order."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from fastkd.checks import check_instance
from fastkd.durable import atomic_torch_save
from fastkd.progress import progress_disable


@dataclass
class FeatureSet:
    """``features`` ``[N, D]`` float32 on CPU, ``labels`` ``[N]`` int64, ``indices`` ``[N]``
    (dataset indices, ascending)."""

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
    """Features of every image the loader yields (one pass, ``model.eval()``; the mode is restored).
    ``progress``, ``desc``: the progress bar (see :func:`fastkd.progress.progress_disable`)."""
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
    """``compute()`` (a callable returning a :class:`FeatureSet`), stored at ``cache``; a later
    call with the same path loads the file instead. ``cache=None`` always computes."""
    if cache is None:
        return compute()
    cache = Path(cache)
    if cache.is_file():
        return FeatureSet(**torch.load(cache, map_location="cpu", weights_only=True))
    result = compute()
    atomic_torch_save(vars(result), cache)
    return result
