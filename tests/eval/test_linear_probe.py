import pytest
import torch

from fastkd.eval import train_linear_probe
from tests.eval.test_knn import clusters


def test_separable_clusters_reach_full_accuracy():
    train, train_labels = clusters(40, spread=0.3)
    test, test_labels = clusters(10, spread=0.3, seed=1)
    result = train_linear_probe(train * 50 + 7, train_labels, test * 50 + 7, test_labels, epochs=8, batch_size=32)
    assert result.top1 == 100.0 and result.top5 == 100.0
    assert result.train_loss < 0.1
    # the returned classifier has the standardisation folded in: it works on raw features
    assert torch.equal(result.classifier(test * 50 + 7).argmax(1), test_labels)


def test_deterministic_for_a_seed():
    train, labels = clusters(10, spread=1.0)
    a = train_linear_probe(train, labels, train, labels, epochs=3, seed=4)
    b = train_linear_probe(train, labels, train, labels, epochs=3, seed=4)
    assert torch.equal(a.classifier.weight, b.classifier.weight)


def test_bad_inputs():
    train, labels = clusters(3)
    with pytest.raises(ValueError, match="epochs"):
        train_linear_probe(train, labels, train, labels, epochs=0)
    with pytest.raises(ValueError, match="test_labels must be an int64"):
        train_linear_probe(train, labels, train, labels[:-1])
