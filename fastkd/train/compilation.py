"""``train.compile``: ``torch.compile`` of a method's whole forward, as ``torch.compile`` of a plain
PyTorch model does.

One graph holds every backbone pass (students, frozen and EMA teachers), the heads, the losses and
the glue, with fastkd's fused ops inside it as custom ops; ``fullgraph=True`` makes a graph break an
error, not a silent slowdown. The EMA / optimiser phase (``after_step``, the optimisers) stays
outside. Integer attributes of the method's modules (Hybrid Distill's kept-token count) are
unspecialised: the first value compiles a static graph, a second one a graph with that count
symbolic, and every later keep-ratio stage reuses it.

``train.compile: auto``: on CUDA always; elsewhere on when the run is long enough to repay the
compilation, ``(eager_step_s - compiled_step_s) * total_steps > compile_s``, from step times that
earlier runs of the same method, batch size and precision measured on this machine and recorded
(:func:`record_run`, in :mod:`fastkd.measured_choice`'s cache file); off until both a compiled and an
eager run were recorded. A run's step time is the median of its steps' wall times; a compiled
run's ``compile_s`` is its total time above ``steps x`` that median (the first step's compilation
and any recompilation).
"""

from __future__ import annotations

import functools
import statistics

import torch
import torch._dynamo
from torch import nn

from fastkd import measured_choice


def compile_method(method: nn.Module, *, backend: str = "inductor") -> None:
    """Replace ``method.forward`` by ``torch.compile`` of it (``fullgraph=True``), in place."""
    compiled = torch.compile(method.forward, fullgraph=True, backend=backend)

    @functools.wraps(type(method).forward)
    def forward(*args, **kwargs):
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            return compiled(*args, **kwargs)

    method.forward = forward


def compile_entry(method: nn.Module, batch_size: int, precision: str) -> str:
    """The cache entry of ``method``'s step times: its class, parameter count, batch and precision."""
    params = sum(p.numel() for p in method.parameters())
    return f"compile | {type(method).__name__} {params} params batch {batch_size} {precision}"


def should_compile(setting: bool | str, device: torch.device, entry: str, total_steps: int) -> bool:
    """``train.compile`` resolved for a run of ``total_steps`` (see the module doc for ``auto``)."""
    if isinstance(setting, bool):
        return setting
    if device.type == "cuda":
        return True
    times = measured_choice.recorded(entry, device)
    if not all(isinstance(times.get(k), (int, float)) for k in ("eager_step_s", "compiled_step_s", "compile_s")):
        return False
    return (times["eager_step_s"] - times["compiled_step_s"]) * total_steps > times["compile_s"]


def record_run(entry: str, device: torch.device, compiled: bool, step_seconds: list[float]) -> dict:
    """Record a run's step times (at least 3 steps) under ``entry``; returns what was recorded."""
    if len(step_seconds) < 3:
        return {}
    median = statistics.median(step_seconds[1:] if compiled else step_seconds)
    values = ({"compiled_step_s": median, "compile_s": max(0.0, sum(step_seconds) - median * len(step_seconds))}
              if compiled else {"eager_step_s": median})
    measured_choice.record(entry, device, values)
    return values
