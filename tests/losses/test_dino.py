import pytest
import torch

from fastkd.losses.dino import DINOLoss


def _plain_dino(student, teacher, center, t_temp, s_temp, skip_same_view=True):
    total, n = 0.0, 0
    for i, t in enumerate(teacher):
        p = torch.softmax((t - center) / t_temp, dim=-1)
        for v, s in enumerate(student):
            if skip_same_view and v == i:
                continue
            z = s / s_temp
            log_q = z - torch.logsumexp(z, dim=-1, keepdim=True)
            total = total + (-(p * log_q).sum(-1)).mean()
            n += 1
    return total / n


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("B,K,crops", [(1, 5, 3), (4, 37, 4)])
def test_matches_plain_formula_and_moves_centre(skip, B, K, crops):
    loss_fn = DINOLoss(K, skip_same_view=skip)
    loss_fn.center.normal_()
    center0 = loss_fn.center.clone()
    student = [torch.randn(B, K, requires_grad=True) for _ in range(crops)]
    teacher = [torch.randn(B, K) for _ in range(2)]
    loss = loss_fn(student, teacher)
    ref = _plain_dino(student, teacher, center0, 0.04, 0.1, skip)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    expected_center = 0.9 * center0 + 0.1 * torch.cat(teacher).mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected_center)


def test_gradient_matches_plain_formula():
    loss_fn = DINOLoss(9)
    student = [torch.randn(3, 9, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(3, 9, requires_grad=True) for _ in range(2)]
    loss_fn(student, teacher).backward()
    ref_student = [s.detach().clone().requires_grad_() for s in student]
    _plain_dino(ref_student, [t.detach() for t in teacher], torch.zeros(1, 9), 0.04, 0.1).backward()
    for s, r in zip(student, ref_student):
        torch.testing.assert_close(s.grad, r.grad, rtol=1e-5, atol=1e-6)
    assert all(t.grad is None for t in teacher)


def test_eval_mode_and_no_centering_leave_centre():
    loss_fn = DINOLoss(4).eval()
    loss_fn([torch.randn(2, 4)] * 2, [torch.randn(2, 4)] * 2)
    assert torch.equal(loss_fn.center, torch.zeros(1, 4))
    plain = DINOLoss(4, centering=False)
    plain.center.fill_(5.0)
    s, t = [torch.randn(2, 4)], [torch.randn(2, 4)]
    plain.skip_same_view = False
    torch.testing.assert_close(plain(s, t), _plain_dino(s, t, torch.zeros(1, 4), 0.04, 0.1, skip_same_view=False))
    assert torch.equal(plain.center, torch.full((1, 4), 5.0))


def test_teacher_temperature_warmup():
    loss_fn = DINOLoss(4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_fraction=0.3)
    assert loss_fn.teacher_temp_at(0, 100) == pytest.approx(0.04)
    assert loss_fn.teacher_temp_at(15, 100) == pytest.approx(0.055)
    assert loss_fn.teacher_temp_at(30, 100) == pytest.approx(0.07)
    assert loss_fn.teacher_temp_at(99, 100) == pytest.approx(0.07)
    loss_fn.set_progress(15, 100)
    assert loss_fn.current_teacher_temp.item() == pytest.approx(0.055)
    assert DINOLoss(4, warmup_fraction=0.0).current_teacher_temp.item() == pytest.approx(0.07)


@pytest.mark.parametrize(
    "student,teacher",
    [
        (torch.randn(2, 4), [torch.randn(2, 4)]),
        ([torch.randn(2, 5)], [torch.randn(2, 4)]),
        ([torch.randn(3, 4)], [torch.randn(2, 4)]),
        ([], [torch.randn(2, 4)]),
    ],
)
def test_bad_inputs(student, teacher):
    with pytest.raises((TypeError, ValueError)):
        DINOLoss(4)(student, teacher)


def test_same_view_only_pair_rejected():
    with pytest.raises(ValueError, match="skip_same_view"):
        DINOLoss(4)([torch.randn(2, 4)], [torch.randn(2, 4)])


@pytest.mark.parametrize(
    "kw", [{"out_dim": 0}, {"out_dim": 4, "student_temp": 0}, {"out_dim": 4, "warmup_fraction": 2}]
)
def test_bad_config(kw):
    with pytest.raises(ValueError):
        DINOLoss(**kw)


def _rank_centre(rank, world, init_file, teacher, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = teacher.shape[1] // world
        local = [t[rank * rows:(rank + 1) * rows] for t in teacher]
        loss_fn = DINOLoss(teacher.shape[2])
        loss_fn([torch.randn_like(local[0]) for _ in range(3)], local)
        out[rank] = loss_fn.center.clone()
    finally:
        dist.destroy_process_group()


def test_centre_under_two_process_gloo_equals_single_process():
    import os
    import tempfile

    import torch.multiprocessing as mp

    teacher = torch.randn(2, 6, 5)  # 2 global crops, global batch 6, out_dim 5
    single = DINOLoss(5)
    single([torch.randn(6, 5) for _ in range(3)], list(teacher))
    out = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_centre, args=(2, os.path.join(tmp, "init"), teacher, out), nprocs=2)
    for rank in range(2):
        torch.testing.assert_close(out[rank], single.center)


def test_torch_compile_fullgraph_matches_eager_and_moves_centre():
    compiled_fn, eager_fn = DINOLoss(8), DINOLoss(8)
    compiled = torch.compile(compiled_fn, fullgraph=True, backend="aot_eager")
    student = [torch.randn(3, 8) for _ in range(3)]
    teacher = [torch.randn(3, 8) for _ in range(2)]
    torch.testing.assert_close(compiled(student, teacher), eager_fn(student, teacher))
    torch.testing.assert_close(compiled_fn.center, eager_fn.center)
