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
