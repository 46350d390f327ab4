"""fastkd.durable: the one durable writer (temp file + fsync + rename) and its torch reader."""

import errno
import json

import pytest
import torch

from fastkd.durable import (UnreadableFileError, atomic_torch_save, atomic_write, atomic_write_json, atomic_write_text,
                            read_torch_file)


def test_writers_replace_the_file_in_one_piece(tmp_path):
    target = tmp_path / "a" / "b.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    atomic_write_text(tmp_path / "t.txt", "hello\n")
    assert (tmp_path / "t.txt").read_text() == "hello\n"
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "w.pt")
    assert torch.equal(read_torch_file(tmp_path / "w.pt")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["b.json", "t.txt", "w.pt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    atomic_write_text(target, "old")

    def fail(handle):
        handle.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        atomic_write(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_disk_full_is_one_line_naming_enospc_and_the_folder(tmp_path):
    def full(handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as error:
        atomic_write(tmp_path / "checkpoint.pt", full)
    message = str(error.value)
    assert "ENOSPC" in message and str(tmp_path) in message and "\n" not in message
    assert error.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


def test_unreadable_torch_files_are_one_clean_error(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02junk")
    with pytest.raises(UnreadableFileError, match="junk.pt' is not a readable PyTorch checkpoint") as error:
        read_torch_file(tmp_path / "junk.pt")
    assert "weights_only" not in str(error.value)
    assert isinstance(error.value, ValueError)


def test_allowed_globals_are_read_without_the_safe_globals_context_manager(tmp_path, monkeypatch):
    """torch 2.4 has only the global ``add_safe_globals`` list (``safe_globals`` came in 2.5): the
    reader extends that list while it reads and restores it after."""
    import argparse

    atomic_torch_save({"args": argparse.Namespace(arch="vit_small"), "w": torch.ones(2)}, tmp_path / "ckpt.pt")
    before = set(torch.serialization.get_safe_globals())  # a set in torch: its list order is arbitrary
    monkeypatch.delattr(torch.serialization, "safe_globals")
    state = read_torch_file(tmp_path / "ckpt.pt", safe_globals=(argparse.Namespace,))
    assert state["args"].arch == "vit_small" and torch.equal(state["w"], torch.ones(2))
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(UnreadableFileError, match="Namespace"):
        read_torch_file(tmp_path / "ckpt.pt")
