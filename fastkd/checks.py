"""Argument checks shared across fastkd's packages (models, methods, eval, ...).

Each check raises with the argument's name and the offending value, and returns nothing. This
module sits below every package: it imports nothing from fastkd.
"""

from __future__ import annotations

import math
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
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 finite: bool = False) -> None:
    """``value`` is a real number (an int when ``integer``) with ``low <= value <= high`` (``low < value``
    when ``low_open``, ``value < high`` when ``high_open``), never NaN, and finite when ``finite``:
    ``TypeError`` for the kind, ``ValueError`` for the range."""
    kinds = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if not isinstance(value, numbers.Integral) and (math.isnan(value) or (finite and math.isinf(value))):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_str(name: str, value: Any, *, optional: bool = False, empty: bool = False) -> None:
    """A non-empty string (an empty one too when ``empty``; or ``None`` when ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not (value or empty):
        raise TypeError(f"{name} must be a {'' if empty else 'non-empty '}string{' or None' if optional else ''}, "
                        f"got {value!r}")


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


def check_train_test_features(train_features, train_labels, test_features, test_labels) -> None:
    """:func:`check_features` on the train and the test side, and both feature sets of one width."""
    check_features("train_features", train_features, "train_labels", train_labels)
    check_features("test_features", test_features, "test_labels", test_labels)
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train_features and test_features differ in width: {train_features.shape[1]} vs "
                         f"{test_features.shape[1]}")


def check_embedding_pair(first_name: str, first: Any, second_name: str, second: Any) -> None:
    """Two non-empty floating-point ``[B, C]`` tensors of one shape on one device (e.g. a loss's
    query and key embeddings): ``TypeError`` for a non-tensor or an integer dtype, ``ValueError``
    for the shapes or devices."""
    for name, t in ((first_name, first), (second_name, second)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty [B, C] tensor, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if first.shape != second.shape:
        raise ValueError(f"{first_name} and {second_name} must have the same shape, got {tuple(first.shape)} and "
                         f"{tuple(second.shape)}")
    if first.device != second.device:
        raise ValueError(f"{first_name} and {second_name} must be on one device, got {first.device} and "
                         f"{second.device}")



def check_shape(name: str, value: Any, shape: tuple, *, dtype: torch.dtype | None = None) -> None:
    """``value`` is a tensor of ``shape`` (and ``dtype`` when given): an int entry is that size, a str
    one any size (its label, e.g. ``"B"``), a leading ``...`` any leading dimensions. ``ValueError``
    naming ``name``, the shape wanted and the one given."""
    fixed = shape[1:] if shape[:1] == (...,) else shape
    got = tuple(value.shape) if isinstance(value, torch.Tensor) else None
    ok = got is not None and (len(got) >= len(fixed) if fixed is not shape else len(got) == len(fixed))
    ok = ok and all(isinstance(want, str) or size == want for size, want in zip(got[len(got) - len(fixed):], fixed))
    if not ok or (dtype is not None and value.dtype != dtype):
        wanted = ", ".join("..." if d is ... else str(d) for d in shape)
        given = type(value).__name__ if got is None else f"{got} {value.dtype}"
        raise ValueError(f"{name} must be a tensor [{wanted}]{'' if dtype is None else f' of {dtype}'}, got {given}")


def check_instance(name: str, value: Any, kinds: type | tuple[type, ...], what: str) -> None:
    """``TypeError`` unless ``value`` is an instance of ``kinds``; ``what`` names them (``"a path or an ImageList"``)."""
    if not isinstance(value, kinds):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
