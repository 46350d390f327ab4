"""The built-in sample dataset: a deterministic ImageFolder of small procedural JPEGs.

12 classes = 4 shapes (disk, square, triangle, cross) x 3 textures (stripes, checker, dots):
neither the shape nor the texture alone names the class. Every image (64-96 px per side) draws
its colours, background noise, shape position (near the centre) / size / rotation and texture period / angle from
``numpy.random.default_rng([seed, index])``, so the files are byte-identical for a seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disk", "square", "triangle", "cross")
TEXTURES = ("stripes", "checker", "dots")
CLASSES = tuple(f"{shape}_{texture}" for shape in SHAPES for texture in TEXTURES)
SIZE_RANGE = (64, 96)
JPEG_QUALITY = 90


def _texture(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean pattern ``[H, W]`` of ``kind`` with a random period, angle and phase."""
    period = rng.uniform(14.0, 22.0)
    angle = rng.uniform(0.0, np.pi)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u = x * np.cos(angle) + y * np.sin(angle) + rng.uniform(0, period)
    v = -x * np.sin(angle) + y * np.cos(angle) + rng.uniform(0, period)
    if kind == "stripes":
        return (u % period) < period / 2
    if kind == "checker":
        return ((u // (period / 2)) + (v // (period / 2))) % 2 == 0
    du, dv = (u % period) - period / 2, (v % period) - period / 2
    return du**2 + dv**2 < (period * 0.3) ** 2


def _shape_mask(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask ``[H, W]`` of a randomly placed, sized and rotated ``kind``."""
    radius = rng.uniform(0.36, 0.44) * min(height, width)
    cx = width / 2 + rng.uniform(-0.1, 0.1) * width
    cy = height / 2 + rng.uniform(-0.1, 0.1) * height
    rotation = rng.uniform(0.0, 2 * np.pi)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)

    def polygon(points):
        cos, sin = np.cos(rotation), np.sin(rotation)
        draw.polygon([(cx + px * cos - py * sin, cy + px * sin + py * cos) for px, py in points], fill=255)

    if kind == "disk":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    elif kind == "square":
        half = radius / np.sqrt(2)
        polygon([(-half, -half), (half, -half), (half, half), (-half, half)])
    elif kind == "triangle":
        polygon([(radius * np.cos(a), radius * np.sin(a)) for a in np.pi / 2 + np.arange(3) * 2 * np.pi / 3])
    else:
        arm = radius * 0.35
        polygon([(-radius, -arm), (radius, -arm), (radius, arm), (-radius, arm)])
        polygon([(-arm, -radius), (arm, -radius), (arm, radius), (-arm, radius)])
    return np.asarray(canvas) > 127


def sample_image(index: int, seed: int = 0) -> tuple[Image.Image, int]:
    """Image ``index`` of the sample dataset for ``seed`` and its class label."""
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be an int >= 0, got {index!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    label = index % len(CLASSES)
    shape, texture = SHAPES[label // len(TEXTURES)], TEXTURES[label % len(TEXTURES)]
    rng = np.random.default_rng([seed, index])
    height, width = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=2))
    background = rng.uniform(0, 255, size=3) + rng.normal(0.0, 4.0, size=(height, width, 3))
    ink, paper = rng.uniform(0, 255, size=(2, 3))
    if np.abs(ink - paper).sum() < 150:  # keep the texture visible
        paper = 255.0 - ink
    fill = np.where(_texture(texture, height, width, rng)[..., None], ink, paper)
    pixels = np.where(_shape_mask(shape, height, width, rng)[..., None], fill, background)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB"), label


def write_sample_dataset(root: str | os.PathLike, images: int = 2000, seed: int = 0) -> Path:
    """Write ``images`` JPEGs as ``root/<shape>_<texture>/<index>.jpg`` (byte-identical for a
    seed); returns ``root``. Needs at least one image per class."""
    if not isinstance(images, int) or images < len(CLASSES):
        raise ValueError(f"images must be an int >= {len(CLASSES)} (one per class), got {images!r}")
    root = Path(root)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for index in range(images):
        image, label = sample_image(index, seed)
        image.save(root / CLASSES[label] / f"{index:06d}.jpg", format="JPEG", quality=JPEG_QUALITY)
    return root
