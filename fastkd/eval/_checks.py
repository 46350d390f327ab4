"""Input checks shared by the evaluation protocols."""

from __future__ import annotations

import torch


def check_features(name: str, features, labels_name: str, labels) -> None:
    """``features`` is a float ``[N, D]`` tensor and ``labels`` (unless None) an int64 ``[N]`` one."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(f"{name} must be a float tensor [N, D], got "
                         f"{type(features).__name__} {tuple(getattr(features, 'shape', ()))}")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != (features.shape[0],)
                               or labels.dtype != torch.int64):
        raise ValueError(f"{labels_name} must be an int64 tensor [{features.shape[0]}], got "
                         f"{type(labels).__name__} {tuple(getattr(labels, 'shape', ()))} {getattr(labels, 'dtype', '')}")
