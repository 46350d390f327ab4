"""FeatureAlignLoss against the torch.nn losses it equals, reductions and masks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastkd.losses import FeatureAlignLoss
from fastkd.ops import feature_align_reference


def _pair(shape=(3, 11, 40), dtype=torch.float32):
    student = torch.randn(shape).to(dtype).requires_grad_()
    teacher = (torch.randn(shape) * 3 + 1).to(dtype)
    return student, teacher


def _grad(value, student):
    (grad,) = torch.autograd.grad(value, student)
    return grad


@pytest.mark.parametrize(
    "loss, target_norm, nn_loss",
    [
        ("smooth_l1", "layernorm", nn.SmoothL1Loss(beta=2.0)),
        ("mse", "layernorm", nn.MSELoss()),
        ("smooth_l1", "none", nn.SmoothL1Loss(beta=2.0)),
    ],
)
def test_mean_without_mask_equals_torch_nn(loss, target_norm, nn_loss):
    student, teacher = _pair()
    ours = FeatureAlignLoss(target_norm=target_norm, loss=loss)(student, teacher)
    target = F.layer_norm(teacher, teacher.shape[-1:], eps=1e-6) if target_norm == "layernorm" else teacher
    expected = nn_loss(student, target)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(_grad(ours, student), _grad(expected, student))


def test_cosine_equals_one_minus_cosine_similarity_with_l2_student():
    student, teacher = _pair()
    ours = FeatureAlignLoss(target_norm="l2", student_norm=True, loss="cosine")(student, teacher)
    expected = (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(_grad(ours, student), _grad(expected, student))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mask_kind", ["none", "mixed", "all_true", "all_false", "float"])
def test_reductions_and_masks(dtype, reduction, mask_kind):
    student, teacher = _pair(dtype=dtype)
    mask = {
        "none": None,
        "mixed": torch.rand(3, 11) > 0.6,
        "all_true": torch.ones(3, 11, dtype=torch.bool),
        "all_false": torch.zeros(3, 11, dtype=torch.bool),
        "float": torch.rand(3, 11),
    }[mask_kind]
    ours = FeatureAlignLoss(reduction=reduction)(student, teacher, mask)
    rows = feature_align_reference(student, teacher, mask)
    weight = torch.ones(3, 11) if mask is None else mask.float()
    expected = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / weight.sum().clamp_min(1e-30)}[reduction]
    grad, expected_grad = _grad(ours.sum(), student).float(), _grad(expected.sum(), student).float()
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=rtol * expected_grad.abs().max().item() + 1e-12)
    assert torch.isfinite(ours).all()
    if mask_kind == "all_false":
        assert ours.abs().sum() == 0 and grad.abs().sum() == 0


def test_cls_features_and_upstream_weight():
    student, teacher = _pair((8, 256))
    loss_fn = FeatureAlignLoss()
    ours = 0.3 * loss_fn(student, teacher)
    expected = 0.3 * nn.SmoothL1Loss(beta=2.0)(student, F.layer_norm(teacher, (256,), eps=1e-6))
    torch.testing.assert_close(_grad(ours, student), _grad(expected, student))


def test_torch_compile_fullgraph():
    loss_fn = FeatureAlignLoss(loss="mse")
    compiled = torch.compile(lambda s, t, m: loss_fn(s, t, m), fullgraph=True, backend="aot_eager")
    student, teacher = _pair()
    mask = torch.rand(3, 11) > 0.5
    out = compiled(student, teacher, mask)
    ref = loss_fn(student, teacher, mask)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(_grad(out, student), _grad(ref, student))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"target_norm": "batch"}, ValueError, "target_norm"),
        ({"student_norm": "yes"}, TypeError, "student_norm"),
        ({"loss": "huber"}, ValueError, "loss"),
        ({"beta": -0.1}, ValueError, "beta"),
        ({"reduction": "max"}, ValueError, "reduction"),
        ({"eps": -1.0}, ValueError, "eps"),
    ],
)
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        FeatureAlignLoss(**kwargs)


def test_bad_call():
    loss_fn = FeatureAlignLoss()
    with pytest.raises(TypeError, match="student must be a torch.Tensor"):
        loss_fn(None, torch.randn(2, 3))
    with pytest.raises(ValueError, match="mask must have shape"):
        loss_fn(torch.randn(2, 3), torch.randn(2, 3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="teacher must have"):
        loss_fn(torch.randn(2, 3), torch.randn(3, 3))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_negative_mask_weight_is_rejected(reduction):
    student, teacher = _pair()
    mask = torch.rand(3, 11)
    mask[1, 2] = -0.5
    with pytest.raises(ValueError, match="mask"):
        FeatureAlignLoss(reduction=reduction)(student, teacher, mask)
    # weights that sum to zero used to give about -4e36 with "mean"
    mask = torch.zeros(3, 11)
    mask[0, 0], mask[0, 1] = 1.0, -1.0
    with pytest.raises(ValueError, match="mask"):
        FeatureAlignLoss(reduction=reduction)(student, teacher, mask)


def test_negative_mask_weight_without_host_check_gives_nan():
    from fastkd.losses import feature_align as module

    mask = torch.ones(3, 11)
    mask[0, 0] = -1.0
    compiled = torch.compile(module._nonnegative, fullgraph=True, backend="eager")
    assert torch.isnan(compiled(mask)).all()
    assert torch.equal(compiled(torch.ones(3, 11)), torch.ones(3, 11))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool], ids=str)
def test_all_zero_mask_gives_zero_loss_and_gradient(reduction, dtype):
    student, teacher = _pair()
    ours = FeatureAlignLoss(reduction=reduction)(student, teacher, torch.zeros(3, 11, dtype=dtype))
    assert torch.equal(ours, torch.zeros_like(ours))
    assert torch.equal(_grad(ours.sum(), student), torch.zeros_like(student))
