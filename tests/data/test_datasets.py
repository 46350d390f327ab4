import os

import pytest

from fastkd.data.datasets import file_list, image_folder, load_images


def test_image_folder_labels_by_sorted_class(tiny_folder):
    images = image_folder(tiny_folder)
    assert images.classes == ("class0", "class1", "class2")
    assert len(images) == 15 and images.labels == tuple(sorted(images.labels))
    assert all(os.path.isabs(f) and f"class{label}" in f for f, label in zip(images.files, images.labels))


def test_file_list_relative_paths(tiny_folder):
    listing = tiny_folder / "train.txt"
    listing.write_text("# comment\nclass1/img0.png 4\n\nclass2/img3.png\t0  # trailing\nclass0/img1.png -1\n")
    images = file_list(listing)
    assert images.files == tuple(str(tiny_folder / f) for f in ("class1/img0.png", "class2/img3.png", "class0/img1.png"))
    assert images.labels == (4, 0, -1) and len(images.classes) == 5
    assert load_images(listing).files == images.files


def test_exclusions(tiny_folder):
    images = load_images(tiny_folder, exclude=["class0/img1.png", str(tiny_folder / "class2/img4.png")])
    assert len(images) == 13
    assert str(tiny_folder / "class0/img1.png") not in images.files
    exclusion_list = tiny_folder.parent / "exclude.txt"
    exclusion_list.write_text("# header\nclass1/img2.png\tOSError: truncated\n")
    assert len(load_images(tiny_folder, exclude=exclusion_list)) == 14


def test_clear_errors(tmp_path, tiny_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        image_folder(tmp_path / "empty")
    (tiny_folder / "class9").mkdir()
    (tiny_folder / "class9" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"class folders without images.*class9"):
        image_folder(tiny_folder)
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text("a.jpg cat\n")
    with pytest.raises(ValueError, match="line 1"):
        file_list(bad_list)
    with pytest.raises(TypeError, match="source"):
        load_images(42)


def test_everything_excluded(tiny_folder):
    files = image_folder(tiny_folder).files
    with pytest.raises(ValueError, match="no images left"):
        load_images(tiny_folder, exclude=files)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_unreadable_root(tmp_path, tiny_folder):
    os.chmod(tiny_folder, 0)
    try:
        with pytest.raises(PermissionError, match="not readable"):
            image_folder(tiny_folder)
    finally:
        os.chmod(tiny_folder, 0o755)
