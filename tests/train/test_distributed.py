import pytest
import torch

from fastkd.train import distributed


def test_single_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = distributed.init_distributed("cpu")
    assert (env.rank, env.world_size, env.is_main, env.is_distributed) == (0, 1, True, False)
    assert env.device == torch.device("cpu")
    assert distributed.any_across_ranks(True, env.device) and not distributed.any_across_ranks(False, env.device)
    assert distributed.mean_across_ranks({"a": 2.0}, env.device) == {"a": 2.0}
    assert distributed.gather_objects({"x": 1}) == [{"x": 1}]


def test_bad_environment_and_device(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5, WORLD_SIZE=2"):
        distributed.init_distributed("cpu")
    with pytest.raises(ValueError, match="device must be"):
        distributed.resolve_device("tpu")
