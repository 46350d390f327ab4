import pytest
import torch
import torch.nn.functional as F

from fastkd.losses.residual_momentum import ResidualMomentumLoss


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("B,C", [(1, 3), (7, 33), (5, 256)])
def test_matches_two_minus_two_cos(dtype, tol, B, C):
    online = torch.randn(B, C, dtype=dtype, requires_grad=True)
    momentum = torch.randn(B, C, dtype=dtype, requires_grad=True)
    loss = ResidualMomentumLoss()(online, momentum)
    ref_online = online.detach().float().requires_grad_()
    ref = (2 - 2 * F.cosine_similarity(ref_online, momentum.detach().float(), dim=-1)).mean()
    torch.testing.assert_close(loss.float(), ref, rtol=tol, atol=tol)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(online.grad.float(), ref_online.grad, rtol=tol, atol=tol)
    assert momentum.grad is None


def test_equal_embeddings_give_zero_and_opposite_give_four():
    x = torch.randn(4, 8)
    assert ResidualMomentumLoss()(x, 3 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert ResidualMomentumLoss()(x, -x).item() == pytest.approx(4.0, abs=1e-5)


@pytest.mark.parametrize(
    "online,momentum,err",
    [
        (torch.randn(4, 8), torch.randn(4, 9), ValueError),
        (torch.randn(8), torch.randn(8), ValueError),
        ([1.0], torch.randn(4, 8), TypeError),
    ],
)
def test_bad_inputs(online, momentum, err):
    with pytest.raises(err):
        ResidualMomentumLoss()(online, momentum)
