"""Atomic training checkpoints: ``<dir>/checkpoint_<step>.pt``, the last K kept.

A checkpoint is written with :func:`fastkd.durable.atomic_torch_save` (temporary file in the same
directory, fsync, rename, directory fsync), so a crash at any moment leaves either the previous set
of checkpoints or the new one, never a half-written file under a final name. Loading goes newest
first; a truncated or corrupt file is reported and the previous one used. Files load with
``torch.load(weights_only=True)``: the trainer stores tensors, numbers, strings, lists and dicts only.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable

import torch

from fastkd.durable import UnreadableFileError, atomic_torch_save, read_torch_file

_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")
CHECKPOINT_FORMAT = "fastkd-train-v1"  # the ``format`` entry of every training checkpoint


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` durably: the same as :func:`fastkd.durable.atomic_torch_save`
    (kept under this name for existing callers)."""
    return atomic_torch_save(obj, path)


class CheckpointManager:
    """Saves ``checkpoint_<step>.pt`` files in ``directory`` and keeps the newest ``keep_last``."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3,
                 report: Callable[[str], None] | None = None):
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
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
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
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
