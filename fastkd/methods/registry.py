"""Method names -> classes (and their roles): every named :class:`fastkd.methods.base.Method`
subclass registers itself on import and :func:`discover` imports every module of ``fastkd.methods``,
so a new method is one new file in this package. ``METHODS`` is that registry."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Mapping

from fastkd.checks import check_choice, check_str
from fastkd.methods.base import REGISTRY, ROLES, Method, check_known, method_config_from_dict
from fastkd.models.linear import adopt_measured_linear

METHODS: dict[str, type[Method]] = REGISTRY


def discover() -> None:
    """Import every module of the ``fastkd.methods`` package: each method class registers itself."""
    import fastkd.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; an unknown name raises ``ValueError`` naming the nearest."""
    check_str("method name", name)
    check_known("method", [name], list(METHODS))
    return METHODS[name]


def method_names(role: str) -> tuple[str, ...]:
    """The registered methods whose ``role`` is ``role`` (``"pretrain"`` or ``"distill"``), sorted by
    name: what ``fastkd pretrain`` / ``fastkd distill`` run."""
    check_choice("role", role, ROLES)
    return tuple(sorted(name for name, cls in METHODS.items() if cls.role == role))


def build_method(name: str, config: Mapping[str, Any]) -> Method:
    """``METHODS[name](ConfigClass(**config))`` with its linear layers made
    :class:`fastkd.models.linear.MeasuredLinear`; unknown config keys raise ``ValueError`` naming
    the nearest valid key."""
    cls = method_class(name)
    return adopt_measured_linear(cls(method_config_from_dict(cls.config_class, config)))
