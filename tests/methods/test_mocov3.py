import pytest
import torch

from fastkd.methods import MoCoV3Config, build_method
from fastkd.models import momentum_schedule
from tests.methods.common import check_gradients, check_parts_and_total, snapshot, steps_lower_loss, unchanged
from tests.methods.plain import TINY_MOCO, plain_branches, plain_contrastive, tiny_batch

CONFIG = TINY_MOCO


def test_loss_parts_gradients_and_reference():
    method = build_method("mocov3", CONFIG)
    assert method.recipe == "mocov3" and method.student is method.base_encoder[0]
    assert method.contrastive.temperature == 0.2
    batch = tiny_batch(views=2, B=4)
    out = method(batch)
    check_parts_and_total(out, {"contrastive": 1.0})
    q, k = plain_branches(method, batch.views)
    ref = plain_contrastive(q[0], k[1], 0.2) + plain_contrastive(q[1], k[0], 0.2)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-5)
    check_gradients(method, out, frozen=[method.momentum_encoder.module])
    assert all(p.grad is None for p in method.base_encoder[0].model.patch_embed.parameters())


def test_teacher_moves_only_in_after_step():
    method = build_method("mocov3", CONFIG)
    batch = tiny_batch(views=2, B=4)
    teacher = method.momentum_encoder.module
    before = snapshot(teacher)
    optimiser = torch.optim.SGD(method.param_groups(0.0), lr=0.5)
    method(batch)["loss"].backward()
    optimiser.step()
    assert unchanged(teacher, before)
    params_t = [p.detach().clone() for p in teacher.parameters()]
    params_s = [p.detach().clone() for p in method.base_encoder.parameters()]
    method.after_step(3, 10)
    m = momentum_schedule(3, 10, 0.99)
    assert m == pytest.approx(1 - 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0.3)).item()) * 0.01)
    for t0, s, t in zip(params_t, params_s, teacher.parameters()):
        torch.testing.assert_close(t, t0 + (1 - m) * (s - t0), rtol=1e-6, atol=1e-7)


def test_steps_lower_loss():
    method = build_method("mocov3", CONFIG)
    first, last = steps_lower_loss(method, tiny_batch(views=2, B=4))
    assert last < first


def test_switches():
    method = build_method("mocov3", {**CONFIG, "temperature": 0.5, "proj_layers": 2, "freeze_patch_embed": False,
                                     "decay_all_params": False})
    assert method.contrastive.temperature == 0.5
    assert sum(isinstance(m, torch.nn.Linear) for m in method.base_encoder[1].modules()) == 2
    assert all(p.requires_grad for p in method.student.model.patch_embed.parameters())
    groups = method.param_groups(0.1)
    assert {g["weight_decay"] for g in groups} == {0.1, 0.0}
    assert all(p.dim() < 2 for g in groups if g["weight_decay"] == 0.0 for p in g["params"])


def test_bad_inputs():
    with pytest.raises(ValueError, match="did you mean 'temperature'"):
        build_method("mocov3", {**CONFIG, "temprature": 0.2})
    with pytest.raises(ValueError, match="base_momentum"):
        MoCoV3Config(base_momentum=1.5)
    method = build_method("mocov3", CONFIG)
    with pytest.raises(ValueError, match="at least 2 views"):
        method(tiny_batch(views=1, B=4))
    with pytest.raises(ValueError, match="total must be > 0"):  # the momentum schedule's own check
        method.after_step(0, 0)


def test_vit_defaults_follow_the_paper():
    """ViT: frozen fixed 2-D sin-cos position embedding, frozen patch projection, a predictor ending
    in BatchNorm1d(affine=False); the same position embedding in the momentum encoder."""
    from tests.models.test_position_embedding import formula

    method = build_method("mocov3", CONFIG)
    vit = method.student.model
    assert not vit.pos_embed.requires_grad
    torch.testing.assert_close(vit.pos_embed[0, 1:], formula(4, 4, 64))
    torch.testing.assert_close(vit.pos_embed[0, 0], torch.zeros(64))
    assert not any(p.requires_grad for p in vit.patch_embed.parameters())
    trainable = {id(p) for g in method.param_groups(0.1) for p in g["params"]}
    assert id(vit.pos_embed) not in trainable and id(vit.patch_embed.proj.weight) not in trainable
    last = method.predictor.mlp[-1]
    assert isinstance(last, torch.nn.BatchNorm1d) and not last.affine
    torch.testing.assert_close(method.momentum_encoder.module[0].model.pos_embed, vit.pos_embed)
    method.after_step(0, 10)
    torch.testing.assert_close(method.momentum_encoder.module[0].model.pos_embed, vit.pos_embed)
    assert method.ema_teacher_backbone is method.momentum_encoder.module[0]

    off = build_method("mocov3", {**CONFIG, "sincos_pos_embed": False, "pred_last_bn": False})
    assert off.student.model.pos_embed.requires_grad
    assert isinstance(off.predictor.mlp[-1], torch.nn.Linear)


def test_resnet_choices_and_vit_only_switches():
    resnet = dict(CONFIG, backbone={"arch": "resnet18"})
    method = build_method("mocov3", resnet)
    assert isinstance(method.predictor.mlp[-1], torch.nn.Linear)  # MoCo v3's ResNet predictor
    assert method.contrastive.temperature == 1.0
    for name in ("sincos_pos_embed", "freeze_patch_embed"):
        with pytest.raises(ValueError, match=f"{name} applies to ViTs only"):
            build_method("mocov3", {**resnet, name: True})
    build_method("mocov3", {**resnet, "sincos_pos_embed": False})


def test_momentum_encoder_targets_are_deterministic_with_drop_path():
    method = build_method("mocov3", {**CONFIG, "backbone": {**CONFIG["backbone"], "kwargs": {**CONFIG["backbone"]["kwargs"], "drop_path_rate": 0.5}}})
    method.train()
    assert method.base_encoder.training and not method.momentum_encoder.module[0].training
    views = tiny_batch(views=2, B=4).views
    first, second = method.encode(views), method.encode(views)
    for a, b in zip(first["k"] + first["h_m"], second["k"] + second["h_m"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(first["h"][0], second["h"][0])  # the online encoder does drop paths
    # the momentum projector's BatchNorm: batch statistics in training (MoCo v3), not the student's
    assert method.momentum_encoder.module[1].mlp[1].training
    with pytest.raises(ValueError, match="momentum_bn_stats"):
        MoCoV3Config(momentum_bn_stats="copy")


@pytest.mark.parametrize("arch", ["vit", "resnet18"])
def test_vit_views_share_one_backbone_call_resnet_views_do_not(arch):
    config = CONFIG if arch == "vit" else dict(CONFIG, backbone={"arch": "resnet18"})
    method = build_method("mocov3", config)
    assert method.views_together is (arch == "vit")  # a ResNet's BatchNorm sees each view's batch
    backbone, momentum_backbone = method.base_encoder[0], method.momentum_encoder.module[0]
    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0])) for m in (backbone, momentum_backbone)]
    views = tiny_batch(views=2, B=4, size=32 if arch == "vit" else 64).views
    enc = method.encode(views)
    for hook in hooks:
        hook.remove()
    assert calls == ([8, 8] if arch == "vit" else [4, 4, 4, 4])
    method.eval()  # per-view reference without BatchNorm statistics moving
    enc, alone = method.encode(views), [backbone(x) for x in views]
    for joint, single in zip(enc["h"], alone):
        torch.testing.assert_close(joint, single, rtol=1e-5, atol=1e-5)
    mixed = [views[0], views[1][:2]]  # shapes differ: one call per view
    calls.clear()
    hook = backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    method.encode(mixed)
    hook.remove()
    assert calls == [4, 2]
