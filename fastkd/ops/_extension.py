"""Loads the native extension ``fastkd._C`` once. Importing it registers its C++/CUDA ops as
``torch.ops.fastkd.*``; when it was not built, :func:`load` returns None and callers fall back."""

from __future__ import annotations

import functools
from types import ModuleType


@functools.lru_cache(maxsize=None)
def load() -> ModuleType | None:
    """The ``fastkd._C`` module, or None when the extension is not built (or fails to load)."""
    try:
        import torch  # noqa: F401 - libtorch must be loaded before the extension

        from fastkd import _C
    except ImportError:
        return None
    return _C


def build_info() -> dict:
    """How ``fastkd._C`` was built (``version``, ``torch``, ``cpu_isa``, ``cpu_isa_supported`` by this CPU,
    ``openmp``, ``cuda``, ``cuda_archs``); ``{"built": False}`` when it is missing."""
    module = load()
    if module is None:
        return {"built": False}
    return {"built": True, **module.build_info()}
