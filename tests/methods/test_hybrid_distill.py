import pytest
import torch

from fastkd.methods import HybridDistillConfig, build_method, cls_attention_scores
from tests.methods.common import check_gradients, check_parts_and_total, steps_lower_loss
from tests.methods.plain import (
    TINY_VIT, TINY_VIT_ARCH, plain_align, plain_relation_kl, plain_vit, tiny_batch, write_tiny_teacher,
)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    return {
        "feature": write_tiny_teacher(root / "feature.pt", 11, embed_dim=48),
        "relation": write_tiny_teacher(root / "relation.pt", 12, num_heads=4),
    }


def sharpened(method, factor=6.0):
    """Scale every q/k projection so attention maps are far from uniform (a random init's are nearly
    uniform, which would make the relation term ~1e-6 and the CLS-attention ranking near-ties)."""
    with torch.no_grad():
        for model in (method.backbone, method.feature_teacher, method.relation_teacher):
            for block in model.model.blocks:
                dim = block.attn.qkv.weight.shape[1]
                block.attn.qkv.weight[: 2 * dim].mul_(factor)
    return method


def config(paths, feature=None, relation=None, **overrides):
    """The tiny Hybrid Distill config; ``feature`` / ``relation``: keys over that teacher's spec."""
    return {
        "student": {"arch": TINY_VIT_ARCH, "kwargs": TINY_VIT},
        "teachers": {
            "feature": {"arch": TINY_VIT_ARCH, "kwargs": dict(TINY_VIT, embed_dim=48), "path": paths["feature"],
                        **(feature or {})},
            "relation": {"arch": TINY_VIT_ARCH, "kwargs": dict(TINY_VIT, num_heads=4), "path": paths["relation"],
                         **(relation or {})},
        },
        "relation_layers": [[0, 1], [1, -1]], "head_map": "mean", "alpha": 0.5, "beta": 2.0,
        "keep_schedule": [[0.0, 1.0], [0.5, 0.5]],
        **overrides,
    }


def _subset_map(attn, rows):
    """Attention among the kept tokens only: the full map's rows/columns, renormalised."""
    sub = torch.stack([attn[b][:, rows[b]][:, :, rows[b]] for b in range(attn.shape[0])])
    return sub / sub.sum(-1, keepdim=True)


def plain_hybrid(method, x, K):
    """Hybrid Distill with materialised attention maps (teacher heads averaged in groups)."""
    B, N = x.shape[0], method.backbone.num_patches
    feat_tokens, feat_maps = plain_vit(method.feature_teacher, x)
    _, rel_maps = plain_vit(method.relation_teacher, x)
    scores = feat_maps[-1][:, :, 0, 1:].mean(1)
    keep = torch.topk(scores, K, dim=1).indices.sort(dim=1).values
    tokens, maps = plain_vit(method.backbone, x, keep if K < N else None)
    s = method.projector(tokens)
    t = feat_tokens.detach()
    parts = {
        "feature_cls": plain_align(s[:, 0], t[:, 0]),
        "feature_patch": plain_align(s[:, 1:], torch.stack([t[b, 1:][keep[b]] for b in range(B)])),
    }
    rows = torch.cat([torch.zeros(B, 1, dtype=torch.long), keep + 1], dim=1)
    relation = 0.0
    for ls, lt in ((0, 1), (1, 1)):
        teacher = _subset_map(rel_maps[lt].detach(), rows)
        teacher = teacher.reshape(B, 2, 2, *teacher.shape[2:]).mean(2)  # 4 teacher heads -> 2 student heads
        relation = relation + plain_relation_kl(maps[ls], teacher)
    parts["relation"] = relation / 2
    return parts, keep


@pytest.mark.parametrize("step,K", [(0, 16), (5, 8)])
def test_parts_reference_and_gradients(paths, step, K):
    method = sharpened(build_method("hybrid_distill", config(paths)))
    assert method.recipe == "mae" and method.student is method.backbone
    method.after_step(step, 10)
    batch = tiny_batch(B=2)
    out = method(batch)
    check_parts_and_total(out, {"feature_cls": 0.5, "feature_patch": 0.5, "relation": 2.0}, ("kept_tokens",))
    assert out["kept_tokens"].item() == K
    ref, _ = plain_hybrid(method, batch.views[0], K)
    assert ref["relation"] > 0.05
    for name, value in ref.items():
        torch.testing.assert_close(out[name], value.detach(), rtol=1e-4, atol=1e-5)
    check_gradients(method, out, frozen=[method.feature_teacher, method.relation_teacher])


def test_cls_attention_scores_match_materialised_map():
    q, k = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
    torch.testing.assert_close(cls_attention_scores(q, k, 0.5), attn[:, :, 0, 1:].mean(1))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        cls_attention_scores(q, k, 0.5, num_prefix_tokens=10)


def test_masking_schedule_keeps_documented_counts(paths):
    method = build_method("hybrid_distill", config(paths, keep_schedule=[[0.0, 1.0], [0.25, 0.75], [0.5, 0.5],
                                                                        [0.75, 0.25]]))
    seen = []
    method.backbone.model.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    batch = tiny_batch(B=2)
    expected = {0: 16, 1: 16, 2: 12, 3: 12, 4: 8, 5: 8, 6: 4, 7: 4}  # kept after after_step(s, 8): stage of s + 1
    counts = {}
    method(batch)
    counts[0] = seen[-1] - 1
    for s in range(7):
        method.after_step(s, 8)
        method(batch)
        counts[s + 1] = seen[-1] - 1
        assert method.num_kept() == counts[s + 1]
    assert counts == expected
    assert method.keep_ratio_at(4, 8) == 0.5 and method.keep_ratio_at(7, 8) == 0.25


def test_kept_tokens_are_the_most_attended(paths):
    method = sharpened(build_method("hybrid_distill", config(paths, feature_target="patch")))
    method.after_step(9, 10)
    batch = tiny_batch(B=2)
    captured = {}
    original = method.backbone.forward_features

    def spy(x, **kwargs):
        captured["keep"] = kwargs["keep"]
        return original(x, **kwargs)

    method.backbone.forward_features = spy
    out = method(batch)
    assert "feature_cls" not in out and "feature_patch" in out
    _, keep = plain_hybrid(method, batch.views[0], 8)
    assert torch.equal(captured["keep"], keep)


def test_steps_lower_loss(paths):
    method = build_method("hybrid_distill", config(paths))
    first, last = steps_lower_loss(method, tiny_batch(B=2), lr=3e-3)
    assert last < first


def test_bad_configs(paths):
    with pytest.raises(ValueError, match="non-increasing"):
        HybridDistillConfig(keep_schedule=[[0.0, 0.5], [0.5, 0.9]])
    with pytest.raises(ValueError, match="fraction 0.0"):
        HybridDistillConfig(keep_schedule=[[0.1, 0.5]])
    with pytest.raises(TypeError, match="relation_layers"):
        HybridDistillConfig(relation_layers=[[0, 1, 2]])
    with pytest.raises(ValueError, match="out of range"):
        build_method("hybrid_distill", config(paths, relation_layers=[[5, 0]]))
    with pytest.raises(ValueError, match="did you mean 'alpha'"):
        build_method("hybrid_distill", config(paths, alpah=1.0))


def test_relation_switches_reach_the_loss(paths):
    batch = tiny_batch(B=2)
    values = {}
    for key, overrides in {"default": {}, "reverse": {"relation_direction": "student_to_teacher"},
                           "warm": {"relation_temperature": 4.0}}.items():
        torch.manual_seed(0)
        method = sharpened(build_method("hybrid_distill", config(paths, **overrides)))
        values[key] = method(batch)["relation"].item()
    assert method.relation.temperature == 4.0
    assert values["reverse"] != pytest.approx(values["default"], rel=1e-3)
    assert values["warm"] < values["default"]  # a higher temperature flattens both maps


@pytest.mark.parametrize("student_depth,teacher_depth,expected", [
    (12, 12, [[2, 2], [5, 5], [8, 8]]),       # ViT-B from MAE ViT-B
    (24, 24, [[5, 5], [11, 11], [17, 17]]),   # ViT-L from MAE ViT-L
    (12, 24, [[2, 5], [5, 11], [8, 17]]),     # same relative depth in a deeper teacher
    (2, 2, [[0, 0], [1, 1]]),                 # shallow students: duplicates dropped
])
def test_intermediate_layer_pairs(student_depth, teacher_depth, expected):
    from fastkd.methods.hybrid_distill import intermediate_layer_pairs

    assert intermediate_layer_pairs(student_depth, teacher_depth) == expected


def test_relation_layer_presets_resolve_at_build(paths):
    method = build_method("hybrid_distill", config(paths, relation_layers="intermediate"))
    assert method.layer_pairs == [(0, 0), (1, 1)]
    assert build_method("hybrid_distill", config(paths, relation_layers="last")).layer_pairs == [(1, 1)]
    assert HybridDistillConfig().relation_layers == "intermediate"  # the default: intermediate blocks
    with pytest.raises(ValueError, match="relation_layers must be one of"):
        HybridDistillConfig(relation_layers="middle")


def test_per_teacher_formats(paths):
    """Each teacher can name its own checkpoint format; a wrong one is refused for that teacher."""
    method = build_method("hybrid_distill", config(paths, feature={"format": "fastkd"},
                                                   relation={"format": "fastkd"}))
    assert method.feature_teacher.embed_dim == 48
    with pytest.raises(ValueError, match="looks like 'fastkd'"):
        build_method("hybrid_distill", config(paths, feature={"format": "mae"}))


def test_feature_teacher_input_size(paths, tmp_path):
    """A feature teacher of another patch size sees the image resized so both grids match: here
    patch 4 at 16 px (4 x 4 patches) for a student of patch 8 at 32 px (4 x 4 patches)."""
    small = dict(TINY_VIT, img_size=16, patch_size=4, embed_dim=48)
    path = write_tiny_teacher(tmp_path / "small_patch.pt", 13, **small)
    method = build_method("hybrid_distill", config(paths, feature={"kwargs": small, "path": path,
                                                                         "input_size": 16}))
    batch = tiny_batch(B=2)
    parts = method(batch)
    x = batch.views[0]
    with torch.no_grad():
        resized = torch.nn.functional.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False)
        target = method.feature_teacher.forward_features(resized).tokens[:, 0]
    student = method.projector(method.backbone.forward_features(x).tokens)[:, 0]
    torch.testing.assert_close(parts["feature_cls"], method.feature_align(student, target))
    with pytest.raises(ValueError, match="teachers.feature.input_size=24"):
        build_method("hybrid_distill", config(paths, feature={"kwargs": small, "path": path, "input_size": 24}))
    with pytest.raises(ValueError, match="set teachers.feature.input_size: 16"):
        build_method("hybrid_distill", config(paths, feature={"kwargs": small, "path": path}))
