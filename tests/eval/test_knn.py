import pytest
import torch
import torch.nn.functional as F

from fastkd.eval import knn_classify


def clusters(n_per_class, classes=5, dim=16, spread=0.05, seed=0):
    """``n_per_class`` points around each of ``classes`` fixed centres; ``seed`` draws the noise."""
    centres = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)), dim=1) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    noise = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed))
    return centres[labels] + spread * noise, labels


def reference_knn(train, train_labels, test, k, temperature, num_classes):
    """Materialised weighted k-NN, one test row at a time."""
    bank = F.normalize(train, dim=1)
    out = []
    for row in F.normalize(test, dim=1):
        sims = bank @ row
        top = sims.topk(k)
        votes = torch.zeros(num_classes)
        for s, i in zip(top.values, top.indices):
            votes[train_labels[i]] += torch.exp(s / temperature)
        out.append(int(votes.argmax()))
    return torch.tensor(out)


def test_well_separated_clusters_are_all_right():
    train, train_labels = clusters(30)
    test, test_labels = clusters(10, seed=1)
    result = knn_classify(train, train_labels, test, test_labels, k=20, temperature=0.07, chunk_size=7)
    assert result.top1 == 100.0 and result.top5 == 100.0
    assert torch.equal(result.predictions, test_labels)


@pytest.mark.parametrize("chunk_size", [1, 13, 4096])
def test_matches_materialised_reference_on_overlapping_data(chunk_size):
    train, train_labels = clusters(20, classes=4, spread=2.0)
    test, test_labels = clusters(9, classes=4, spread=2.0, seed=3)
    result = knn_classify(train, train_labels, test, test_labels, k=7, temperature=0.1, chunk_size=chunk_size)
    expected = reference_knn(train, train_labels, test, 7, 0.1, 4)
    assert torch.equal(result.predictions, expected)
    assert result.top1 == pytest.approx(100.0 * (expected == test_labels).float().mean().item())
    assert 0 < result.top1 < 100


def test_weights_beat_majority():
    """Two far neighbours of class 0 lose against one close neighbour of class 1 (exp(s/T) weights)."""
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([1, 0, 0])
    result = knn_classify(train, labels, torch.tensor([[1.0, 0.05]]), k=3, temperature=0.07)
    assert result.predictions.tolist() == [1]
    assert result.k == 3 and result.top1 != result.top1  # no test labels: NaN accuracy


def test_k_is_capped_at_the_train_size():
    train, labels = clusters(1, classes=3)
    assert knn_classify(train, labels, train, labels, k=20).k == 3


def test_bad_inputs():
    train, labels = clusters(2)
    with pytest.raises(ValueError, match="train_features must be a float tensor"):
        knn_classify(train[0], labels, train)
    with pytest.raises(ValueError, match="train_labels must be an int64"):
        knn_classify(train, labels.int(), train)
    with pytest.raises(ValueError, match="differ in width"):
        knn_classify(train, labels, train[:, :3])
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(train, labels, train, temperature=0)
    with pytest.raises(ValueError, match="num_classes"):
        knn_classify(train, labels, train, num_classes=2)
