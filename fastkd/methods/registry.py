"""Method names -> classes (and their roles), so the trainer and the CLI need no per-method code."""

from __future__ import annotations

from typing import Any, Mapping

from fastkd.methods.base import ROLES, Method, method_config_from_dict
from fastkd.methods.hybrid_distill import HybridDistill
from fastkd.methods.mae import MAE
from fastkd.methods.mocov3 import MoCoV3
from fastkd.methods.moma import MOMA
from fastkd.methods.mokd import MOKD
from fastkd.methods.resmoco import ResMoCo
from fastkd.suggest import did_you_mean

METHODS: dict[str, type[Method]] = {
    "moma": MOMA,
    "hybrid_distill": HybridDistill,
    "resmoco": ResMoCo,
    "mokd": MOKD,
    "mocov3": MoCoV3,
    "mae": MAE,
}


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; an unknown name raises ``ValueError`` naming the nearest."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a method name (str), got {type(name).__name__}")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}{did_you_mean(name, METHODS)} (known: {', '.join(METHODS)})")
    return METHODS[name]


def method_names(role: str) -> tuple[str, ...]:
    """The registered methods whose ``role`` is ``role`` (``"pretrain"`` or ``"distill"``), in
    registration order: what ``fastkd pretrain`` / ``fastkd distill`` run."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return tuple(name for name, cls in METHODS.items() if cls.role == role)


def build_method(name: str, config: Mapping[str, Any]) -> Method:
    """``METHODS[name](ConfigClass(**config))``; unknown config keys raise ``ValueError`` naming
    the nearest valid key."""
    cls = method_class(name)
    return cls(method_config_from_dict(cls.config_class, config))
