"""EMATeacher and momentum_schedule against hand-written EMA / the cosine formula."""

import math

import pytest
import timm
import torch
from torch import nn

from fastkd.models import EMATeacher, momentum_schedule


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=48, num_heads=3, num_classes=0)


def test_matches_hand_written_ema_over_timm_vit_after_10_updates():
    student = tiny_vit()
    ema = EMATeacher(student)
    expected = {n: p.detach().double().clone() for n, p in student.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    for step in range(10):
        with torch.no_grad():  # a stand-in optimiser step
            for p in student.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        m = momentum_schedule(step, 10, 0.99)
        ema.update(m)
        for n, p in student.named_parameters():
            expected[n] = m * expected[n] + (1 - m) * p.detach().double()
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p.double(), expected[n], rtol=1e-5, atol=1e-6, msg=n)
        assert not p.requires_grad
    x = torch.randn(2, 3, 32, 32)
    assert ema(x).shape == student(x).shape == (2, 48)


def test_gap_buffers_and_state_dict():
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    ema = EMATeacher(student)
    student(torch.randn(2, 3, 8, 8))  # updates the student's BatchNorm running statistics
    with torch.no_grad():
        student[0].weight.add_(1.0)
    t_params = [p.detach().double().clone() for p in ema.module.parameters()]
    s_params = [p.detach().double() for p in student.parameters()]
    gap = ema.update(0.9, return_gap=True)
    assert math.isclose(gap.diff_sq, sum(((s - t) ** 2).sum().item() for s, t in zip(s_params, t_params)),
                        rel_tol=1e-6)
    assert math.isclose(gap.teacher_sq, sum((t**2).sum().item() for t in t_params), rel_tol=1e-6)
    # bn_stats="batch" (default): the teacher's BatchNorm statistics are its own, never the student's
    torch.testing.assert_close(ema.module[1].running_mean, torch.zeros(4))
    assert ema.module[1].num_batches_tracked.item() == 0
    assert set(ema.state_dict()) == {"module." + k for k in student.state_dict()}


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten())


def test_batch_bn_stats_are_the_teachers_own():
    """MoCo v3 / DINO: the momentum encoder's BatchNorm uses (and tracks) the statistics of its
    own batches in training; the update moves parameters only."""
    student = _bn_net()
    ema = EMATeacher(student)
    owner = nn.ModuleDict({"student": student, "teacher": ema}).train()
    assert ema.training and ema.module[1].training and not ema.module[2].training
    x = torch.randn(8, 3, 6, 6) * 3 + 1
    student(torch.randn(8, 3, 6, 6))  # student statistics: of other images
    with torch.no_grad():
        ema(x)  # the teacher's forward moves its own running statistics
    with torch.no_grad():
        features = ema.module[0](x)
    expected_mean = 0.1 * features.mean((0, 2, 3))
    torch.testing.assert_close(ema.module[1].running_mean, expected_mean)
    before = ema.module[1].running_var.clone()
    ema.update(0.5)
    torch.testing.assert_close(ema.module[1].running_mean, expected_mean)  # not the student's copy
    torch.testing.assert_close(ema.module[1].running_var, before)
    assert not torch.allclose(ema.module[1].running_mean, student[1].running_mean)
    owner.eval()
    assert not ema.training and not ema.module[1].training


def test_ema_bn_stats_follow_the_students_running_stats_by_ema():
    student = _bn_net()
    ema = EMATeacher(student, bn_stats="ema")
    nn.ModuleDict({"student": student, "teacher": ema}).train()
    assert not any(m.training for m in ema.module.modules())  # BatchNorm in eval mode too
    teacher_mean = ema.module[1].running_mean.clone()
    teacher_var = ema.module[1].running_var.clone()
    with torch.no_grad():
        ema(torch.randn(4, 3, 6, 6))  # eval-mode BatchNorm: the forward leaves the statistics alone
    torch.testing.assert_close(ema.module[1].running_mean, teacher_mean)
    student(torch.randn(8, 3, 6, 6) * 2 + 1)
    student(torch.randn(8, 3, 6, 6) * 2 + 1)
    ema.update(0.9)
    m = 0.9
    torch.testing.assert_close(ema.module[1].running_mean, m * teacher_mean + (1 - m) * student[1].running_mean)
    torch.testing.assert_close(ema.module[1].running_var, m * teacher_var + (1 - m) * student[1].running_var)
    assert ema.module[1].num_batches_tracked.item() == 2
    with pytest.raises(ValueError, match="bn_stats"):
        EMATeacher(student, bn_stats="copy")


def test_teacher_is_deterministic_under_drop_path_in_train_mode():
    """Drop-path (and dropout) stay off in the teacher whatever its owner's mode."""
    torch.manual_seed(0)
    student = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                embed_dim=48, num_heads=3, num_classes=0, drop_path_rate=0.5, proj_drop_rate=0.3)
    ema = EMATeacher(student)
    owner = nn.ModuleDict({"student": student, "teacher": ema})
    owner.train()
    assert student.training and ema.training and not any(m.training for m in ema.module.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        first, second = ema(x), ema(x)
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        torch.testing.assert_close(first, student.eval()(x))  # equal weights: the student's eval forward
        student.train()
        assert not torch.allclose(student(x), student(x))  # the student does drop paths
    owner.train()  # a later train() call does not flip the teacher either
    assert not any(m.training for m in ema.module.modules())


def test_update_rejects_mismatched_modules_and_bad_student():
    with pytest.raises(TypeError, match="student_module must be an nn.Module"):
        EMATeacher("vit")
    ema = EMATeacher(nn.Linear(3, 2))
    ema.module.extra = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="only in teacher"):
        ema.update(0.9)


def test_momentum_schedule():
    assert momentum_schedule(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_schedule(50, 100, 0.99) == pytest.approx(0.995)
    assert momentum_schedule(100, 100, 0.996) == pytest.approx(1.0)
    values = [momentum_schedule(s, 20, 0.9) for s in range(21)]
    assert values == sorted(values)
    with pytest.raises(ValueError, match="step must be <= 100"):
        momentum_schedule(101, 100, 0.99)
    with pytest.raises(ValueError, match="total must be > 0"):
        momentum_schedule(0, 0, 0.99)
    with pytest.raises(ValueError, match="base must be <= 1.0"):
        momentum_schedule(0, 10, 1.5)
    with pytest.raises(TypeError, match="step must be an int"):
        momentum_schedule(0.5, 10, 0.9)

@pytest.mark.parametrize("bn_stats", ["batch", "ema"])
def test_update_decided_on_the_device(bn_stats):
    """``update(skip=1)`` leaves every teacher parameter and buffer exactly; ``update(skip=0)``
    equals ``update()`` (the fused op) up to rounding, gap included (as a device tensor)."""
    student = _bn_net()
    host, device = EMATeacher(student, bn_stats=bn_stats), EMATeacher(student, bn_stats=bn_stats)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
        student(torch.randn(8, 3, 6, 6) * 2 + 1)  # moves the student's BatchNorm statistics
    before = {k: v.clone() for k, v in device.state_dict().items()}
    gap = device.update(0.9, return_gap=True, skip=torch.ones(()))
    assert all(torch.equal(before[k], v) for k, v in device.state_dict().items())
    gap = device.update(0.9, return_gap=True, skip=torch.zeros(()))
    expected = host.update(0.9, return_gap=True)
    assert isinstance(gap, torch.Tensor) and gap.dtype == torch.float64
    torch.testing.assert_close(gap, torch.tensor(list(expected), dtype=torch.float64), rtol=1e-9, atol=0)
    for (name, a), b in zip(host.state_dict().items(), device.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    moved = [k for k in before if not torch.equal(before[k], device.state_dict()[k])]
    assert moved  # skip=0 did update
