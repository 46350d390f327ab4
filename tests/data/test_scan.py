import argparse
import io

import pytest

from fastkd.data.commands import register
from fastkd.data.datasets import load_images, read_exclusions
from fastkd.data.scan import scan_dataset


def _plant_corrupt(root):
    good = (root / "class1" / "img0.png").read_bytes()
    (root / "class1" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "class2" / "fake.jpg").write_bytes(b"this is not a jpeg")


def test_scan_finds_and_excludes_corrupt_files(tiny_folder, tmp_path):
    _plant_corrupt(tiny_folder)
    out = tmp_path / "exclude.txt"
    result = scan_dataset(tiny_folder, workers=2, out=out, progress=False)
    assert result.checked == 17
    assert [path for path, _ in result.bad] == ["class1/truncated.png", "class2/fake.jpg"]
    assert read_exclusions(out) == ["class1/truncated.png", "class2/fake.jpg"]
    kept = load_images(tiny_folder, exclude=out)
    assert len(kept) == 15 and not any("truncated" in f or "fake" in f for f in kept.files)


def test_scan_shows_no_bar_when_stderr_is_not_a_terminal(tiny_folder, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    log_file = io.StringIO()  # stderr redirected to a file: no carriage-return stream
    monkeypatch.setattr("sys.stderr", log_file)
    assert scan_dataset(tiny_folder, workers=1, progress=True).checked == 15
    assert log_file.getvalue() == ""


def test_scan_errors(tmp_path):
    with pytest.raises(ValueError, match="workers"):
        scan_dataset(tmp_path, workers=0)
    with pytest.raises(ValueError, match="no images"):
        scan_dataset(tmp_path)


def test_cli_subcommands(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="fastkd")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "sample", str(tmp_path / "sample"), "--images", "12", "--seed", "1"])
    assert args.func(args) == 0
    assert len(list((tmp_path / "sample").rglob("*.jpg"))) == 12
    (tmp_path / "sample" / "dots" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    out = tmp_path / "bad.txt"
    args = parser.parse_args(["data", "scan", str(tmp_path / "sample"), "--out", str(out), "--workers", "2"])
    assert args.func(args) == 0
    assert read_exclusions(out) == ["dots/broken.jpg"]
    assert "1 of 13 files undecodable" in capsys.readouterr().out
