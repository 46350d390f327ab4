"""Atomic training checkpoints: ``<dir>/checkpoint_<step>.pt``, the last K kept.

Written with :func:`fastkd.durable.atomic_torch_save`, so a crash leaves the previous set of
checkpoints or the new one, never a half-written file under a final name. Loading goes newest first
(``torch.load(weights_only=True)``); a truncated or corrupt file is reported and the previous one used.
:class:`TrainingState` is the one schema (version :data:`CHECKPOINT_VERSION`) of what a training
checkpoint holds: the trainer writes and resumes through it, ``fastkd.eval.models`` reads it.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from fastkd.checks import check_instance, check_number
from fastkd.durable import UnreadableFileError, atomic_torch_save, read_torch_file

_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")
CHECKPOINT_VERSION = 1  # the version of the TrainingState schema this fastkd writes and reads
_FORMAT_PREFIX = "fastkd-train-v"
CHECKPOINT_FORMAT = f"{_FORMAT_PREFIX}{CHECKPOINT_VERSION}"  # the ``format`` entry of every training checkpoint


def is_training_checkpoint(obj) -> bool:
    """Whether ``obj`` (a loaded file) is a fastkd training checkpoint of any version."""
    return isinstance(obj, dict) and str(obj.get("format", "")).startswith(_FORMAT_PREFIX)


@dataclass
class TrainingState:
    """Everything a training checkpoint holds: ``step`` (optimiser steps taken) of
    ``total_steps``, the data position (``epoch``, ``batches_in_epoch`` consumed in it), the
    ``world_size`` that wrote it, the state dicts of the ``method``, the ``optimizers`` and the
    GradScaler (``scaler``) and the ``schedules`` (``{optimiser: {"lr": ..., "weight_decay":
    ...}}``) by optimiser name, the non-finite step counters (``skipped`` in total,
    ``consecutive`` at the end), every rank's ``rng`` state and the run's ``config`` dict."""

    step: int
    total_steps: int
    epoch: int
    batches_in_epoch: int
    world_size: int
    method: dict
    optimizers: dict = field(default_factory=dict)
    scaler: dict = field(default_factory=dict)
    schedules: dict = field(default_factory=dict)
    skipped: int = 0
    consecutive: int = 0
    rng: list = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The checkpoint file's content (``format`` names the schema version)."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        nonfinite = {"skipped": state.pop("skipped"), "consecutive": state.pop("consecutive")}
        return {"format": CHECKPOINT_FORMAT, **state, "nonfinite": nonfinite}

    @classmethod
    def from_dict(cls, state: dict, source: str | os.PathLike = "the checkpoint") -> "TrainingState":
        """The state in a loaded checkpoint file (``source`` names it in errors); a file of another
        schema version is refused with both versions named."""
        found = state.get("format") if isinstance(state, dict) else None
        if found != CHECKPOINT_FORMAT:
            version = found[len(_FORMAT_PREFIX):] if is_training_checkpoint(state) else None
            raise ValueError(f"{source} is " + (f"a training checkpoint of schema version {version}" if version
                                                 else f"not a fastkd training checkpoint (format {found!r})")
                             + f"; this fastkd reads version {CHECKPOINT_VERSION} ({CHECKPOINT_FORMAT!r}) only")
        names = [f.name for f in fields(cls) if f.name not in ("skipped", "consecutive")]
        return cls(**{name: state[name] for name in names}, **state.get("nonfinite", {}))


class CheckpointManager:
    """Saves ``checkpoint_<step>.pt`` files in ``directory`` and keeps the newest ``keep_last``."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3,
                 report: Callable[[str], None] | None = None):
        check_number("keep_last", keep_last, low=1, integer=True)
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.report = report or (lambda message: print(message, file=sys.stderr, flush=True))

    def path_for(self, step: int) -> Path:
        return self.directory / f"checkpoint_{step:09d}.pt"

    def checkpoints(self) -> list[Path]:
        """Existing checkpoint files, newest (highest step) first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def stale_temp_files(self) -> list[Path]:
        """Temporary files an interrupted checkpoint write left in ``directory``: the names
        :func:`fastkd.durable.atomic_write` gives them, ``.checkpoint_<step>.pt.<random>.tmp``."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            name = path.name
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            final, _, unique = name[1:-len(".tmp")].rpartition(".")
            if unique and _NAME.match(final) and path.is_file() and not path.is_symlink():
                found.append(path)
        return sorted(found)

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete :meth:`stale_temp_files` (call it when no checkpoint is being written, i.e. at the
        start of a run, on the main rank only); returns the removed paths."""
        removed = []
        for path in self.stale_temp_files():
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
        return removed

    def save(self, state: dict, step: int) -> Path:
        """Write ``state`` as the checkpoint of ``step`` and delete all but the newest ``keep_last``."""
        check_instance("state", state, dict, "a dict")
        check_number("step", step, low=0, integer=True)
        path = atomic_torch_save(state, self.path_for(step))
        for old in self.checkpoints()[self.keep_last:]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self, map_location="cpu") -> tuple[dict, Path] | None:
        """The newest checkpoint that loads, with its path; unreadable ones are reported and
        skipped. ``None`` when there is no checkpoint at all; an error when none loads."""
        candidates = self.checkpoints()
        failures = []
        for index, path in enumerate(candidates):
            try:
                state = read_torch_file(path, map_location=map_location)
                if not isinstance(state, dict) or "step" not in state:
                    raise ValueError("not a fastkd training checkpoint (no 'step' entry)")
            except Exception as error:  # noqa: BLE001 - any unreadable file is reported, then skipped
                following = candidates[index + 1] if index + 1 < len(candidates) else None
                failures.append(f"{path}: {error}")
                self.report(
                    f"checkpoint {path} is corrupt or truncated ({error}); "
                    + (f"falling back to the previous one, {following}" if following else "no older checkpoint")
                )
                continue
            return state, path
        if failures:
            raise UnreadableFileError("no checkpoint in {} could be loaded:\n  {}".format(self.directory,
                                                                                        "\n  ".join(failures)))
        return None
