"""Linear probe on frozen, cached features, and the parts every trained evaluation shares (result record, training
epoch, head init and folding, top-1 / top-5).

``logits = ((x - mean) / std) @ W^T + b`` with the train set's per-dimension mean and std (MAE's affine-free
BatchNorm), trained with SGD (momentum 0.9, cosine lr) on ``CE(logits, y)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastkd.checks import check_number, check_positive_ints, check_train_test_features
from fastkd.progress import progress_disable
from fastkd.train.optim import apply_schedules, build_optimizer
from fastkd.train.schedules import WarmupCosine


@dataclass
class EvalResult:
    """``top1`` / ``top5`` accuracy in percent; ``class_counts``: ``{"train" | "val": {class name: images}}``."""

    top1: float
    top5: float
    class_counts: dict | None = field(default=None, kw_only=True)

    def to_dict(self) -> dict:
        """Every field but models and tensors (JSON-ready: numbers, strings, lists, dicts)."""
        def kept(value):
            items = value if isinstance(value, list) else [value]
            return not any(isinstance(item, (nn.Module, torch.Tensor)) for item in items)

        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if kept(getattr(self, f.name))}


@dataclass
class LinearProbeResult(EvalResult):
    """The trained ``classifier`` (standardisation folded into its weights) and the last epoch's mean train loss."""

    classifier: nn.Linear
    train_loss: float


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent (top-5 = top-k with k = min(5, classes))."""
    return ranked_accuracy(logits.topk(min(5, logits.shape[1]), dim=1).indices, labels)


def ranked_accuracy(ranked: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent of ``ranked [N, <= 5]``, each row's classes best first."""
    truth = labels.to(ranked.device)[:, None]
    count = max(1, labels.shape[0])
    return (100.0 * float((ranked[:, :1] == truth).sum()) / count,
            100.0 * float((ranked == truth).any(dim=1).sum()) / count)


def init_linear(dim: int, num_classes: int, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear`` with ``W ~ N(0, 0.01^2)`` drawn from ``generator``, ``b = 0`` (DINO / MoCo v3 / MAE)."""
    linear = nn.Linear(dim, num_classes)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.01, generator=generator)
        linear.bias.zero_()
    return linear


@torch.no_grad()
def fold_linear(linear: nn.Linear, mean: torch.Tensor | float = 0.0, std: torch.Tensor | float = 1.0) -> nn.Linear:
    """A frozen CPU ``nn.Linear`` equal to ``linear((x - mean) / std)``: ``W / std``, ``b - W (mean / std)``."""
    weight, bias = linear.weight.detach().float().cpu(), linear.bias.detach().float().cpu()
    mean, std = torch.as_tensor(mean).float().cpu(), torch.as_tensor(std).float().cpu()
    folded = nn.Linear(weight.shape[1], weight.shape[0])
    folded.weight.copy_(weight / std)
    folded.bias.copy_(bias - (weight * (mean / std)).sum(1))
    return folded.requires_grad_(False)


def train_epoch(batches, loss_of, optimizer: torch.optim.Optimizer, schedule, step: int,
                bar=None) -> tuple[torch.Tensor, int]:
    """Per batch ``schedule(step)``, then one step on ``loss_of(batch).sum()`` (a scalar or one loss per head);
    returns the epoch's mean of ``loss_of`` and the next step."""
    losses = []
    for batch in batches:
        schedule(step)
        loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        losses.append(loss.detach())
        step += 1
        if bar is not None:
            bar.update(1)
    return torch.stack(losses).mean(0), step


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
    classifier = init_linear(x.shape[1], num_classes, generator)
    optimizer = build_optimizer([{"params": classifier.parameters()}], "sgd", momentum=0.9)
    cosine = WarmupCosine(peak=lr, total_steps=epochs * math.ceil(x.shape[0] / batch_size))
    step, epoch_loss = 0, math.nan
    bar = tqdm(range(epochs), desc="linear probe", unit="epoch", disable=progress_disable(progress))
    for _ in bar:
        order = torch.randperm(x.shape[0], generator=generator)
        loss, step = train_epoch(order.split(batch_size),
                                 lambda index: F.cross_entropy(classifier(x[index]), train_labels[index]),
                                 optimizer, lambda t: apply_schedules(optimizer, cosine(t), weight_decay), step)
        epoch_loss = float(loss)
        bar.set_postfix(loss=f"{epoch_loss:.4g}", refresh=False)
    folded = fold_linear(classifier, mean, std)
    with torch.no_grad():
        top1, top5 = topk_accuracy(folded(test_features.float()), test_labels)
    return LinearProbeResult(top1=top1, top5=top5, classifier=folded, train_loss=epoch_loss)
