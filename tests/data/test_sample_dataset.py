import hashlib

import pytest
from PIL import Image

from fastkd.data.datasets import image_folder
from fastkd.data.sample_dataset import CLASSES, SIZE_RANGE, write_sample_dataset


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.jpg"))}


def test_byte_identical_for_a_seed(tmp_path):
    first = _digest(write_sample_dataset(tmp_path / "a", images=30, seed=7))
    assert first == _digest(write_sample_dataset(tmp_path / "b", images=30, seed=7))
    assert first != _digest(write_sample_dataset(tmp_path / "c", images=30, seed=8))


def test_image_folder_of_jpegs(tmp_path):
    root = write_sample_dataset(tmp_path / "s", images=26)
    images = image_folder(root)
    assert len(CLASSES) >= 10 and images.classes == tuple(sorted(CLASSES)) and len(images) == 26
    for path in images.files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert all(SIZE_RANGE[0] <= side <= SIZE_RANGE[1] for side in image.size)


def test_classes_need_shape_and_texture():
    shapes = {name.split("_")[0] for name in CLASSES}
    textures = {name.split("_")[1] for name in CLASSES}
    assert len(shapes) >= 3 and len(textures) >= 3 and len(CLASSES) == len(shapes) * len(textures)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="images"):
        write_sample_dataset(tmp_path, images=3)
