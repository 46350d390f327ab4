import pytest
import torch

from fastkd.data import Batch
from fastkd.methods import MOKDConfig, build_method
from tests.methods.common import check_gradients, check_parts_and_total, snapshot, steps_lower_loss, unchanged
from tests.methods.plain import TINY_VIT, TINY_VIT_ARCH

CONFIG = dict(
    model_a_arch="resnet10t", model_a_kwargs=dict(channels=(8, 16, 32, 64), stem_width=8),
    model_b_arch=TINY_VIT_ARCH, model_b_kwargs=dict(TINY_VIT, dynamic_img_size=True),
    out_dim=32, dino_hidden_dim=32, bottleneck_dim=16, thead_dim=32, thead_depth=1, thead_heads=2,
    lambda_a=1.0, lambda_b=0.1,
)
WEIGHTS = {f"{x}_{t}": (1.0 if t.startswith("self") else {"a": 1.0, "b": 0.1}[x])
           for x in "ab" for t in ("self_mlp", "self_thead", "cross_mlp", "cross_search")}


def multicrop(B=2, local=2, local_size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)]
    views += [torch.randn(B, 3, local_size, local_size, generator=g) for _ in range(local)]
    return Batch(views, torch.full((B,), -1), torch.arange(B))


def _heads(branch, crop):
    f = branch.backbone.forward_features(crop)
    pooled, patches = (f.tokens[:, 0], f.tokens[:, 1:]) if branch.backbone.is_vit else (f.pooled, f.feature_map)
    return {"dino": branch.dino_head(pooled), "thead": branch.thead(patches),
            "embed": branch.thead.embed(patches), "patches": patches}


def _ce(t, s, center, t_temp=0.04, s_temp=0.1):
    p = torch.softmax((t - center) / t_temp, dim=-1)
    return (-(p * torch.log_softmax(s / s_temp, dim=-1)).sum(-1)).mean()


def plain_mokd(method, views):
    """MOKD per crop with plain cross-entropies; returns the parts (with graphs) by name."""
    S = {x: [_heads(method.branches[x], v) for v in views] for x in "ab"}
    with torch.no_grad():
        T = {x: [_heads(method.teachers[x].module, v) for v in views[:2]] for x in "ab"}
    parts = {}
    for x, y in (("a", "b"), ("b", "a")):
        L = method.losses[x]

        def dino(student, teacher, center):
            pairs = [(i, v) for i in range(2) for v in range(len(views)) if v != i]
            return sum(_ce(teacher[i], student[v], center) for i, v in pairs) / len(pairs)

        parts[f"{x}_self_mlp"] = dino([s["dino"] for s in S[x]], [t["dino"] for t in T[x]], L["self_mlp"].center)
        parts[f"{x}_self_thead"] = dino([s["thead"] for s in S[x]], [t["thead"] for t in T[x]],
                                        L["self_thead"].center)
        parts[f"{x}_cross_mlp"] = dino([s["dino"] for s in S[x]], [t["dino"] for t in T[y]], L["cross_mlp"].center)
        search = []
        for v in range(2, len(views)):
            with torch.no_grad():
                target = method.teachers[y].module.thead(T[y][0]["patches"], query=S[x][v]["embed"].detach())
            search.append(_ce(target, S[x][v]["thead"], 0.0))
        parts[f"{x}_cross_search"] = sum(search) / len(search)
    return parts


def test_parts_reference_and_no_gradient_crossing():
    method = build_method("mokd", CONFIG).eval()
    assert method.recipe == "dino_multicrop" and method.student is method.branches["b"].backbone
    for x in "ab":
        for loss in method.losses[x].values():
            loss.center.normal_()
    batch = multicrop()
    out = method(batch)
    check_parts_and_total(out, WEIGHTS)
    ref = plain_mokd(method, batch.views)
    for name, value in ref.items():
        torch.testing.assert_close(out[name], value.detach(), rtol=1e-4, atol=1e-5)
    check_gradients(method, out, frozen=[method.teachers["a"].module, method.teachers["b"].module])
    # Each model's gradient comes from its own total alone: nothing crosses between the models.
    for x in "ab":
        params = [p for p in method.branches[x].parameters() if p.requires_grad]
        own = sum(WEIGHTS[n] * v for n, v in ref.items() if n.startswith(f"{x}_"))
        expected = torch.autograd.grad(own, params, allow_unused=True)
        for p, g in zip(params, expected):
            torch.testing.assert_close(p.grad, torch.zeros_like(p) if g is None else g, rtol=1e-4, atol=1e-5)


def test_train_mode_multires_steps_and_after_step():
    method = build_method("mokd", CONFIG)
    batch = multicrop()
    teachers = [snapshot(method.teachers[x].module) for x in "ab"]
    first, last = steps_lower_loss(method, batch, steps=5, lr=1e-3)
    assert last < first
    assert all(unchanged(method.teachers[x].module, t) for x, t in zip("ab", teachers))
    assert method.losses["a"]["self_mlp"].center.abs().sum() > 0
    assert method.losses["a"]["cross_search"].center.abs().sum() == 0
    method.after_step(0, 10)  # the temperature of step 1: 0.04 + (0.07 - 0.04) * 1 / (0.3 * 10)
    assert not any(unchanged(method.teachers[x].module, t) for x, t in zip("ab", teachers))
    assert method.losses["b"]["cross_mlp"].current_teacher_temp.item() == pytest.approx(0.05)


def test_param_groups_split_by_model():
    method = build_method("mokd", CONFIG)
    groups = method.param_groups(0.05)
    assert {(g["model"], g["weight_decay"]) for g in groups} == {("a", 0.05), ("a", 0.0), ("b", 0.05), ("b", 0.0)}
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) == len({id(p) for p in grouped})
    assert set(method.students) == {"a", "b"}


def test_bad_inputs():
    method = build_method("mokd", CONFIG)
    with pytest.raises(ValueError, match="at least 3 views"):
        method(multicrop(local=0))
    with pytest.raises(ValueError, match="evaluate"):
        MOKDConfig(evaluate="c")
    with pytest.raises(ValueError, match="did you mean 'lambda_a'"):
        build_method("mokd", {**CONFIG, "lamda_a": 1.0})


def test_last_layers_frozen_for_the_first_epochs():
    method = build_method("mokd", {**CONFIG, "freeze_last_layer_epochs": 0.5})
    last_layers = [p for x in "ab" for head in (method.branches[x].dino_head, method.branches[x].thead)
                   for p in head.last_layer.parameters() if p.requires_grad]
    assert last_layers
    method(multicrop())["loss"].backward()
    method.before_optimizer_step(0.75)  # past the freeze: gradients stay
    assert all(p.grad is not None for p in last_layers)
    method.before_optimizer_step(0.25)
    assert all(p.grad is None for p in last_layers)
    others = [p for name, p in method.branches.named_parameters() if "last_layer" not in name and p.requires_grad]
    assert others and all(p.grad is not None for p in others)
    with pytest.raises(ValueError, match="freeze_last_layer_epochs"):
        MOKDConfig(**{**CONFIG, "freeze_last_layer_epochs": -1})
