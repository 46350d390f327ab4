"""Weighted k-nearest-neighbour classification of frozen features (the DINO / InstDisc protocol).

With l2-normalised train features ``F`` ``[N, D]``, labels ``y`` and a test feature ``f``::

    s = F @ f                                   (cosine similarities)
    (s_k, i_k) = topk(s, k)
    votes[c] = sum_k exp(s_k / T) * [y[i_k] == c]
    prediction = argmax_c votes[c]

Test rows go in chunks of ``chunk_size`` (default ``max(1, MAX_SIMILARITIES // N)``, 256 MiB of fp32 similarities).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastkd.checks import check_number, check_train_test_features
from fastkd.eval.linear_probe import EvalResult, ranked_accuracy

MAX_SIMILARITIES = 2**26


@dataclass
class KNNResult(EvalResult):
    """``predictions`` ``[M]``: the top-1 class of each test row; ``top1`` / ``top5`` NaN without test labels."""

    predictions: torch.Tensor
    k: int
    temperature: float


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor | None = None, *, num_classes: int | None = None, k: int = 20,
                 temperature: float = 0.07, chunk_size: int | None = None) -> KNNResult:
    """Weighted k-NN predictions and accuracies (NaN without ``test_labels``); ``k`` capped at the train size."""
    check_train_test_features(train_features, train_labels, test_features, test_labels)
    check_number("len(train_features)", train_features.shape[0], low=1)
    check_number("k", k, low=1, integer=True)
    check_number("temperature", temperature, low=0, low_open=True, finite=True)
    if chunk_size is None:
        chunk_size = max(1, MAX_SIMILARITIES // train_features.shape[0])
    check_number("chunk_size", chunk_size, low=1, integer=True)
    check_number("min(train_labels)", int(train_labels.min()), low=0)
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    check_number("num_classes (> max(train_labels))", num_classes, low=int(train_labels.max()) + 1, integer=True)
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)
    rankings = []  # per test row its top min(5, classes) classes by votes, best first
    for start in range(0, test_features.shape[0], chunk_size):
        queries = F.normalize(test_features[start:start + chunk_size].float().to(bank.device), dim=1)
        similarity, index = (queries @ bank.T).topk(k, dim=1)
        votes = torch.zeros(queries.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, train_labels.to(bank.device)[index], (similarity / temperature).exp())
        rankings.append(votes.topk(min(5, num_classes), dim=1).indices)
    ranked = torch.cat(rankings) if rankings else torch.empty(0, 1, dtype=torch.int64)
    labelled = test_labels is not None and ranked.shape[0] > 0
    top1, top5 = ranked_accuracy(ranked, test_labels) if labelled else (float("nan"), float("nan"))
    return KNNResult(top1=top1, top5=top5, predictions=ranked[:, 0], k=k, temperature=float(temperature))
