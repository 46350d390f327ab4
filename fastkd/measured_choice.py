"""Choices measured where they run: the fastest of a few implementations, timed on this machine.

A setting left at ``auto`` that picks an implementation by speed (the attention backend, the frozen
teachers' precision on CPU) calls :func:`choose` with the setting's ``name``, a ``shape_class`` (the
device, dtype and size bucket the choice is for) and a function that builds the candidates. The
first time a class is seen, each candidate (a no-argument callable) runs once as a warm-up, then is
timed :data:`REPEATS` times with the device synchronised; the fastest best time wins (like
``torch.backends.cudnn.benchmark``). Callers keep each candidate to tens of milliseconds, so a
decision takes well under a second.

Decisions are kept in the process and in ``measured_choices.json`` in the user cache directory
(``$FASTKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastkd``, else ``~/.cache/fastkd``), a small JSON file
written atomically (:func:`fastkd.durable.atomic_write_json`), under the key
``"<machine> | torch <version>"`` then ``"<name> | <shape_class>"``: the machine is the CUDA device's
name and compute capability, or the CPU model, its SIMD / matrix ISA flags and torch's thread count
(:func:`machine`). Another machine or torch version measures anew; the same one reads the file. A
file that cannot be read or has another layout is ignored and rewritten with the next decision. An
explicit setting never reaches this module.

Callers build their measurement tensors without the global RNG (the step's random stream is not
moved by a decision) and run it with autocast off.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from fastkd.durable import atomic_write_json
from fastkd.reporting import cpu_info

FILE_NAME = "measured_choices.json"
REPEATS = 3
_DECIDED: dict[tuple[str, str, str], str] = {}  # (name, shape class, device) -> choice, this process


def cache_dir() -> Path:
    """``$FASTKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastkd``, else ``~/.cache/fastkd``."""
    return Path(os.environ.get("FASTKD_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "fastkd")


def machine(device: torch.device) -> str:
    """What a measurement on ``device`` holds for: ``cuda <name> sm<major><minor>``, or
    ``cpu <model> [<ISA flags>] x<threads>`` (:func:`fastkd.reporting.cpu_info`)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda {torch.cuda.get_device_name(device)} sm{major}{minor}"
    model, flags = cpu_info()
    return f"{device.type} {model} [{' '.join(flags)}] x{torch.get_num_threads()}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(candidates: dict[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """Seconds per candidate: the best of :data:`REPEATS` timed calls after one warm-up call.
    (The timer the tests replace.)"""
    seconds = {}
    for name, run in candidates.items():
        times = []
        for _ in range(REPEATS + 1):  # the first call is the warm-up
            start = time.perf_counter()
            run()
            _synchronize(device)
            times.append(time.perf_counter() - start)
        seconds[name] = min(times[1:])
    return seconds


def _read(path: Path) -> dict:
    """The cache file's sections, or ``{}`` for a missing, unreadable or foreign file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and all(
        isinstance(section, dict) and all(isinstance(e, dict) for e in section.values()) for section in data.values())
    return data if ok else {}


def _section(device: torch.device) -> str:
    return f"{machine(device)} | torch {torch.__version__}"


def _write(path: Path, data: dict) -> None:
    with contextlib.suppress(OSError):  # a read-only cache folder: the decision still holds for this process
        atomic_write_json(path, data)


def recorded(entry: str, device: torch.device | str) -> dict:
    """What :func:`record` stored under ``entry`` for this machine and torch version (``{}``: nothing)."""
    return dict(_read(cache_dir() / FILE_NAME).get(_section(torch.device(device)), {}).get(entry, {}))


def record(entry: str, device: torch.device | str, values: dict) -> None:
    """Merge ``values`` (JSON numbers) into ``entry`` of this machine and torch version's section
    (timings measured by a run itself, e.g. the trainer's step times with and without compiling)."""
    path = cache_dir() / FILE_NAME
    data = _read(path)
    data.setdefault(_section(torch.device(device)), {}).setdefault(entry, {}).update(values)
    _write(path, data)


def choose(name: str, shape_class: str, device: torch.device | str, names: tuple[str, ...],
           candidates: Callable[[], dict[str, Callable[[], object]]]) -> str:
    """The fastest of ``names`` for ``name`` at ``shape_class`` on ``device``: the process's or the
    cache file's decision for this machine and torch version (a recorded choice no longer among
    ``names``, e.g. an uninstalled xformers, does not count), else measured now on ``candidates()``
    (name -> callable, built only then) and recorded (see the module doc)."""
    key = (name, shape_class, str(device))
    if key in _DECIDED:
        return _DECIDED[key]
    device = torch.device(device)
    section, entry = _section(device), f"{name} | {shape_class}"
    path = cache_dir() / FILE_NAME
    data = _read(path)
    found = data.get(section, {}).get(entry)
    if found is None or found.get("choice") not in names:
        with torch.autocast(device.type, enabled=False):
            seconds = measure(candidates(), device)
        found = {"choice": min(seconds, key=seconds.get), "seconds": seconds}
        data.setdefault(section, {})[entry] = found
        _write(path, data)
    _DECIDED[key] = found["choice"]
    return found["choice"]


def forget() -> None:
    """Drop this process's decisions (the cache file stays): the next :func:`choose` reads the file."""
    _DECIDED.clear()
