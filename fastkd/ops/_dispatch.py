"""Where a fastkd op decides what runs: the kernel ``torch.ops.fastkd.<op>`` of ``fastkd._C`` (C++ CPU kernel and
autograd in ``csrc/``; CUDA: the Triton launcher of :func:`register`, or for ``ema_`` fastkd._C's own) or the
op's PyTorch ``*_reference``. The public op validates its arguments once and calls :meth:`Route.run`:

=======================  ==============================================================================
inputs                   what runs
=======================  ==============================================================================
CUDA, fp16/bf16/fp32     the kernel (Triton), unless the op's ``gpu_limit`` refuses the size (then the
                         reference, silently)
CUDA, float64            the reference
CPU                      the kernel (C++), at every size
anything else            the reference
``reference_ops()``      the reference, for every input
=======================  ==============================================================================

A missing kernel (extension not built, ``ema_`` without CUDA, a CPU ISA this CPU lacks) runs the reference with
one ``RuntimeWarning`` per op and reason. Kernels and the fallback run with autocast off (CUDA kernels with the
inputs' device current); inside ``reference_ops()`` the reference runs under the active autocast.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from fastkd.ops._extension import build_info, load

__all__ = ["Route", "implementation_context", "native_op", "reference_ops", "reference_ops_enabled", "register"]


class _State(threading.local):
    enabled = False  # inside reference_ops() on this thread


_state = _State()
_warned: set[tuple[str, str]] = set()


def reference_ops_enabled() -> bool:
    """True inside a ``reference_ops()`` block on this thread."""
    return _state.enabled


@contextlib.contextmanager
def reference_ops(enabled: bool = True):
    """Route fastkd's public ops to their PyTorch references while the block runs."""
    previous = reference_ops_enabled()
    _state.enabled = bool(enabled)
    try:
        yield
    finally:
        _state.enabled = previous


def _warn_once(op: str, reason: str) -> None:
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"fastkd.ops.{op}: {reason}; using its PyTorch reference", RuntimeWarning, stacklevel=4)


@torch.compiler.assume_constant_result
def _missing_native(name: str, device_type: str) -> str | None:
    """Why ``torch.ops.fastkd.<name>`` cannot run on ``device_type`` here, or None (a constant to compile)."""
    return _missing_native_cached(name, device_type)


@functools.lru_cache(maxsize=None)
def _missing_native_cached(name: str, device_type: str) -> str | None:
    if load() is None:
        return "the native extension fastkd._C is not built"
    info = build_info()
    if not hasattr(torch.ops.fastkd, name):
        return f"fastkd._C has no kernel {name}"
    if device_type == "cuda" and name == "ema_" and not info["cuda"]:
        return "fastkd._C was built without its CUDA sources"
    if device_type == "cpu" and not info["cpu_isa_supported"]:
        return (f"fastkd._C was compiled for the {info['cpu_isa']} instruction set, which this CPU lacks "
                "(rebuild with FASTKD_CPU_ISA=AVX2 or DEFAULT)")
    return None


def native_op(name: str, device_type: str = "cpu") -> Callable | None:
    """``torch.ops.fastkd.<name>`` when it can run on ``device_type`` here, else None."""
    return None if _missing_native(name, device_type) else getattr(torch.ops.fastkd, name)


@contextlib.contextmanager
def implementation_context(device: torch.device, *, set_device: bool = True) -> Iterator[None]:
    """Autocast off (CPU and ``device``'s type) and, on CUDA with ``set_device``, ``device`` current."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if device.type != "cpu" and torch.amp.is_autocast_available(device.type):
            stack.enter_context(torch.autocast(device.type, enabled=False))
        if device.type == "cuda" and set_device:
            stack.enter_context(torch.cuda.device(device))
        yield


def register(name: str, fake: Callable, cuda: Callable | None = None) -> None:
    """Register ``fake`` as the meta kernel of ``torch.ops.fastkd.<name>`` and ``cuda`` as its CUDA kernel (in the
    :func:`implementation_context` of its first tensor); nothing when fastkd._C is not built."""
    if load() is None:
        return
    torch.library.register_fake(f"fastkd::{name}", fake)
    if cuda is not None:
        @functools.wraps(cuda)
        def on_device(*args):
            with implementation_context(next(a for a in args if isinstance(a, torch.Tensor)).device):
                return cuda(*args)

        torch.library.register_kernel(f"fastkd::{name}", "cuda", on_device)


@dataclass(frozen=True)
class Route:
    """Op ``op``'s choice (module docstring); ``gpu_limit(*args)``: why the GPU kernel cannot take them, or None."""

    op: str
    gpu_limit: Callable[..., str | None] | None = None

    @property
    def native(self) -> Callable:
        """``torch.ops.fastkd.<op>`` (not a ``cached_property``: its ``RLock`` on Python 3.11 breaks compile)."""
        return getattr(torch.ops.fastkd, self.op).default

    def fallback_reason(self, device: torch.device, dtypes: tuple[torch.dtype, ...], args: tuple) -> str | None:
        """Why these inputs run the reference (warns once for a missing kernel), else None."""
        if device.type == "cuda":
            if torch.float64 in dtypes:
                return "float64 on CUDA"
            limit = self.gpu_limit and self.gpu_limit(*args)
            if limit:
                return limit
        elif device.type != "cpu":
            return f"no kernel for {device.type}"
        missing = _missing_native(self.op, device.type)
        if missing is not None:
            _warn_once(self.op, missing)
        return missing

    def run(self, reference: Callable, args: tuple, device: torch.device, dtypes: tuple[torch.dtype, ...],
            kernel: Callable | None = None) -> Any:
        """``kernel(*args)`` (default ``torch.ops.fastkd.<op>``) or ``reference(*args)`` by the rule."""
        if _state.enabled:
            return reference(*args)
        if (device.type == "cpu" and _missing_native(self.op, "cpu") is None) or \
                self.fallback_reason(device, dtypes, args) is None:  # the CPU kernel first: the cheapest test
            return (kernel or self.native)(*args)
        with implementation_context(device, set_device=False):
            return reference(*args)


# ----------------------------------------------------------------------------- argument checks of the ops

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the ops compute their statistics in: float64 when an input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_float_tensors(shape: str | None = None, dims: int | None = None, **named: Any) -> None:
    """``TypeError`` unless each of ``named`` is a float tensor; ``ValueError`` unless of ``dims`` dimensions
    (naming ``shape``) and all on one device."""
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if dims is not None and x.dim() != dims:
            raise ValueError(f"{name} must be {shape}, got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if len({x.device for x in named.values()}) > 1:
        raise ValueError(f"{', '.join(named)} must be on one device, got {[str(x.device) for x in named.values()]}")
