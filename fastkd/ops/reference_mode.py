"""A switch that routes every fused op to its plain PyTorch reference.

Inside ``with reference_ops():`` the public op functions (``feature_align``, ``token_relation``,
``gather_tokens``, ``ema_``) call their ``*_reference`` implementations instead of the fused
kernels. The end-to-end benchmark uses it to time each method "assembled from plain PyTorch
parts" on the same models, batch and data; tests use it to compare whole methods.
"""

from __future__ import annotations

import contextlib
import threading

_state = threading.local()


def reference_ops_enabled() -> bool:
    """True inside a ``reference_ops()`` block on this thread."""
    return getattr(_state, "enabled", False)


@contextlib.contextmanager
def reference_ops(enabled: bool = True):
    """Route fastkd's public ops to their plain PyTorch references while the block runs."""
    previous = reference_ops_enabled()
    _state.enabled = bool(enabled)
    try:
        yield
    finally:
        _state.enabled = previous
