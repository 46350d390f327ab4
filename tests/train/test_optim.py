import pytest
import torch
from torch import nn

from fastkd.train.optim import LARS, apply_schedules, build_optimizer


def _groups(model):
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": 1.0}, {"params": no_decay, "weight_decay": 0.0, "name": "bias"}]


def test_lars_step_matches_formula():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    opt = build_optimizer(_groups(model), "lars", momentum=0.9, trust_coefficient=0.02)
    apply_schedules(opt, lr=0.5, weight_decay=0.1)
    model(torch.randn(4, 5)).square().sum().backward()
    gw, gb = model.weight.grad.clone(), model.bias.grad.clone()
    opt.step()
    g = gw + 0.1 * w0
    expected_w = w0 - 0.5 * g * (0.02 * w0.norm() / g.norm())
    torch.testing.assert_close(model.weight.detach(), expected_w)
    torch.testing.assert_close(model.bias.detach(), b0 - 0.5 * gb)  # bias: no decay, no trust ratio


def test_lars_leaves_1d_tensors_alone_in_a_decayed_group():
    """MoCo v3 hands LARS every parameter in one decayed group; its LARS decays and rescales only
    tensors of > 1 dim (biases and norm weights get plain momentum SGD), as the official optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3))
    reference = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer([{"params": list(model.parameters()), "weight_decay": 1.0}], "lars",
                          momentum=0.9, trust_coefficient=0.02)
    apply_schedules(opt, lr=0.5, weight_decay=0.1)
    model(torch.randn(4, 5)).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, p0, g in zip(model.parameters(), reference, grads):
        if p.dim() > 1:
            g = g + 0.1 * p0
            g = g * (0.02 * p0.norm() / g.norm())
        torch.testing.assert_close(p.detach(), p0 - 0.5 * g)


def test_lars_momentum_accumulates():
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = LARS([{"params": [p], "wd_scale": 0.0}], lr=1.0, momentum=0.5)
    for _ in range(2):
        p.grad = torch.tensor([1.0, 1.0])
        opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0 - 1.0 - 1.5, 2.0 - 1.0 - 1.5]))


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("lars", LARS)])
def test_schedules_reach_groups_by_scale(name, cls):
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = _groups(model)
    groups[0]["lr_scale"] = 0.5
    opt = build_optimizer(groups, name)
    assert isinstance(opt, cls)
    apply_schedules(opt, lr=0.2, weight_decay=0.05)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.param_groups[1]["name"] == "bias"


def test_frozen_parameters_are_left_out():
    model = nn.Linear(3, 3)
    model.bias.requires_grad_(False)
    opt = build_optimizer([{"params": list(model.parameters()), "weight_decay": 1.0}], "adamw")
    assert opt.param_groups[0]["params"] == [model.weight]


def test_bad_arguments():
    with pytest.raises(ValueError, match="optimizer name"):
        build_optimizer(_groups(nn.Linear(2, 2)), "adam")
    with pytest.raises(TypeError, match=r"param_groups\[0\]"):
        build_optimizer([[1, 2]], "sgd")
    with pytest.raises(ValueError, match="no parameter"):
        build_optimizer([{"params": [nn.Parameter(torch.ones(1), requires_grad=False)]}], "sgd")
    with pytest.raises(ValueError, match="momentum"):
        LARS([nn.Parameter(torch.ones(1))], momentum=1.5)


def _reference_lars_step(params, bufs, lr, wd, momentum, eta, adapt):
    """LARS as a plain per-parameter loop (the formula of the module docstring); a parameter without
    a gradient is left alone, its momentum buffer too."""
    for p, buf in zip(params, bufs):
        g = p.grad
        if g is None:
            continue
        if adapt and p.dim() > 1:  # MoCo v3's LARS: tensors of <= 1 dim get no decay, no trust ratio
            g = g + wd * p
            w_norm, g_norm = p.norm(), g.norm()
            if w_norm > 0 and g_norm > 0:
                g = g * (eta * w_norm / g_norm)
        buf.mul_(momentum).add_(g)
        p.sub_(lr * buf)


def _model_and_batches(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    batches = [torch.randn(4, 6) for _ in range(5)]
    return model, batches


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_or_foreach_equals_single_tensor_form(name):
    model, batches = _model_and_batches()
    reference, _ = _model_and_batches()
    opt = build_optimizer(_groups(model), name)
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.SGD
    groups = [{**g, "lr": 0.0, "weight_decay": 0.0, "wd_scale": g["weight_decay"], "lr_scale": 1.0}
              for g in _groups(reference)]
    extra = dict(momentum=0.9) if name == "sgd" else {}
    ref_opt = cls(groups, lr=0.0, weight_decay=0.0, foreach=False, **extra)
    for step, x in enumerate(batches):
        for m, o in ((model, opt), (reference, ref_opt)):
            apply_schedules(o, lr=0.05 / (step + 1), weight_decay=0.1)
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_a_parameter_whose_first_gradient_comes_later(name):
    """MOKD freezes its last layer for the first epoch (no gradient), then trains it: every
    optimiser must start that parameter's state late, as the single-tensor form does (torch's fused
    SGD with momentum crashed here)."""
    model, batches = _model_and_batches()
    reference, _ = _model_and_batches()
    opt = build_optimizer(_groups(model), name)
    ref_groups = [{**g, "lr": 0.0, "weight_decay": 0.0, "wd_scale": g["weight_decay"], "lr_scale": 1.0}
                  for g in _groups(reference)]
    bufs = [[torch.zeros_like(p) for p in g["params"]] for g in ref_groups]  # LARS's plain loop
    ref_opt = (torch.optim.AdamW(ref_groups, lr=0.0, foreach=False) if name == "adamw" else
               torch.optim.SGD(ref_groups, lr=0.0, momentum=0.9, foreach=False))
    for step, x in enumerate(batches):
        for m, o in ((model, opt), (reference, ref_opt)):
            apply_schedules(o, lr=0.05, weight_decay=0.1)
            o.zero_grad()
            m(x).square().mean().backward()
            if step < 2:  # the first layer's weight is "frozen": no gradient for two steps
                m[0].weight.grad = None
            if name == "lars" and o is ref_opt:
                with torch.no_grad():
                    for g, b in zip(ref_groups, bufs):
                        _reference_lars_step(g["params"], b, 0.05, 0.1 * g["wd_scale"], 0.9, 0.001,
                                             g["wd_scale"] > 0)
            else:
                o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_foreach_lars_equals_per_parameter_loop():
    model, batches = _model_and_batches()
    reference, _ = _model_and_batches()
    opt = build_optimizer(_groups(model), "lars", momentum=0.9, trust_coefficient=0.02)
    ref_groups = _groups(reference)
    bufs = [[torch.zeros_like(p) for p in g["params"]] for g in ref_groups]
    for step, x in enumerate(batches):
        apply_schedules(opt, lr=0.3 / (step + 1), weight_decay=0.1)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        reference.zero_grad()
        reference(x).square().mean().backward()
        with torch.no_grad():
            for g, b in zip(ref_groups, bufs):
                _reference_lars_step(g["params"], b, 0.3 / (step + 1), 0.1 * g["weight_decay"], 0.9, 0.02,
                                     g["weight_decay"] > 0)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
