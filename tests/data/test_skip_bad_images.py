"""data.skip_bad_images: the torch loader drops undecodable images (counted, warned once per file),
the DALI backends refuse the option, and a training run over a folder with a corrupt file finishes."""

from pathlib import Path

import pytest
import torch

from fastkd.config import ConfigError, DataConfig, load_config
from fastkd.data import build_loader
from fastkd.data.datasets import BadImageError

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo"


def _corrupt(folder: Path) -> Path:
    path = folder / "class1" / "broken.jpg"
    path.write_bytes(b"not a jpeg at all " * 20)
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_skips_and_counts_bad_images(tiny_folder, capsys, workers):
    broken = _corrupt(tiny_folder)
    loader = build_loader(tiny_folder, "eval", batch_size=4, backend="torch", num_workers=workers, size=8,
                          skip_bad_images=True)
    try:
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert sorted(len(b.labels) for b in batches) == [3, 4, 4, 4]  # 16 files, one dropped
            indices = torch.cat([b.indices for b in batches]).tolist()
            assert len(indices) == 15 and all(b.views[0].shape[0] == len(b.labels) for b in batches)
            assert loader.skipped_images == epoch + 1
    finally:
        loader.close()
    assert loader.bad_images == {str(broken)}
    err = capsys.readouterr().err
    assert err.count("skipping undecodable image") == 1 and "broken.jpg" in err  # once per file


def test_a_batch_left_empty_is_not_yielded(tiny_folder):
    _corrupt(tiny_folder)
    loader = build_loader(tiny_folder, "eval", batch_size=1, backend="torch", num_workers=0, size=8,
                          skip_bad_images=True)
    assert len(loader) == 16 and len(list(loader)) == 15 and loader.skipped_images == 1


def test_without_the_option_a_bad_image_still_raises(tiny_folder):
    _corrupt(tiny_folder)
    loader = build_loader(tiny_folder, "eval", batch_size=4, backend="torch", num_workers=0, size=8)
    with pytest.raises(BadImageError, match="broken.jpg.*fastkd data scan"):
        list(loader)


@pytest.mark.parametrize("backend", ["dali", "dali_cpu"])
def test_dali_backends_refuse_the_option(tiny_folder, backend):
    with pytest.raises(ValueError, match="skip_bad_images.*needs backend 'torch'"):
        build_loader(tiny_folder, "eval", batch_size=4, backend=backend, skip_bad_images=True)
    with pytest.raises(ConfigError, match="data.skip_bad_images needs data.backend 'torch'"):
        DataConfig(backend=backend, skip_bad_images=True)
    with pytest.raises(ConfigError, match="data.skip_bad_images must be a bool"):
        DataConfig(skip_bad_images="yes")


@pytest.mark.parametrize("skip", [True, False])
def test_training_over_a_corrupt_file(tiny_folder, tmp_path, skip):
    from fastkd.runner import train_from_config

    _corrupt(tiny_folder)  # 16 files, batch 8: two steps per epoch cover every file once
    overrides = [f"data.source={tiny_folder}", "data.batch_size=8", "data.num_workers=0", "data.backend=torch",
                 f"data.skip_bad_images={'true' if skip else 'false'}", "train.epochs=1",
                 f"train.output_dir={tmp_path / 'run'}", "train.progress=false", "train.tensorboard=false"]
    config = load_config(DEMO / "mae.yaml", overrides)
    if not skip:
        with pytest.raises(BadImageError, match="broken.jpg"):
            train_from_config(config)
        return
    result = train_from_config(config)
    assert result.step == result.total_steps == 2
    assert result.summary["skipped_images"] == 1
    assert (tmp_path / "run" / "student.pt").is_file()


def test_trainer_reports_an_epoch_that_ends_early(tmp_path):
    from tests.train.test_trainer import make_trainer

    trainer = make_trainer(tmp_path, batch=8, epochs=1)  # 32 images: 4 batches

    class Short:
        def __init__(self, loader):
            self.loader = loader

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            return iter(list(self.loader)[:3])

    trainer.loader = Short(trainer.loader)
    with pytest.raises(ValueError, match="ended epoch 0 after 3 batches, but len\\(loader\\) is 4"):
        trainer.fit()
