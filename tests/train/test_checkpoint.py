import random

import numpy as np
import pytest
import torch

from fastkd.durable import atomic_torch_save
from fastkd.train.checkpoint import CheckpointManager
from fastkd.train.rng import capture_rng_state, restore_rng_state


def test_save_keeps_last_k_and_loads_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (3, 6, 9):
        manager.save({"step": step, "w": torch.full((2,), float(step))}, step)
    assert [p.name for p in manager.checkpoints()] == ["checkpoint_000000009.pt", "checkpoint_000000006.pt"]
    state, path = manager.load_latest()
    assert state["step"] == 9 and path.name.endswith("9.pt")
    assert not list(tmp_path.glob(".*tmp*"))


def test_corrupt_latest_falls_back_with_message(tmp_path):
    messages = []
    manager = CheckpointManager(tmp_path, keep_last=3, report=messages.append)
    for step in (1, 2):
        manager.save({"step": step}, step)
    latest = manager.path_for(2)
    latest.write_bytes(latest.read_bytes()[:40])  # truncated
    state, path = manager.load_latest()
    assert state["step"] == 1 and path == manager.path_for(1)
    assert len(messages) == 1 and "corrupt or truncated" in messages[0] and str(latest) in messages[0]
    assert "falling back" in messages[0] and str(manager.path_for(1)) in messages[0]


def test_no_readable_checkpoint_is_an_error(tmp_path):
    manager = CheckpointManager(tmp_path, report=lambda m: None)
    assert manager.load_latest() is None
    manager.path_for(5).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="no checkpoint"):  # a clean user-facing error (exit 2 in the CLI)
        manager.load_latest()


def test_atomic_save_replaces_in_one_piece(tmp_path):
    target = tmp_path / "a" / "x.pt"
    atomic_torch_save({"v": 1}, target)
    atomic_torch_save({"v": 2}, target)
    assert torch.load(target, weights_only=True) == {"v": 2}
    assert [p.name for p in target.parent.iterdir()] == ["x.pt"]


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    atomic_torch_save({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand(7)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(TypeError, match="state"):
        CheckpointManager(tmp_path).save([1], 1)
    with pytest.raises(ValueError, match="rng state"):
        restore_rng_state({"torch": None})
