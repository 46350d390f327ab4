import pytest
import torch

from fastkd.methods import MOMAConfig, build_method
from tests.methods.common import check_gradients, check_parts_and_total, steps_lower_loss
from tests.methods.plain import TINY_VIT, TINY_VIT_ARCH, plain_align, plain_vit, tiny_batch, write_tiny_teacher

TEACHER = dict(TINY_VIT, embed_dim=48)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("moma")
    return {
        "mocov3": write_tiny_teacher(root / "mocov3.pt", 1, embed_dim=48),
        "mae": write_tiny_teacher(root / "mae.pt", 2, embed_dim=48),
        "student_init": write_tiny_teacher(root / "init.pt", 3),
    }


def config(paths, student=None, teachers=None, **overrides):
    """The tiny MOMA config; ``student``: keys over the student's spec; ``teachers``: role -> keys
    over that teacher's spec."""
    teachers = teachers or {}
    return {
        "mode": "both_to_random", "student": {"arch": TINY_VIT_ARCH, "kwargs": TINY_VIT, **(student or {})},
        "teachers": {role: {"arch": TINY_VIT_ARCH, "kwargs": TEACHER, "path": paths[role], **teachers.get(role, {})}
                     for role in ("mocov3", "mae")},
        **overrides,
    }


def plain_moma(method, x, seed, teachers, target, target_norm="layernorm", loss="smooth_l1"):
    B, N, K = x.shape[0], method.backbone.num_patches, method.num_visible
    torch.manual_seed(seed)
    keep = torch.argsort(torch.rand(B, N), dim=1)[:, :K]
    student = plain_vit(method.backbone, x, keep)[0]
    parts = {}
    for name in teachers:
        t = plain_vit(getattr(method, f"{name}_teacher"), x)[0].detach()
        s = method.projectors[name](student)
        if target in ("cls", "both"):
            parts[f"{name}_cls"] = plain_align(s[:, 0], t[:, 0], target_norm, loss)
        if target in ("patch", "both"):
            t_visible = torch.stack([t[b, 1:][keep[b]] for b in range(B)])
            parts[f"{name}_patch"] = plain_align(s[:, 1:], t_visible, target_norm, loss)
    return parts


def test_both_teachers_parts_reference_and_gradients(paths):
    method = build_method("moma", config(paths))
    assert method.recipe == "mae" and method.student is method.backbone
    batch = tiny_batch(B=3)
    torch.manual_seed(7)
    out = method(batch)
    weights = {f"{t}_{p}": 1.0 for t in ("mocov3", "mae") for p in ("cls", "patch")}
    check_parts_and_total(out, weights, ("visible_tokens",))
    ref = plain_moma(method, batch.views[0], 7, ("mocov3", "mae"), "both")
    for name, value in ref.items():
        torch.testing.assert_close(out[name], value.detach(), rtol=1e-5, atol=1e-5)
    check_gradients(method, out, frozen=[method.mocov3_teacher, method.mae_teacher])
    method.train()
    assert not method.mocov3_teacher.training and not method.mae_teacher.training


def test_student_sees_exactly_the_visible_tokens(paths):
    for ratio, K in ((0.9, 2), (0.75, 4), (0.5, 8)):
        method = build_method("moma", config(paths, mask_ratio=ratio))
        seen = []
        method.backbone.model.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
        out = method(tiny_batch(B=2))
        assert seen[-1] == 1 + K == 1 + round((1 - ratio) * 16)
        assert out["visible_tokens"].item() == K


@pytest.mark.parametrize("mode,teacher,init", [("mocov3_to_mae", "mocov3", "student_init"),
                                               ("mae_to_mocov3", "mae", "student_init")])
def test_single_teacher_modes_and_switches(paths, mode, teacher, init):
    cfg = config(paths, student={"path": paths[init]}, mode=mode, target="patch", target_norm="l2", loss="cosine",
                 projector="mlp", projector_hidden_dim=24, **{f"{teacher}_weight": 0.5})
    method = build_method("moma", cfg)
    assert not hasattr(method, f"{'mae' if teacher == 'mocov3' else 'mocov3'}_teacher")
    loaded = torch.load(paths[init], weights_only=True)["state_dict"]
    assert all(torch.equal(v, method.backbone.model.state_dict()[k]) for k, v in loaded.items())
    assert all(p.requires_grad for p in method.backbone.parameters())
    batch = tiny_batch(B=3)
    torch.manual_seed(1)
    out = method(batch)
    check_parts_and_total(out, {f"{teacher}_patch": 0.5}, ("visible_tokens",))
    ref = plain_moma(method, batch.views[0], 1, (teacher,), "patch", "l2", "cosine")
    torch.testing.assert_close(out[f"{teacher}_patch"], ref[f"{teacher}_patch"].detach(), rtol=1e-5, atol=1e-5)


def test_steps_lower_loss(paths):
    method = build_method("moma", config(paths, target="cls", mask_ratio=0.5))
    first, last = steps_lower_loss(method, tiny_batch(B=3), lr=3e-3)
    assert last < first


def test_bad_configs(paths):
    with pytest.raises(ValueError, match="teachers.mae.path is required"):
        build_method("moma", config(paths, teachers={"mae": {"path": None}}))
    with pytest.raises(ValueError, match="student.path must be None"):
        MOMAConfig(mode="both_to_random", student={"path": "x.pt"})
    for mode in ("mocov3_to_mae", "mae_to_mocov3"):  # modes 1 and 2 never train a random student
        with pytest.raises(ValueError, match=f"mode '{mode}'.*student.path is required"):
            build_method("moma", config(paths, mode=mode))
    with pytest.raises(ValueError, match="target"):
        MOMAConfig(target="tokens")
    with pytest.raises(ValueError, match="did you mean 'mask_ratio'"):
        build_method("moma", config(paths, mask_ration=0.5))
    with pytest.raises(ValueError, match="patches"):
        build_method("moma", config(paths, student={"kwargs": dict(TINY_VIT, patch_size=4)}))
