"""Small on-disk datasets shared by the data tests."""

import numpy as np
import pytest
from PIL import Image


def colourful_image(seed: int, height: int = 24, width: int = 32) -> Image.Image:
    """An image whose channels differ everywhere and whose left and right halves differ."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = np.array([220, 40, 120]) + np.array([-150, 180, 60]) * x + rng.uniform(-10, 10, (height, width, 3)) * y
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


@pytest.fixture
def tiny_folder(tmp_path):
    """ImageFolder with 3 classes x 5 PNG images (24x32 and 32x24)."""
    root = tmp_path / "tiny"
    for label in range(3):
        (root / f"class{label}").mkdir(parents=True)
        for i in range(5):
            image = colourful_image(10 * label + i)
            if i % 2:
                image = image.transpose(Image.Transpose.ROTATE_90)
            image.save(root / f"class{label}" / f"img{i}.png")
    return root
