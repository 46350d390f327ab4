"""Deprecated aliases of moved or renamed public names.

A module keeps an old name working by assigning a module-level ``__getattr__`` built here; every
access to an old name then warns (``DeprecationWarning`` naming the replacement), whether or not
the module was imported before, and resolves the new object lazily (so an alias adds no import
and no import cycle)::

    # an old module that moved as a whole (the file keeps only these lines)
    __getattr__ = moved_module(__name__, "fastkd.models.weights")

    # old names of a module that stays
    __getattr__ = renamed(__name__, {"config_from_dict": "fastkd.config:run_config_from_dict"})
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Mapping

# "package.module:attribute", or (text naming the replacement, a function computing the value)
Replacement = "str | tuple[str, Callable[[], Any]]"


def _resolve(target: str) -> Any:
    module, _, attribute = target.partition(":")
    value = importlib.import_module(module)
    for part in attribute.split(".") if attribute else ():
        value = getattr(value, part)
    return value


def _warn(old: str, new: str, stacklevel: int) -> None:
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=stacklevel + 1)


def renamed(module: str, names: Mapping[str, Replacement], *,
            fallback: Callable[[str], Any] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``module``: each old name of ``names`` warns and returns its
    replacement; any other name goes to ``fallback`` (default: ``AttributeError``)."""
    names = dict(names)

    def __getattr__(name: str) -> Any:
        if name in names:
            replacement = names[name]
            if isinstance(replacement, str):
                _warn(f"{module}.{name}", replacement.replace(":", "."), 2)
                return _resolve(replacement)
            text, compute = replacement
            _warn(f"{module}.{name}", text, 2)
            return compute()
        if fallback is not None:
            return fallback(name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def moved_module(module: str, new_module: str, names: Mapping[str, Replacement] = {}) -> Callable[[str], Any]:
    """A module ``__getattr__`` making ``module`` a deprecated alias of ``new_module``: every public
    name of the new module (and each of ``names``, for renamed ones) resolves, with a warning."""

    def forward(name: str) -> Any:
        if name.startswith("__") and name != "__all__":  # probes (``__path__``, ``__wrapped__``...)
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target = importlib.import_module(new_module)
        if not hasattr(target, name):
            raise AttributeError(f"module {module!r} (moved to {new_module!r}) has no attribute {name!r}")
        _warn(f"module {module}", new_module, 3)
        return getattr(target, name)

    return renamed(module, names, fallback=forward)
