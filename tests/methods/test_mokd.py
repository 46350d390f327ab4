import pytest
import torch

from fastkd.data import Batch
from fastkd.methods import MOKDConfig, build_method
from tests.methods.common import check_gradients, check_parts_and_total, snapshot, steps_lower_loss, unchanged
from tests.methods.plain import TINY_VIT, TINY_VIT_ARCH

CONFIG = dict(
    models={"a": {"arch": "resnet10t", "kwargs": dict(channels=(8, 16, 32, 64), stem_width=8)},
            "b": {"arch": TINY_VIT_ARCH, "kwargs": dict(TINY_VIT, dynamic_img_size=True)}},
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
    vit = branch.backbone.is_vit
    pooled, patches = (f.tokens[:, 0], f.tokens[:, 1:]) if vit else (f.pooled, f.feature_map)
    # official search query: the ViT's CLS token (through the T-head's input Linear, here 64 -> 32),
    # the CNN's average-pooled T-head 1x1 conv output
    query = branch.thead.adapter(pooled) if vit else branch.thead.adapter(patches).mean(dim=(2, 3))
    return {"dino": branch.dino_head(pooled), "thead": branch.thead(patches),
            "embed": branch.thead.embed(patches), "query": query, "patches": patches}


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
                target = method.teachers[y].module.thead(T[y][0]["patches"], query=S[x][v]["query"].detach())
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
    # model a's self terms warm up over 0.5 of training: 0.04 + 0.03 * 1 / 5
    assert method.losses["a"]["self_mlp"].current_teacher_temp.item() == pytest.approx(0.046)


def test_param_groups_split_by_model():
    method = build_method("mokd", CONFIG)
    groups = method.param_groups(0.05)
    # official: the CNN's T-head has its own group (the ViT's lr / wd schedules), tagged a_thead,
    # with every parameter decayed (get_params_groups2's transhead group)
    assert {(g["model"], g["weight_decay"]) for g in groups} == {
        (m, wd) for m in ("a", "b") for wd in (0.05, 0.0)} | {("a_thead", 0.05)}
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) == len({id(p) for p in grouped})
    thead = {id(p) for g in groups if g["model"] == "a_thead" for p in g["params"]}
    assert thead == {id(p) for p in method.branches["a"].thead.parameters() if p.requires_grad}
    assert set(method.students) == {"a", "b"}
    old = build_method("mokd", {**CONFIG, "thead_tag_a": "a", "thead_a_decay_all": False}).param_groups(0.05)
    assert {(g["model"], g["weight_decay"]) for g in old} == {("a", 0.05), ("a", 0.0), ("b", 0.05), ("b", 0.0)}


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


def test_dino_head_gains_trainable_for_the_vit_frozen_for_the_cnn():
    """Official main_mokd.py: CNN DINOHead(norm_last_layer=True), ViT DINOHead(norm_last_layer=False);
    both T-heads' weight-norm gains stay trainable (weight_g filled with 1, requires_grad kept)."""
    method = build_method("mokd", CONFIG)
    gain = {x: method.branches[x].dino_head.last_layer.weight_g for x in "ab"}
    assert not gain["a"].requires_grad and gain["b"].requires_grad
    assert all(method.branches[x].thead.last_layer.weight_g.requires_grad for x in "ab")
    method(multicrop())["loss"].backward()
    assert gain["a"].grad is None and gain["b"].grad is not None
    trainable = {id(p) for g in method.param_groups(0.05) for p in g["params"]}
    assert id(gain["b"]) in trainable and id(gain["a"]) not in trainable
    # per-model switches
    swapped = build_method("mokd", {**CONFIG, "norm_last_layer_a": False, "norm_last_layer_b": True})
    assert swapped.branches["a"].dino_head.last_layer.weight_g.requires_grad
    assert not swapped.branches["b"].dino_head.last_layer.weight_g.requires_grad


def test_teacher_temperature_warmup_per_term():
    """Official: warm-up 0.04 -> 0.07 over 50 epochs for the CNN's self terms (loss_cnn_fn,
    loss_cnn_thead_fn), 30 for every other term, of 100 epochs; one step per epoch here."""
    method = build_method("mokd", CONFIG)

    def temps(epoch):
        method.after_step(epoch - 1, 100)  # sets the temperature of step ``epoch``
        return {f"{x}_{t}": loss.current_teacher_temp.item() for x in "ab" for t, loss in method.losses[x].items()}

    for epoch, cnn_self, other in ((0 + 1, 0.04 + 0.03 / 50, 0.04 + 0.03 / 30), (15, 0.049, 0.055),
                                   (25, 0.055, 0.065), (40, 0.064, 0.07), (60, 0.07, 0.07)):
        got = temps(epoch)
        for name, value in got.items():
            want = cnn_self if name in ("a_self_mlp", "a_self_thead") else other
            assert value == pytest.approx(want), (epoch, name)
    assert {loss.warmup_fraction for loss in method.losses["b"].values()} == {0.3}
    assert method.losses["a"]["cross_search"].warmup_fraction == 0.3
    custom = build_method("mokd", {**CONFIG, "warmup_fraction_cross_b": 0.1})
    assert custom.losses["b"]["cross_mlp"].warmup_fraction == custom.losses["b"]["cross_search"].warmup_fraction == 0.1
    with pytest.raises(ValueError, match="warmup_fraction_self_a"):
        MOKDConfig(warmup_fraction_self_a=1.5)


def test_search_query_is_vit_cls_and_cnn_pooled_conv_before_the_blocks():
    """Official models/mokd.py: the ViT student's search query is ``tokens[:, 0]`` (CLS), the
    CNN's is ``x_pool = avgpool(patch_embed(fea4))`` of its T-head, before the blocks. Captured
    by hooks on one pass over a local crop."""
    config = {**CONFIG, "thead_dim": 64}  # the ViT's width: its T-head has no input Linear, as in the official code
    method = build_method("mokd", config).eval()
    crops = multicrop().views
    local = crops[2]
    seen = {}
    hooks = [
        method.branches["a"].thead.adapter.register_forward_hook(
            lambda m, i, o: seen.setdefault("a_conv", []).append(o.detach())),
        method.branches["a"].thead.blocks[0].norm1.register_forward_pre_hook(  # the first block's input
            lambda m, i: seen.setdefault("a_block_in", []).append(i[0].detach())),
    ]
    try:
        out = {x: method.branches[x](crops) for x in "ab"}
    finally:
        for hook in hooks:
            hook.remove()
    # ViT: the CLS token after the final norm, exactly
    cls = method.branches["b"].backbone.forward_features(local).tokens[:, 0]
    assert out["b"]["query"][2].shape == (2, 64)
    torch.testing.assert_close(out["b"]["query"][2], cls)
    # CNN: the mean of the 1x1 conv output over positions (the last conv call is the pass over both
    # local crops together, crop 2 first), not what the first block sees (pos. embedding added)
    conv = seen["a_conv"][-1][:2]
    assert out["a"]["query"][2].shape == (2, 64)
    torch.testing.assert_close(out["a"]["query"][2], conv.mean(dim=(2, 3)))
    block_in = seen["a_block_in"][-1][:2]
    assert block_in.shape[1] == conv.shape[2] * conv.shape[3]
    assert not torch.allclose(block_in.mean(1), conv.mean(dim=(2, 3)))


def test_thead_positional_embedding_grids():
    method = build_method("mokd", CONFIG)
    assert method.branches["a"].thead.pos_grid == (7, 7)  # official featuremap_size = 224 // 32
    assert method.branches["b"].thead.pos_grid == (4, 4)  # the ViT's grid: 32 px / 8 px patches
    assert method.teachers["b"].module.thead.pos_embed.shape == (1, 16, 32)
    custom = build_method("mokd", {**CONFIG, "thead_pos_grid_a": 3, "thead_pos_embed": True})
    assert custom.branches["a"].thead.pos_grid == (3, 3)
    none = build_method("mokd", {**CONFIG, "thead_pos_embed": False})
    assert none.branches["a"].thead.pos_embed is None and none.branches["b"].thead.pos_embed is None
    out = none(multicrop())
    assert torch.isfinite(out["loss"])


def test_training_runs_past_the_end_of_the_last_layer_freeze(tmp_path):
    """The trainer's optimisers meet the last layers' first gradients after the freeze (24 images,
    batch 8: steps 0-2 are epoch 0, frozen; step 3 trains them): torch's fused SGD with momentum
    crashed there, the foreach one fastkd uses does not."""
    from tests.method_runs import make_workspace, run_method

    result = run_method(make_workspace(tmp_path), "mokd", tmp_path / "out",
                        ["train.max_steps=5", "method.freeze_last_layer_epochs=1"])
    assert result.step == 5 and result.skipped_steps == 0
