"""Resume guards: a schedule shorter than the checkpoint's step is refused unless allowed; stale
temporary files of interrupted checkpoint writes are removed at the start of a run."""

import pytest

from fastkd.train.checkpoint import CheckpointManager
from tests.train.test_trainer import make_trainer


def test_resume_with_a_shorter_schedule_is_refused(tmp_path):
    make_trainer(tmp_path, max_steps=3).fit()
    with pytest.raises(ValueError, match=r"step 3, beyond this run's 2 steps.*train\.epochs / train\.max_steps"):
        make_trainer(tmp_path, max_steps=2).fit(resume=True)
    result = make_trainer(tmp_path, max_steps=2, allow_shorter_schedule=True).fit(resume=True)
    assert (result.step, result.total_steps) == (3, 2)


def test_resume_with_the_same_schedule_still_works(tmp_path):
    make_trainer(tmp_path, max_steps=2).fit()
    assert make_trainer(tmp_path, max_steps=2).fit(resume=True).step == 2


def test_allow_shorter_schedule_must_be_a_bool():
    from fastkd.train.options import TrainConfig

    with pytest.raises(TypeError, match="train.allow_shorter_schedule must be a bool, got .yes."):
        TrainConfig(allow_shorter_schedule="yes")


def _plant_temp_files(directory):
    directory.mkdir(parents=True, exist_ok=True)
    stale = [directory / ".checkpoint_000000002.pt.k3j_x9ab.tmp", directory / ".checkpoint_000000004.pt.0a1b2c3d.tmp"]
    kept = [directory / ".student.pt.abcd1234.tmp", directory / "checkpoint_000000002.pt.tmp",
            directory / ".checkpoint_x.pt.abcd1234.tmp", directory / "notes.txt"]
    for path in stale + kept:
        path.write_bytes(b"partial")
    return stale, kept


def test_checkpoint_manager_finds_only_its_own_temp_files(tmp_path):
    stale, kept = _plant_temp_files(tmp_path / "checkpoints")
    manager = CheckpointManager(tmp_path / "checkpoints")
    assert manager.stale_temp_files() == sorted(stale)
    assert manager.remove_stale_temp_files() == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert CheckpointManager(tmp_path / "absent").remove_stale_temp_files() == []


@pytest.mark.parametrize("resume", [False, True])
def test_trainer_start_removes_stale_checkpoint_temp_files(tmp_path, capsys, resume):
    if resume:
        make_trainer(tmp_path, max_steps=1).fit()
    stale, kept = _plant_temp_files(tmp_path / "checkpoints")
    outside = tmp_path / ".checkpoint_000000002.pt.k3j_x9ab.tmp"  # not in the checkpoint folder: left alone
    outside.write_bytes(b"x")
    make_trainer(tmp_path, max_steps=2).fit(resume=resume)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept) and outside.exists()
    assert "removed 2 stale temporary checkpoint file(s)" in capsys.readouterr().out
