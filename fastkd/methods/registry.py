"""Method names -> classes (and their roles), so the trainer and the CLI need no per-method code.

Every :class:`fastkd.methods.base.Method` subclass with a ``name`` registers itself when its module is
imported; :func:`discover` imports every module of ``fastkd.methods`` (so a new method is one new file
in this package, found without editing any other). ``METHODS`` is that registry."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Mapping

from fastkd.checks import check_choice, check_str
from fastkd.methods.base import REGISTRY, ROLES, Method, method_config_from_dict
from fastkd.suggest import did_you_mean

METHODS: dict[str, type[Method]] = REGISTRY


def discover() -> None:
    """Import every module of the ``fastkd.methods`` package: each method class registers itself."""
    import fastkd.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; an unknown name raises ``ValueError`` naming the nearest."""
    check_str("method name", name)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}{did_you_mean(str(name), METHODS)} (known: {', '.join(METHODS)})")
    return METHODS[name]


def method_names(role: str) -> tuple[str, ...]:
    """The registered methods whose ``role`` is ``role`` (``"pretrain"`` or ``"distill"``), sorted by
    name: what ``fastkd pretrain`` / ``fastkd distill`` run."""
    check_choice("role", role, ROLES)
    return tuple(sorted(name for name, cls in METHODS.items() if cls.role == role))


def build_method(name: str, config: Mapping[str, Any]) -> Method:
    """``METHODS[name](ConfigClass(**config))``; unknown config keys raise ``ValueError`` naming
    the nearest valid key."""
    cls = method_class(name)
    return cls(method_config_from_dict(cls.config_class, config))
