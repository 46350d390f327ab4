"""Image sources: an ImageFolder tree (``root/<class>/<image>``) or a file list (one ``<path> <label>``
per line, ``label`` an int >= 0 or -1 for unknown, paths relative to the list's folder, ``#``
comments), minus an exclusion list (written by ``fastkd data scan``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from fastkd.checks import check_instance

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class BadImageError(ValueError):
    """An image file the decoder cannot read (a data error the user fixes: exit 2 in the CLI)."""


@dataclass(frozen=True)
class ImageList:
    """``files[i]`` (absolute path) has label ``labels[i]``; ``classes[label]`` names the label."""

    files: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    root: str

    def __post_init__(self):
        assert len(self.files) == len(self.labels), (len(self.files), len(self.labels))
        if not self.files:
            raise ValueError(f"dataset at {self.root!r} has no images")

    def __len__(self) -> int:
        return len(self.files)


def check_readable_dir(folder: Path, what: str) -> None:
    """``FileNotFoundError`` / ``NotADirectoryError`` / ``PermissionError`` unless ``folder`` is readable."""
    for error, ok, problem in ((FileNotFoundError, folder.exists(), "does not exist"),
                               (NotADirectoryError, folder.is_dir(), "is not a directory"),
                               (PermissionError, os.access(folder, os.R_OK | os.X_OK), "is not readable")):
        if not ok:
            raise error(f"{what} {str(folder)!r} {problem}")


def image_files(folder: Path, what: str) -> list[str]:
    """Every image file under the readable folder ``folder`` (recursively), sorted."""
    check_readable_dir(folder, what)
    return sorted(os.path.join(dirpath, name) for dirpath, _, names in os.walk(folder, onerror=_raise)
                  for name in names if name.lower().endswith(IMAGE_EXTENSIONS))


def _raise(error: OSError) -> None:
    raise PermissionError(f"cannot read {error.filename!r}: {error.strerror}") from error


def image_folder(root: str | os.PathLike) -> ImageList:
    """Every image under ``root/<class>/`` (recursively), labels by sorted class folder name."""
    root = Path(root).resolve()
    check_readable_dir(root, "dataset root")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"dataset root {str(root)!r} has no class folders (expected root/<class>/<image>)")
    files, labels, empty = [], [], []
    for label, class_dir in enumerate(class_dirs):
        found = image_files(class_dir, "class folder")
        if not found:
            empty.append(class_dir.name)
        files += found
        labels += [label] * len(found)
    if empty:
        raise ValueError(f"dataset root {str(root)!r}: class folders without images ({', '.join(IMAGE_EXTENSIONS)}): "
                         f"{empty}")
    return ImageList(tuple(files), tuple(labels), tuple(d.name for d in class_dirs), str(root))


def file_list(path: str | os.PathLike) -> ImageList:
    """Images and int labels from a ``<path> <label>`` text file."""
    path = Path(path).resolve()
    files, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.rsplit(None, 1)
        if len(fields) != 2 or not (fields[1].isdigit() or fields[1] == "-1"):
            raise ValueError(f"{str(path)!r} line {number}: expected '<path> <label >= -1>', got {line!r}")
        name, label = fields
        files.append(str((path.parent / name).resolve()))
        labels.append(int(label))
    num_classes = max(labels, default=-1) + 1  # no files: ImageList refuses them
    return ImageList(tuple(files), tuple(labels), tuple(str(c) for c in range(num_classes)), str(path.parent))


def read_exclusions(path: str | os.PathLike) -> list[str]:
    """Paths of an exclusion list (one per line, optional tab-separated reason, ``#`` comments)."""
    lines = Path(path).read_text().splitlines()
    return [line.split("\t", 1)[0].strip() for line in lines if line.strip() and not line.startswith("#")]


def load_images(source, exclude: str | os.PathLike | Iterable[str] | None = None) -> ImageList:
    """An ImageList, ImageFolder root or file list, minus ``exclude`` (a list file or paths, relative to the root)."""
    check_instance("source", source, (ImageList, str, os.PathLike), "a path or an ImageList")
    images = source
    if not isinstance(source, ImageList):
        images = file_list(source) if Path(source).is_file() else image_folder(source)
    if exclude is None:
        return images
    check_instance("exclude", exclude, (str, os.PathLike, Iterable), "a path, an iterable of paths or None")
    if isinstance(exclude, (str, os.PathLike)):
        exclude = read_exclusions(exclude)
    root = Path(images.root)
    dropped = {str((root / p).resolve()) for p in exclude}
    keep = [i for i, f in enumerate(images.files) if f not in dropped]
    if not keep:
        raise ValueError(f"dataset at {images.root!r} has no images left after excluding {len(dropped)} files")
    return ImageList(tuple(images.files[i] for i in keep), tuple(images.labels[i] for i in keep), images.classes,
                     images.root)
