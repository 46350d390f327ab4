"""The training-checkpoint schema has one home, fastkd.train.checkpoint.TrainingState: it round-trips
through a checkpoint file, the trainer writes it, and a file of another schema version is refused
by the trainer's resume and by fastkd.eval.models with both versions named."""

import pytest
import torch

from fastkd.eval.models import load_eval_model
from fastkd.train.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointManager, TrainingState
from tests.train.test_trainer import make_trainer


def _state(**changes) -> TrainingState:
    values = dict(step=6, total_steps=10, epoch=1, batches_in_epoch=2, world_size=2,
                  method={"w": torch.arange(3.0)}, optimizers={"all": {"state": {}}}, scaler={},
                  schedules={"all": {"lr": {"peak": 0.1}, "weight_decay": {"peak": 0.0}}}, skipped=2, consecutive=1,
                  rng=[{"torch": torch.zeros(2, dtype=torch.uint8)}], config={"method": {"name": "mae"}})
    return TrainingState(**{**values, **changes})


def test_round_trip_through_a_checkpoint_file(tmp_path):
    state = _state()
    manager = CheckpointManager(tmp_path)
    manager.save(state.to_dict(), state.step)
    loaded, path = manager.load_latest()
    assert loaded["format"] == CHECKPOINT_FORMAT == f"fastkd-train-v{CHECKPOINT_VERSION}"
    again = TrainingState.from_dict(loaded, path)
    assert torch.equal(again.method["w"], state.method["w"]) and torch.equal(again.rng[0]["torch"], state.rng[0]["torch"])
    assert {k: v for k, v in vars(again).items() if k not in ("method", "rng")} == \
        {k: v for k, v in vars(state).items() if k not in ("method", "rng")}


def test_trainer_writes_the_schema(tmp_path):
    make_trainer(tmp_path, max_steps=2).fit()
    state, path = CheckpointManager(tmp_path / "checkpoints").load_latest()
    restored = TrainingState.from_dict(state, path)
    assert (restored.step, restored.skipped, restored.consecutive, restored.world_size) == (2, 0, 0, 1)
    assert set(state) == set(_state().to_dict())


@pytest.mark.parametrize("fmt, message", [
    ("fastkd-train-v2", f"a training checkpoint of schema version 2; this fastkd reads version {CHECKPOINT_VERSION}"),
    (None, f"not a fastkd training checkpoint \\(format None\\); this fastkd reads version {CHECKPOINT_VERSION}"),
])
def test_other_versions_are_refused(tmp_path, fmt, message):
    with pytest.raises(ValueError, match=f"ckpt.pt is {message}"):
        TrainingState.from_dict({**_state().to_dict(), "format": fmt}, tmp_path / "ckpt.pt")


def test_resume_and_eval_refuse_a_newer_version(tmp_path):
    make_trainer(tmp_path, max_steps=2).fit()
    manager = CheckpointManager(tmp_path / "checkpoints")
    state, path = manager.load_latest()
    manager.save({**state, "format": "fastkd-train-v9"}, 2)
    with pytest.raises(ValueError, match=f"{path} is a training checkpoint of schema version 9; this fastkd reads "
                                         f"version {CHECKPOINT_VERSION}"):
        make_trainer(tmp_path, max_steps=2).fit(resume=True)
    with pytest.raises(ValueError, match="schema version 9"):
        load_eval_model(path)
