import hashlib

import numpy as np
import pytest
from PIL import Image

from fastkd.data.datasets import image_folder
from fastkd.data.sample_dataset import CLASSES, SIZE_RANGE, sample_image, texture, write_sample_dataset


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


def test_label_is_index_mod_classes_and_textures_differ():
    masks = {}
    for index in range(2 * len(CLASSES)):
        image, label = sample_image(index, seed=3)
        assert label == index % len(CLASSES)
        pixels = np.asarray(image, dtype=np.float64).mean(axis=2)
        assert pixels.max() - pixels.min() > 60  # two tones, not a flat image
    rng = np.random.default_rng(0)
    for kind in CLASSES:
        masks[kind] = texture(kind, 64, 64, np.random.default_rng(1))
        assert 0.05 < masks[kind].mean() < 0.95, kind  # both tones present
    kinds = list(masks)
    for i, a in enumerate(kinds):
        for b in kinds[i + 1:]:
            assert (masks[a] != masks[b]).mean() > 0.05, (a, b)
    with pytest.raises(ValueError, match="kind"):
        texture("plaid", 8, 8, rng)


def test_bad_arguments():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="index"):
            sample_image(bad)
        with pytest.raises(ValueError, match="seed"):
            sample_image(0, seed=bad)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="images"):
        write_sample_dataset(tmp_path, images=3)
