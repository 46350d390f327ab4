import pytest
import torch
from torch import nn

from fastkd.data import Batch
from fastkd.eval import FeatureSet, cached_features, extract_features, load_eval_model


class Batches:
    """Two batches in shuffled index order."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        images = torch.randn(6, 3, 4, 4, generator=g)
        for index in (torch.tensor([4, 0, 2]), torch.tensor([1, 5, 3])):
            yield Batch(views=[images[index]], labels=index % 2, indices=index)


def test_features_come_back_in_index_order_and_mode_is_restored():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5), nn.Dropout(0.5)).train()
    result = extract_features(model, Batches())
    assert model.training
    images = torch.cat([b.views[0] for b in Batches()])
    order = torch.cat([b.indices for b in Batches()]).argsort()
    assert torch.equal(result.indices, torch.arange(6))
    torch.testing.assert_close(result.features, model.eval()(images[order]))
    assert torch.equal(result.labels, torch.arange(6) % 2)


def test_cache_is_written_then_read(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return FeatureSet(torch.ones(2, 3), torch.tensor([0, 1]), torch.tensor([0, 1]))

    first = cached_features(tmp_path / "f.pt", compute)
    second = cached_features(tmp_path / "f.pt", compute)
    assert len(calls) == 1 and torch.equal(first.features, second.features)


def test_bad_model_output():
    with pytest.raises(ValueError, match=r"must return features \[B, D\]"):
        extract_features(nn.Identity(), Batches())
    with pytest.raises(ValueError, match="no batch"):
        extract_features(nn.Linear(2, 2), [])


def test_load_eval_model_from_a_fastkd_backbone_file(tmp_path):
    from fastkd.models import build_backbone, save_backbone

    backbone = build_backbone("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    save_backbone(backbone, tmp_path / "student.pt")
    loaded = load_eval_model(tmp_path / "student.pt")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), backbone.eval()(x))
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match="give arch"):
        torch.save({"w": torch.ones(1)}, tmp_path / "other.pt")
        load_eval_model(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load_eval_model(tmp_path / "missing.pt")
