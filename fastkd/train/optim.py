"""Optimisers over a method's parameter groups: AdamW, SGD and LARS, biases and norms excluded.

The trainer asks the method for ``param_groups(weight_decay=1.0)``: each group's ``weight_decay``
is then a *multiplier* of the scheduled weight decay (1 for weights, 0 for biases and norm
weights), stored as ``wd_scale``; ``lr_scale`` (default 1) multiplies the scheduled lr.
:func:`apply_schedules` writes ``lr = lr(step) * lr_scale`` and
``weight_decay = wd(step) * wd_scale`` into every group before each step.

LARS (You et al. 2017, as used by MoCo v3 / BYOL) for a parameter ``w`` with gradient ``g``::

    g = g + wd * w
    g = g * (eta * ||w|| / ||g||)     if both norms > 0
    (both lines only for tensors of > 1 dim in groups with wd_scale > 0: biases and norm weights
    get neither, whichever group holds them, as MoCo v3's LARS)
    buf = momentum * buf + g
    w = w - lr * buf

computed for all tensors of a group at once with ``torch._foreach_*`` ops.
"""

from __future__ import annotations

from typing import Iterable

import torch

from fastkd.checks import check_choice, check_instance, check_number

OPTIMIZERS = ("adamw", "sgd", "lars")
CLIP_MODES = ("norm", "per_param")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling; groups with ``wd_scale == 0``
    (biases, norm weights) and tensors of <= 1 dim in any group get neither weight decay nor the
    trust-ratio scaling."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        check_number("lr", lr, low=0)
        check_number("momentum", momentum, low=0, high=1, high_open=True)
        check_number("trust_coefficient", trust_coefficient, low=0, low_open=True)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient, wd_scale=1.0)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            adapted = group["wd_scale"] > 0  # weights (> 1 dim): decay and trust ratio, all at once
            weights = [p for p in params if adapted and p.dim() > 1]
            others = [p for p in params if not (adapted and p.dim() > 1)]
            params, grads = weights + others, [p.grad for p in others]
            if weights:
                decayed = torch._foreach_add([p.grad for p in weights], weights, alpha=group["weight_decay"])
                w_norms = torch.stack(torch._foreach_norm(weights))
                g_norms = torch.stack(torch._foreach_norm(decayed))
                trust = torch.where((w_norms > 0) & (g_norms > 0),
                                    group["trust_coefficient"] * w_norms / g_norms, torch.ones_like(w_norms))
                torch._foreach_mul_(decayed, list(trust.unbind()))
                grads = list(decayed) + grads
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss


def _fused_or_foreach(cls, groups: list[dict], **kwargs) -> torch.optim.Optimizer:
    """``cls(groups, fused=True)`` where torch has a fused kernel for these parameters, else
    ``foreach=True``. SGD with momentum is always ``foreach``: torch's fused SGD decides "first step"
    from the first parameter's momentum buffer alone and crashes when a parameter's first gradient
    comes later (MOKD's last layer, frozen for its first epoch)."""
    if cls is torch.optim.SGD and kwargs.get("momentum", 0.0) > 0:
        return cls(groups, foreach=True, **kwargs)
    try:
        return cls(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return cls(groups, foreach=True, **kwargs)


def build_optimizer(param_groups: Iterable[dict], name: str = "adamw", *, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, momentum: float = 0.9,
                    trust_coefficient: float = 0.001) -> torch.optim.Optimizer:
    """Build ``name`` (``adamw`` | ``sgd`` | ``lars``) over groups from ``method.param_groups(1.0)``:
    AdamW and SGD fused where torch can, else ``foreach``; LARS on ``torch._foreach_*`` ops. Each
    group's ``weight_decay`` is read as the multiplier ``wd_scale``; lr and weight decay start at 0
    and are set by :func:`apply_schedules` before every step."""
    check_choice("optimizer name", name, OPTIMIZERS)
    groups = []
    for index, group in enumerate(param_groups):
        check_instance(f"param_groups[{index}]", group, dict, "a dict with 'params'")
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            continue
        wd_scale, lr_scale = float(group.get("weight_decay", 1.0)), float(group.get("lr_scale", 1.0))
        check_number(f"param_groups[{index}] weight_decay", wd_scale, low=0)
        check_number(f"param_groups[{index}] lr_scale", lr_scale, low=0)
        extra = {k: v for k, v in group.items() if k not in ("params", "weight_decay", "lr", "lr_scale")}
        groups.append({**extra, "params": params, "lr": 0.0, "weight_decay": 0.0,
                       "wd_scale": wd_scale, "lr_scale": lr_scale})
    if not groups:
        raise ValueError("param_groups holds no parameter that requires grad")
    if name == "adamw":
        return _fused_or_foreach(torch.optim.AdamW, groups, lr=0.0, betas=tuple(betas), eps=eps, weight_decay=0.0)
    if name == "sgd":
        return _fused_or_foreach(torch.optim.SGD, groups, lr=0.0, momentum=momentum, weight_decay=0.0)
    return LARS(groups, momentum=momentum, trust_coefficient=trust_coefficient)


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can skip its update on a device-side ``found_inf`` flag (torch's fused
    Adam / AdamW / SGD: state, step counts and parameters untouched when the flag is 1)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)) \
        and bool(optimizer.defaults.get("fused"))


def step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()`` that changes nothing when the 0-dim fp32 device tensor ``found_inf`` is
    1, decided on the device (the attributes a GradScaler sets for fused optimisers)."""
    assert takes_found_inf(optimizer), f"{type(optimizer).__name__} cannot skip on a device-side flag"
    optimizer.grad_scale, optimizer.found_inf = None, found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set every group's ``lr = lr * lr_scale`` and ``weight_decay = weight_decay * wd_scale`` (the
    schedules' values, ``>= 0``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)


@torch.no_grad()
def clip_grad_per_param_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each parameter's gradient to l2 norm ``max_norm`` on its own (DINO's / MOKD's
    ``utils.clip_gradients``: ``g *= max_norm / (||g|| + 1e-6)`` where that factor is below 1),
    in place; ``max_norm=inf`` only measures. Returns the total l2 norm of all gradients before
    clipping (fp32, on the gradients' device), as ``clip_grad_norm_`` does; no host sync."""
    check_number("max_norm", max_norm, low=0, low_open=True)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    totals = []
    for group in groups.values():
        norms = torch.stack(torch._foreach_norm(group)).float()
        totals.append(norms.square().sum())
        if max_norm != float("inf"):
            factors = torch.clamp(max_norm / (norms + 1e-6), max=1.0).to(group[0].dtype)
            torch._foreach_mul_(group, list(factors.unbind()))
    device = grads[0].device
    return torch.stack([t.to(device) for t in totals]).sum().sqrt()
