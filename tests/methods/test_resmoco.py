import math

import pytest
import torch

from fastkd.methods import build_method
from tests.methods.common import check_gradients, check_parts_and_total, steps_lower_loss
from tests.methods.plain import TINY_MOCO as MOCO_CONFIG, plain_branches, plain_contrastive, plain_vit, tiny_batch

CONFIG = {**MOCO_CONFIG, "residual_weight": 0.7}
PARTS = {"contrastive": 1.0, "residual": 0.7}
METRICS = ("param_gap_sq", "param_cos")


def _moved_teacher(method):
    """Make the momentum encoder differ from the online one (as after training steps)."""
    with torch.no_grad():
        for p in method.momentum_encoder.module.parameters():
            p.add_(0.02 * torch.randn_like(p))


def _plain_residual(a, b):
    return (2 - 2 * (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean()


@pytest.mark.parametrize("tap", ["projector", "backbone"])
def test_parts_reference_and_gradients(tap):
    method = build_method("resmoco", {**CONFIG, "residual_tap": tap})
    _moved_teacher(method)
    batch = tiny_batch(views=2, B=4)
    out = method(batch)
    check_parts_and_total(out, PARTS, METRICS)
    assert math.isnan(out["param_gap_sq"].item())
    q, k = plain_branches(method, batch.views)
    contrastive = plain_contrastive(q[0], k[1], 0.2) + plain_contrastive(q[1], k[0], 0.2)
    backbone, projector = method.base_encoder
    m_backbone, m_projector = method.momentum_encoder.module
    residual = 0.0
    for x in batch.views:
        h, h_m = plain_vit(backbone, x)[0][:, 0], plain_vit(m_backbone, x)[0][:, 0].detach()
        residual = residual + (_plain_residual(projector(h), m_projector(h_m)) if tap == "projector"
                               else _plain_residual(h, h_m))
    torch.testing.assert_close(out["contrastive"], contrastive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["residual"], residual.detach(), rtol=1e-5, atol=1e-5)
    check_gradients(method, out, frozen=[method.momentum_encoder.module])


def test_residual_weight_zero_is_mocov3():
    torch.manual_seed(0)
    res = build_method("resmoco", {**CONFIG, "residual_weight": 0.0})
    torch.manual_seed(0)
    moco = build_method("mocov3", MOCO_CONFIG)
    batch = tiny_batch(views=2, B=4)
    torch.testing.assert_close(res(batch)["loss"], moco(batch)["loss"])


def test_after_step_reports_parameter_gap():
    method = build_method("resmoco", CONFIG)
    _moved_teacher(method)
    student = [p.detach().double() for p in method.base_encoder.parameters()]
    teacher = [p.detach().double() for p in method.momentum_encoder.module.parameters()]
    diff_sq = sum(((s - t) ** 2).sum() for s, t in zip(student, teacher)).item()
    cos = (sum((s * t).sum() for s, t in zip(student, teacher))
           / math.sqrt(sum((t * t).sum() for t in teacher) * sum((s * s).sum() for s in student))).item()
    method.after_step(0, 10)
    out = method(tiny_batch(views=2, B=4))
    assert out["param_gap_sq"].item() == pytest.approx(diff_sq, rel=1e-6)
    assert out["param_cos"].item() == pytest.approx(cos, rel=1e-6)


def test_steps_lower_loss():
    method = build_method("resmoco", CONFIG)
    _moved_teacher(method)  # at teacher == student the residual term starts at its minimum, 0
    first, last = steps_lower_loss(method, tiny_batch(views=2, B=8))
    assert last < first


def test_bad_switch():
    with pytest.raises(ValueError, match="residual_tap"):
        build_method("resmoco", {**CONFIG, "residual_tap": "predictor"})


def test_inherits_mocov3_vit_defaults():
    method = build_method("resmoco", CONFIG)
    assert method.config.residual_tap == "projector" and method.config.residual_weight == 0.7
    assert not method.student.model.pos_embed.requires_grad
    assert not method.predictor.mlp[-1].affine
    assert method.ema_teacher_backbone is method.momentum_encoder.module[0]


def test_after_step_decided_on_the_device():
    """``after_step(found_inf=1)``: encoder and recorded gap unchanged; ``found_inf=0``: as the host path."""
    torch.manual_seed(0)
    host, device = build_method("resmoco", CONFIG), build_method("resmoco", CONFIG)
    _moved_teacher(host)
    device.load_state_dict(host.state_dict())
    before = {k: v.clone() for k, v in device.state_dict().items()}
    device.after_step(0, 10, found_inf=torch.ones(()))
    for name, value in device.state_dict().items():  # param_gap starts as NaN
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True, msg=name)
    device.after_step(0, 10, found_inf=torch.zeros(()))
    host.after_step(0, 10)
    torch.testing.assert_close(device.param_gap, host.param_gap, rtol=1e-9, atol=0)
    for (name, a), b in zip(host.state_dict().items(), device.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
