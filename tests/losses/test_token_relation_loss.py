"""fastkd.losses.TokenRelationLoss: reductions, options and errors against the reference."""

import pytest
import torch

from fastkd.losses import TokenRelationLoss
from fastkd.ops import token_relation_reference


def _inputs(H_t=4, N=23):
    q_s, k_s = (torch.randn(2, 2, N, 32, requires_grad=True) for _ in range(2))
    q_t, k_t = (torch.randn(2, H_t, N, 16) for _ in range(2))
    return q_s, k_s, q_t, k_t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("direction", ["teacher_to_student", "student_to_teacher"])
def test_loss_matches_reduced_reference(reduction, direction):
    q_s, k_s, q_t, k_t = _inputs()
    loss_fn = TokenRelationLoss(temperature=0.5, direction=direction, head_map="mean", reduction=reduction)
    loss = loss_fn(q_s, k_s, q_t, k_t)
    kl = token_relation_reference(q_s, k_s, q_t, k_t, temperature=0.5, direction=direction, head_map="mean")
    expected = {"mean": kl.mean(), "sum": kl.sum(), "none": kl}[reduction]
    assert loss.shape == expected.shape and loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad(loss.sum(), (q_s, k_s))
    expected_grads = torch.autograd.grad(expected.sum(), (q_s, k_s))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_default_loss_on_matching_heads_and_teacher_without_gradient():
    q_s, k_s, q_t, k_t = _inputs(H_t=2)
    q_t.requires_grad_(True)
    loss = TokenRelationLoss()(q_s, k_s, q_t, k_t)
    loss.backward()
    assert loss.item() > 0 and q_t.grad is None and q_s.grad.abs().sum() > 0
    torch.testing.assert_close(loss, token_relation_reference(q_s, k_s, q_t, k_t).mean())


def test_head_count_mismatch_needs_head_map():
    with pytest.raises(ValueError, match="head_map='mean'"):
        TokenRelationLoss()(*_inputs(H_t=4))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"direction": "both"}, "direction"),
        ({"head_map": "sum"}, "head_map"),
        ({"reduction": "batchmean"}, "reduction"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):  # TypeError for temperature=True
        TokenRelationLoss(**kwargs)


def test_repr_names_the_options():
    text = repr(TokenRelationLoss(temperature=2.0, head_map="mean"))
    assert "temperature=2.0" in text and "head_map='mean'" in text and "teacher_to_student" in text
