"""When a public op runs its plain PyTorch reference instead of its fused kernel.

Inside ``with reference_ops():`` the public op functions (``feature_align``, ``token_relation``,
``gather_tokens``, ``ema_``) call their ``*_reference`` implementations instead of the fused
kernels. The end-to-end benchmark uses it to time each method "assembled from plain PyTorch
parts" on the same models, batch and data; tests use it to compare whole methods.

The CPU size rule: a CPU problem smaller than :data:`CPU_REFERENCE_BELOW` runs the reference too
(with autocast off, so the op's dtype contract holds), because there the fused C++ kernel's fixed
cost (custom-op dispatch, an autograd node, thread start-up) is more than the unfused ops cost.
Crossovers measured forward + backward, fp32, on the 2-core AMD EPYC development VM (reference
time / fused time):

- ``feature_align`` (student elements): 0.50 at 6 144, 0.81 at 98 304, 2.24 at 602 112;
- ``gather_tokens`` (output elements ``B*K*D``): 0.78 at 24 576, 0.85 at 67 584, 1.64 at 196 608;
- ``token_relation`` (relation map elements ``B*H*N*N``): 0.76 at 55 488 (N = 17), 0.90 at
  209 088, 1.19 at 811 200.

``with fused_kernels_always():`` turns the rule off (the op tests use it to exercise the kernels
on small inputs). CUDA inputs always take the kernels.
"""

from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()

# op -> size below which a CPU input runs the reference (see the module docstring for the measure)
CPU_REFERENCE_BELOW = {"feature_align": 2**18, "gather_tokens": 2**17, "token_relation": 2**19}


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


@contextlib.contextmanager
def fused_kernels_always(enabled: bool = True):
    """Turn the CPU size rule off while the block runs: every size takes the fused kernel."""
    previous = getattr(_state, "kernels_always", False)
    _state.kernels_always = bool(enabled)
    try:
        yield
    finally:
        _state.kernels_always = previous


def small_on_cpu(op: str, device: torch.device, size: int) -> bool:
    """Whether op ``op`` with size measure ``size`` on ``device`` runs its reference by the CPU
    size rule (a CPU device, below :data:`CPU_REFERENCE_BELOW`, outside ``fused_kernels_always()``)."""
    return device.type == "cpu" and not getattr(_state, "kernels_always", False) and size < CPU_REFERENCE_BELOW[op]


def cpu_reference(function, *args, **kwargs):
    """``function(*args, **kwargs)`` (an op's reference) with CPU autocast off, as the op runs."""
    with torch.autocast("cpu", enabled=False):
        return function(*args, **kwargs)
