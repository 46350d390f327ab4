import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastkd.losses.infonce import InfoNCELoss, infonce


def _plain_direction(q, k, T):
    """MoCo v3's contrastive_loss written out with explicit softmax and one-hot labels."""
    qn = q / q.norm(dim=1, keepdim=True)
    kn = k / k.norm(dim=1, keepdim=True)
    logits = (qn @ kn.t()) / T
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -(log_p.diagonal()).mean() * 2 * T


@pytest.mark.parametrize("T", [0.2, 1.0])
@pytest.mark.parametrize("B,C", [(1, 3), (5, 7), (13, 256)])
def test_symmetrised_loss_matches_plain_formula(T, B, C):
    q1, q2 = torch.randn(B, C, requires_grad=True), torch.randn(B, C, requires_grad=True)
    k1, k2 = torch.randn(B, C, requires_grad=True), torch.randn(B, C, requires_grad=True)
    loss = InfoNCELoss(temperature=T)(q1, q2, k1, k2)
    q1r, q2r = q1.detach().clone().requires_grad_(), q2.detach().clone().requires_grad_()
    ref = _plain_direction(q1r, k2.detach(), T) + _plain_direction(q2r, k1.detach(), T)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(q1.grad, q1r.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q2.grad, q2r.grad, rtol=1e-5, atol=1e-6)
    assert k1.grad is None and k2.grad is None


def test_bf16_inputs_close_to_fp32():
    q, k = torch.randn(6, 16), torch.randn(6, 16)
    ref = infonce(q, k, 0.2)
    out = infonce(q.bfloat16(), k.bfloat16(), 0.2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_perfect_match_with_low_temperature_gives_near_zero_loss():
    q = torch.eye(4)
    assert InfoNCELoss(temperature=0.01)(q, q, q, q) < 1e-6


@pytest.mark.parametrize(
    "args,err",
    [
        ((torch.randn(3, 4), torch.randn(3, 5)), ValueError),
        ((torch.randn(3), torch.randn(3)), ValueError),
        ((torch.randn(3, 4), [1.0]), TypeError),
        ((torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)), TypeError),
    ],
)
def test_bad_inputs(args, err):
    with pytest.raises(err):
        infonce(*args, 0.2)


@pytest.mark.parametrize("T", [0, -1.0, True, "0.2"])
def test_bad_temperature(T):
    with pytest.raises((TypeError, ValueError), match="temperature"):  # TypeError for a bool or a str
        InfoNCELoss(temperature=T)


def _rank_main(rank, world, init_file, q1, q2, k1, k2, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        b = q1.shape[0] // world
        rows = slice(rank * b, (rank + 1) * b)
        q1_local = q1[rows].clone().requires_grad_()
        q2_local = q2[rows].clone().requires_grad_()
        loss = InfoNCELoss(temperature=0.2)(q1_local, q2_local, k1[rows], k2[rows])
        loss.backward()
        out[rank] = torch.cat([loss.detach().reshape(1), q1_local.grad.flatten(), q2_local.grad.flatten()])
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process_over_concatenated_batch():
    world, B, C = 2, 6, 8
    g = torch.Generator().manual_seed(3)
    q1, q2, k1, k2 = (torch.randn(B, C, generator=g) for _ in range(4))
    q1s, q2s = q1.clone().requires_grad_(), q2.clone().requires_grad_()
    single = InfoNCELoss(temperature=0.2)(q1s, q2s, k1, k2)
    single.backward()

    manager = mp.Manager()
    out = manager.dict()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(world, os.path.join(tmp, "init"), q1, q2, k1, k2, out), nprocs=world)
    b = B // world
    losses = torch.stack([out[r][0] for r in range(world)])
    # DDP averages over ranks: the mean of the rank losses is the loss of the whole batch ...
    torch.testing.assert_close(losses.mean(), single.detach(), rtol=1e-5, atol=1e-6)
    # ... and the averaged gradient of each rank's rows equals the single-process gradient.
    for r in range(world):
        grads = out[r][1:].reshape(2, b, C) / world
        torch.testing.assert_close(grads[0], q1s.grad[r * b : (r + 1) * b], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grads[1], q2s.grad[r * b : (r + 1) * b], rtol=1e-5, atol=1e-7)


def test_torch_compile_fullgraph_matches_eager():
    loss_fn = InfoNCELoss(temperature=0.2)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    q1, q2, k1, k2 = (torch.randn(5, 12) for _ in range(4))
    torch.testing.assert_close(compiled(q1, q2, k1, k2), loss_fn(q1, q2, k1, k2))
