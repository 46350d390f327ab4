"""Linear probe on frozen, cached features.

Features are standardised with the training set's per-dimension mean and std (what MAE's probe
does with a BatchNorm without affine in front of the classifier), then a linear classifier
``logits = ((x - mean) / std) @ W^T + b`` is trained with SGD (momentum 0.9, cosine lr) on the
cross-entropy ``CE(logits, y)``. The features are tensors in memory, so an epoch is a few matrix
products, not a pass through the backbone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastkd.checks import check_number, check_positive_ints, check_train_test_features
from fastkd.progress import progress_disable


@dataclass
class LinearProbeResult:
    """``top1`` / ``top5`` accuracy (percent) on the evaluation features, the trained
    ``classifier`` (standardisation folded into its weights) and the last epoch's mean train loss."""

    top1: float
    top5: float
    classifier: nn.Linear
    train_loss: float
    class_counts: dict | None = None  # {"train" | "val": {class name: images}} from fastkd.eval.evaluate_linear


def train_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                       test_labels: torch.Tensor, *, num_classes: int | None = None, epochs: int = 100,
                       lr: float = 0.1, weight_decay: float = 0.0, batch_size: int = 256,
                       seed: int = 0, progress: bool = True) -> LinearProbeResult:
    """Train a linear classifier on ``train_features`` and report accuracy on ``test_features``
    (``progress``: a bar over the epochs, see :func:`fastkd.progress.progress_disable`)."""
    check_train_test_features(train_features, train_labels, test_features, test_labels)
    check_positive_ints(epochs=epochs, batch_size=batch_size)
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        check_number(name, value, low=0, finite=True)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    check_number("num_classes (> max(train_labels))", num_classes, low=int(train_labels.max()) + 1, integer=True)
    x = train_features.float()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        classifier.weight.normal_(0, 0.01, generator=generator)
        classifier.bias.zero_()
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    total, step, epoch_loss = epochs * steps_per_epoch, 0, math.nan
    bar = tqdm(range(epochs), desc="linear probe", unit="epoch", disable=progress_disable(progress))
    for _ in bar:
        order = torch.randperm(x.shape[0], generator=generator)
        losses = []
        for start in range(0, x.shape[0], batch_size):
            index = order[start:start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(classifier(x[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            step += 1
        epoch_loss = float(torch.stack(losses).mean())
        bar.set_postfix(loss=f"{epoch_loss:.4g}", refresh=False)
    with torch.no_grad():
        folded = nn.Linear(x.shape[1], num_classes)
        folded.weight.copy_(classifier.weight / std)
        folded.bias.copy_(classifier.bias - (classifier.weight * (mean / std)).sum(1))
        ranked = folded(test_features.float()).topk(min(5, num_classes), dim=1).indices
        truth = test_labels[:, None]
        count = max(1, test_features.shape[0])
        top1 = 100.0 * float((ranked[:, :1] == truth).sum()) / count
        top5 = 100.0 * float((ranked == truth).any(dim=1).sum()) / count
    return LinearProbeResult(top1=top1, top5=top5, classifier=folded.requires_grad_(False), train_loss=epoch_loss)
