"""Durable file writes, the one writer of every fastkd file, and :func:`read_torch_file`: a file
goes to a unique temporary file beside it, is fsynced and renamed over its final name, and the folder
entry is fsynced, so a crash at any moment leaves the previous file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "read_torch_file", "UnreadableFileError"]


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open a folder: the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(handle)`` on a binary temporary file beside ``path``, fsync it and rename it over
    ``path`` (creating the parent folder); returns ``path`` as a :class:`~pathlib.Path`.

    Raises ``OSError`` naming ``ENOSPC`` and the folder when the disk is full."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"ENOSPC: no space left on device while writing {path.name} into "
                                        f"{path.parent}") from error
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` durably (see :func:`atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` durably (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON (with a trailing newline) to ``path`` durably."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` durably."""
    import torch

    return atomic_write(path, lambda handle: torch.save(obj, handle))


class UnreadableFileError(ValueError):
    """A file that ``torch.load(weights_only=True)`` cannot read (truncated, corrupt, not a torch
    file, or holding objects other than tensors and plain values)."""


def _torch_reason(error: BaseException) -> str:
    """The useful line of a ``torch.load`` error, without torch's advice to retry with
    ``weights_only=False`` (which would execute code from the file)."""
    text = str(error).strip()
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].split(" Please use")[0].strip()
            return reason or type(error).__name__
    lines = [line for line in text.splitlines() if "weights_only" not in line and line.strip()]
    return f"{type(error).__name__}: {lines[0].strip()}" if lines else type(error).__name__


@contextmanager
def _allowed_globals(serialization: Any, allowed: list) -> Iterator[None]:
    """``allowed`` added to ``weights_only`` loading for the block: ``torch.serialization.safe_globals``
    (torch >= 2.5); on torch 2.4, which has only the global ``add_safe_globals`` list, the list is
    extended for the block and restored after it."""
    if hasattr(serialization, "safe_globals"):
        with serialization.safe_globals(allowed):
            yield
        return
    previous = serialization.get_safe_globals()
    serialization.add_safe_globals(allowed)
    try:
        yield
    finally:
        serialization.clear_safe_globals()
        serialization.add_safe_globals(previous)


def read_torch_file(path: str | os.PathLike, *, safe_globals: tuple = (), map_location: Any = "cpu") -> Any:
    """``torch.load(path, map_location=map_location, weights_only=True)`` with ``safe_globals`` also
    allowed while it reads; a file that cannot be read raises :class:`UnreadableFileError` naming it
    and why, in one line."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(path)!r} does not exist")
    try:
        with _allowed_globals(torch.serialization, list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - every failure of a corrupt file is reported alike
        raise UnreadableFileError(f"{os.fspath(path)!r} is not a readable PyTorch checkpoint "
                                  f"({_torch_reason(error)})") from None
