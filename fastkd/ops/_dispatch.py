"""The one place where every fastkd op enters its implementation.

Each op (``feature_align``, ``gather_tokens``, ``token_relation``, ``ema_`` and their backwards)
describes its implementations once with :class:`OpImplementations` and calls it from the body of
its ``torch.library.custom_op`` (or, for ``ema_``, from its Python entry point). This module decides
which implementation runs, by one rule for all ops:

================  =====================================================================================
inputs            implementation
================  =====================================================================================
CUDA, fp16/bf16/  the Triton kernel (or the native CUDA kernel of ``fastkd._C`` for ``ema_``), unless
fp32              the op reports a size its kernel does not take (e.g. ``feature_align`` with
                  ``D > 4096``): then the op's PyTorch path, silently (a documented limit)
CUDA, float64     the op's PyTorch path, computed in float64, for every op: the GPU kernels are built
                  for training dtypes, float64 is for gradient checks
CPU               the C++ kernel of the native extension ``fastkd._C``
anything else     the op's PyTorch path (which works on any device)
================  =====================================================================================

When the native kernel an input needs is missing (the extension is not built, was built without
CUDA, or was compiled for a CPU vector ISA this CPU lacks), the op runs its PyTorch path and says so
with one ``RuntimeWarning`` per op and reason.

Every implementation runs with autocast disabled (the op decides its own dtypes by its documented
contract: an ATen matmul inside a CPU kernel would otherwise return bf16 under
``torch.autocast``) and, for CUDA tensors, with the current CUDA device set to the inputs' device
(Triton launches on the current device).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from fastkd.ops._extension import build_info, load

__all__ = ["OpImplementations", "implementation_context", "native_op"]

_warned: set[tuple[str, str]] = set()


def _warn_once(op: str, reason: str) -> None:
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"fastkd.ops.{op}: {reason}; using its PyTorch path", RuntimeWarning, stacklevel=4)


@torch.compiler.assume_constant_result
def _missing_native(name: str, device_type: str) -> str | None:
    """Why ``torch.ops.fastkd.<name>`` cannot run on ``device_type`` here, or None when it can (a
    constant of the build and the machine: ``torch.compile`` bakes it in)."""
    return _missing_native_cached(name, device_type)


@functools.lru_cache(maxsize=None)
def _missing_native_cached(name: str, device_type: str) -> str | None:
    if load() is None:
        return "the native extension fastkd._C is not built"
    info = build_info()
    if not hasattr(torch.ops.fastkd, name):
        return f"fastkd._C has no kernel {name}"
    if device_type == "cuda" and not info["cuda"]:
        return "fastkd._C was built without its CUDA sources"
    if device_type == "cpu" and not info["cpu_isa_supported"]:
        return (f"fastkd._C was compiled for the {info['cpu_isa']} instruction set, which this CPU lacks "
                "(rebuild with FASTKD_CPU_ISA=AVX2 or DEFAULT)")
    return None


def native_op(name: str, device_type: str = "cpu") -> Callable | None:
    """``torch.ops.fastkd.<name>`` when the native extension provides it for ``device_type`` on this
    machine, else None."""
    return None if _missing_native(name, device_type) else getattr(torch.ops.fastkd, name)


@contextlib.contextmanager
def implementation_context(device: torch.device) -> Iterator[None]:
    """Autocast off (for CPU and the inputs' device type) and, on CUDA, the inputs' device current."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if device.type == "cuda":
            stack.enter_context(torch.autocast("cuda", enabled=False))
            stack.enter_context(torch.cuda.device(device))
        elif device.type != "cpu" and torch.amp.is_autocast_available(device.type):
            stack.enter_context(torch.autocast(device.type, enabled=False))
        yield


@dataclass(frozen=True)
class OpImplementations:
    """The implementations of one op (see the module docstring for how one is chosen).

    ``torch``: the PyTorch path, any device and floating dtype (required). ``native``: name of the
    ``torch.ops.fastkd`` kernel for CPU (and for CUDA when ``native_cuda``), called with the op's
    arguments, or through ``call_native`` when its schema takes more. ``triton``: the CUDA
    implementation (a function that imports and launches the Triton kernel). ``gpu_limit``: called
    with the op's arguments, returns why the GPU kernel cannot take them (a documented size limit)
    or None. All implementations take the same arguments.
    """

    op: str
    torch: Callable[..., Any]
    native: str | None = None
    native_cuda: bool = False
    call_native: Callable[..., Any] | None = None
    triton: Callable[..., Any] | None = None
    gpu_limit: Callable[..., str | None] | None = None

    def select(self, device: torch.device, dtypes: tuple[torch.dtype, ...], args: tuple) -> Callable[..., Any]:
        """The implementation these inputs run (warns once when a native kernel is missing)."""
        if device.type == "cuda":
            if torch.float64 in dtypes:
                return self.torch
            if self.gpu_limit is not None and self.gpu_limit(*args) is not None:
                return self.torch
            if self.native_cuda:
                return self._native_or_torch("cuda")
            if self.triton is not None:
                return self.triton
            return self.torch
        if device.type == "cpu" and self.native is not None:
            return self._native_or_torch("cpu")
        return self.torch

    def _native_or_torch(self, device_type: str) -> Callable[..., Any]:
        reason = _missing_native(self.native, device_type)
        if reason is None:
            return self.call_native or getattr(torch.ops.fastkd, self.native)
        _warn_once(self.op, reason)
        return self.torch

    def __call__(self, *args: Any) -> Any:
        """Run the selected implementation on ``args`` (the first tensor among them, or the first
        tensor of a leading list, decides the device) with autocast off and the CUDA device set."""
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not tensors:
            tensors = [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        device = tensors[0].device
        implementation = self.select(device, tuple(t.dtype for t in tensors), args)
        if torch.compiler.is_compiling():
            # Only ema_ is entered while tracing (the custom ops' bodies run at run time): its native
            # op goes into the graph as one opaque call that guards its own CUDA device.
            return implementation(*args)
        with implementation_context(device):
            return implementation(*args)
