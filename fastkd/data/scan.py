"""``scan_dataset``: decode every image of a dataset in parallel and list the ones that fail, as
an exclusion list the loaders honour (``build_loader(..., exclude=path)``)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from fastkd.checks import check_number
from fastkd.durable import atomic_write_text
from fastkd.progress import progress_disable

from .datasets import file_list, image_files


@dataclass(frozen=True)
class ScanResult:
    """``bad``: ``(path relative to root, reason)`` of every undecodable file, sorted by path."""

    root: str
    checked: int
    bad: tuple[tuple[str, str], ...]


def check_image(path: str) -> str | None:
    """``None`` when ``path`` decodes fully to a non-empty image, else the reason it does not."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                return f"empty image {image.width}x{image.height}"
    except Exception as error:  # noqa: BLE001 - every failure is a reason to exclude the file
        return f"{type(error).__name__}: {error}".replace("\n", " ").replace("\t", " ")
    return None


def scan_dataset(root: str | os.PathLike, workers: int = 4, *, out: str | os.PathLike | None = None,
                 progress: bool = True) -> ScanResult:
    """Decode every image of ``root`` (ImageFolder or file list); write ``path<TAB>reason`` lines to ``out``."""
    check_number("workers", workers, low=1, integer=True)
    root = Path(root)
    base = root.parent.resolve() if root.is_file() else root.resolve()
    files = list(file_list(root).files) if root.is_file() else image_files(base, "dataset root")
    if not files:
        raise ValueError(f"dataset root {str(root)!r} has no images")
    with ThreadPoolExecutor(workers) as pool:
        reasons = list(tqdm(pool.map(check_image, files), total=len(files), desc="scan", unit="img",
                            disable=progress_disable(progress)))
    bad = tuple(sorted((os.path.relpath(f, base), r) for f, r in zip(files, reasons) if r is not None))
    if out is not None:  # durably (fastkd.durable.atomic_write_text)
        lines = [f"# fastkd data scan {base}: {len(bad)} of {len(files)} files undecodable"]
        atomic_write_text(out, "\n".join(lines + [f"{path}\t{reason}" for path, reason in bad]) + "\n")
    return ScanResult(str(base), len(files), bad)
