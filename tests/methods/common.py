"""Checks every method test runs: documented parts, total == weighted sum, gradients reach the
trainable student side only, and a few optimiser steps on a fixed batch lower the loss."""

from __future__ import annotations

import torch


def check_parts_and_total(out: dict, weights: dict, metrics: tuple = ()) -> None:
    assert set(out) == {"loss", *weights, *metrics}, sorted(out)
    for name in (*weights, *metrics):
        assert not out[name].requires_grad, f"{name} is not detached"
    expected = sum(w * out[name] for name, w in weights.items())
    torch.testing.assert_close(out["loss"].detach(), expected, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(out["loss"])


def check_gradients(method, out: dict, frozen: list) -> None:
    """``out["loss"].backward()`` reaches every trainable parameter that takes part, none of the frozen."""
    method.zero_grad(set_to_none=True)
    out["loss"].backward()
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    for module in frozen:
        for name, p in module.named_parameters():
            assert not p.requires_grad, f"frozen parameter {name} requires grad"
            assert p.grad is None, f"frozen parameter {name} received a gradient"


def steps_lower_loss(method, batch, *, steps: int = 6, lr: float = 1e-3, seed: int = 0) -> tuple[float, float]:
    """Loss before and after ``steps`` AdamW steps on one batch (the same random masks each step)."""
    optimiser = torch.optim.AdamW(method.param_groups(0.0), lr=lr)
    losses = []
    for step in range(steps + 1):
        torch.manual_seed(seed)
        loss = method(batch)["loss"]
        losses.append(loss.item())
        if step == steps:
            break
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return losses[0], losses[-1]


def snapshot(module) -> list[torch.Tensor]:
    """The parameters of ``module`` (a momentum teacher's BatchNorm running statistics do move in
    its forward while its owner trains: they are its own, as in MoCo v3 / DINO)."""
    return [p.detach().clone() for p in module.parameters()]


def unchanged(module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = 1e-5) -> None:
    """``||actual - expected|| <= rtol * ||expected||`` (a tensor-wide relative error)."""
    error = (actual - expected).norm() / expected.norm().clamp_min(1e-30)
    assert error <= rtol, f"{name}: relative error {error.item():.2e} > {rtol:g}"
