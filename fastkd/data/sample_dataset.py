"""The built-in sample dataset: a deterministic ImageFolder of small procedural JPEGs.

12 two-tone textures (``CLASSES``); each image draws size, period, rotation, phase, tinted ink / paper levels and
noise from ``numpy.random.default_rng([seed, index])``. Near-upright and near-grey, since with free colours or
orientations a tiny MoCo v3 learns those instead of the class.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from fastkd.checks import check_choice

CLASSES = ("stripes", "thin_stripes", "checker", "dots", "rings", "grid", "crosses", "zigzag", "triangles",
           "bricks", "blobs", "concentric")
SIZE_RANGE = (64, 96)
PERIOD_RANGE = (10.0, 16.0)
MAX_ROTATION = np.pi / 12
JPEG_QUALITY = 90


def _blobs(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Thresholded smooth noise: a coarse Gaussian grid upsampled bicubically."""
    coarse = rng.normal(size=(height // 10 + 2, width // 10 + 2)).astype(np.float32)
    smooth = Image.fromarray(coarse, "F").resize((width, height), Image.BICUBIC)
    return np.asarray(smooth) > 0


def texture(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean ink mask ``[H, W]`` of texture ``kind`` with a random period, small rotation and phase."""
    check_choice("kind", kind, CLASSES)
    period = rng.uniform(*PERIOD_RANGE)
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u = x * np.cos(angle) + y * np.sin(angle) + rng.uniform(0, period)
    v = -x * np.sin(angle) + y * np.cos(angle) + rng.uniform(0, period)
    fu, fv = (u % period) / period, (v % period) / period  # position inside the cell, in [0, 1)
    radius_sq = (fu - 0.5) ** 2 + (fv - 0.5) ** 2
    du, dv = np.abs(fu - 0.5), np.abs(fv - 0.5)
    masks = {  # evaluated lazily: blobs and concentric draw from rng
        "stripes": lambda: fu < 0.5,
        "thin_stripes": lambda: fu < 0.15,
        "checker": lambda: (fu < 0.5) ^ (fv < 0.5),
        "dots": lambda: radius_sq < 0.09,
        "rings": lambda: (radius_sq < 0.16) & (radius_sq > 0.05),
        "grid": lambda: (fu < 0.2) | (fv < 0.2),
        "crosses": lambda: ((du < 0.12) & (dv < 0.4)) | ((dv < 0.12) & (du < 0.4)),
        "zigzag": lambda: ((u + dv * period) % period) < period / 2,
        "triangles": lambda: fu < fv,
        "bricks": lambda: (fv < 0.2) | ((((u + np.floor(v / period) * period / 2) % period) / period) < 0.15),
        "blobs": lambda: _blobs(height, width, rng),
        "concentric": lambda: (np.hypot(x - rng.uniform(0, width), y - rng.uniform(0, height)) % period) < period / 2,
    }
    return masks[kind]()


def _check_ints(*checks: tuple[str, object, int]) -> None:
    """``ValueError`` naming the first ``(name, value, minimum)`` whose value is not an int >= minimum."""
    for name, value, minimum in checks:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def sample_image(index: int, seed: int = 0) -> tuple[Image.Image, int]:
    """Image ``index`` of the sample dataset for ``seed`` and its class label (``index % 12``)."""
    _check_ints(("index", index, 0), ("seed", seed, 0))
    label = index % len(CLASSES)
    rng = np.random.default_rng([seed, index])
    height, width = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=2))
    ink = rng.uniform(0, 80) + rng.uniform(-20, 20, size=3)
    paper = rng.uniform(175, 255) + rng.uniform(-20, 20, size=3)
    mask = texture(CLASSES[label], height, width, rng)
    pixels = np.where(mask[..., None], ink, paper) + rng.normal(0.0, 4.0, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB"), label


def write_sample_dataset(root: str | os.PathLike, images: int = 2000, seed: int = 0) -> Path:
    """Write ``images`` (>= one per class) JPEGs as ``root/<class>/<index>.jpg``; returns ``root``."""
    _check_ints(("images (one per class)", images, len(CLASSES)), ("seed", seed, 0))
    root = Path(root)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for index in range(images):
        image, label = sample_image(index, seed)
        image.save(root / CLASSES[label] / f"{index:06d}.jpg", format="JPEG", quality=JPEG_QUALITY)
    return root
