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
(:func:`record_run`, in :mod:`fastkd.measured_choice`'s cache file). With no compiled run recorded, a
trial: the run starts eager, times :data:`TRIAL_STEPS` steps and compiles for the rest when their median
times the steps left exceeds :data:`TRIAL_SECONDS` (:func:`compile_trial_due`); a short run stays eager
(the trial's worst case, a compilation that never pays, costs minutes of a run of an hour or more).
Eager and compiled step times are the medians of their steps' wall times; ``compile_s`` is the compiled
steps' total above ``steps x`` their median (the first step's compilation and any recompilation).
"""

from __future__ import annotations

import functools
import statistics

import torch
import torch._dynamo
from torch import nn

from fastkd import measured_choice

TRIAL_STEPS = 3  # eager steps timed before ``auto`` may start a compile trial
TRIAL_SECONDS = 3600.0  # remaining eager time above which ``auto`` tries compiling (no compiled run recorded)


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


def compile_trial_due(setting: bool | str, device: torch.device, entry: str, step_seconds: list[float],
                      steps_left: int) -> bool:
    """``auto``, off the GPU, no compiled run of ``entry`` recorded and :data:`TRIAL_STEPS` eager steps timed:
    whether their median step time x ``steps_left`` exceeds :data:`TRIAL_SECONDS` (then compile now)."""
    if setting != "auto" or device.type == "cuda" or len(step_seconds) != TRIAL_STEPS:
        return False
    if "compiled_step_s" in measured_choice.recorded(entry, device):
        return False  # should_compile decided from the records at the start
    return statistics.median(step_seconds) * steps_left > TRIAL_SECONDS


def record_run(entry: str, device: torch.device, step_seconds: list[float], compiled_from: int | None) -> dict:
    """Record a run's step times under ``entry``: the eager steps' median (``step_seconds`` up to
    ``compiled_from``, all of them for ``None``) and the compiled steps' (from ``compiled_from`` on), each
    from at least 3 steps; returns what was recorded."""
    eager, compiled = (step_seconds, []) if compiled_from is None else \
        (step_seconds[:compiled_from], step_seconds[compiled_from:])
    values = {"eager_step_s": statistics.median(eager)} if len(eager) >= 3 else {}
    if len(compiled) >= 3:
        median = statistics.median(compiled[1:])
        values.update(compiled_step_s=median, compile_s=max(0.0, sum(compiled) - median * len(compiled)))
    if values:
        measured_choice.record(entry, device, values)
    return values
