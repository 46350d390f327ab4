"""Argument checks shared across fastkd's packages (models, methods, eval, ...).

Each check raises with the argument's name and the offending value, and returns nothing. This
module sits below every package: it imports nothing from fastkd.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterable, Mapping

import torch


def check_positive_ints(**values: object) -> None:
    """Raise ``ValueError`` naming the first argument that is not a positive int."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False) -> None:
    """``value`` is a real number (an int when ``integer``) with ``low <= value <= high`` (``low < value``
    when ``low_open``): ``TypeError`` for the kind, ``ValueError`` for the range."""
    kinds = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_str(name: str, value: Any, *, optional: bool = False) -> None:
    """A non-empty string (or ``None`` when ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string{' or None' if optional else ''}, got {value!r}")


def check_kwargs(name: str, value: Any) -> None:
    """A dict of keyword arguments (str keys)."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"{name} must be a dict of keyword arguments, got {value!r}")


def check_features(name: str, features, labels_name: str, labels) -> None:
    """``features`` is a float ``[N, D]`` tensor and ``labels`` (unless None) an int64 ``[N]`` one."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(f"{name} must be a float tensor [N, D], got "
                         f"{type(features).__name__} {tuple(getattr(features, 'shape', ()))}")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != (features.shape[0],)
                               or labels.dtype != torch.int64):
        raise ValueError(f"{labels_name} must be an int64 tensor [{features.shape[0]}], got "
                         f"{type(labels).__name__} {tuple(getattr(labels, 'shape', ()))} {getattr(labels, 'dtype', '')}")
