"""Frozen teachers in their own compute dtype (``Method.frozen_teacher_features``), MOMA and Hybrid
Distill with bf16 teachers and an fp32 student against the same step with fp32 teachers."""

import pytest
import torch

from fastkd.methods import build_method
from tests.methods.plain import TINY_VIT, TINY_VIT_ARCH, tiny_batch, write_tiny_teacher

TEACHER = dict(TINY_VIT, embed_dim=48)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_precision")
    return {"a": write_tiny_teacher(root / "a.pt", 1, embed_dim=48),
            "b": write_tiny_teacher(root / "b.pt", 2, embed_dim=48)}


def _teachers(paths, roles):
    return {role: {"arch": TINY_VIT_ARCH, "kwargs": TEACHER, "path": paths[key], "format": "fastkd"}
            for role, key in zip(roles, "ab")}


def moma(paths):
    return build_method("moma", {"mode": "both_to_random", "student": {"arch": TINY_VIT_ARCH, "kwargs": TINY_VIT},
                                 "teachers": _teachers(paths, ("mocov3", "mae"))})


def hybrid(paths):
    return build_method("hybrid_distill", {"student": {"arch": TINY_VIT_ARCH, "kwargs": TINY_VIT},
                                           "keep_schedule": [[0.0, 0.75]],
                                           "teachers": _teachers(paths, ("feature", "relation"))})


def test_default_is_the_callers_autocast_state(paths):
    method = moma(paths)
    assert method.frozen_teacher_dtype is None
    x = tiny_batch(B=3).views[0]
    out = method.frozen_teacher_features(method.mae_teacher, x, return_qk=(1,))
    with torch.no_grad():
        ref = method.mae_teacher.forward_features(x, return_qk=(1,))
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.qk[1][0], ref.qk[1][0])
    assert not out.tokens.requires_grad


def test_bf16_teacher_returns_fp32_outputs_close_to_the_fp32_teacher(paths):
    method = moma(paths)
    x = tiny_batch(B=3).views[0]
    method.frozen_teacher_dtype = torch.float32
    ref = method.frozen_teacher_features(method.mae_teacher, x, return_qk=(0, 1), return_layers=(1,))
    method.frozen_teacher_dtype = torch.bfloat16
    out = method.frozen_teacher_features(method.mae_teacher, x, return_qk=(0, 1), return_layers=(1,))
    assert out.tokens.dtype == torch.float32 and out.qk[0][1].dtype == torch.float32
    assert out.layers[1].dtype == torch.float32 and not out.tokens.requires_grad
    assert not torch.equal(out.tokens, ref.tokens)  # it did run in bf16
    torch.testing.assert_close(out.tokens, ref.tokens, rtol=0.05, atol=0.05)
    torch.testing.assert_close(out.qk[1][0], ref.qk[1][0], rtol=0.05, atol=0.05)
    torch.testing.assert_close(out.layers[1], ref.layers[1], rtol=0.05, atol=0.05)


def test_fp32_teacher_inside_a_bf16_autocast_step_runs_in_fp32(paths):
    method = moma(paths)
    x = tiny_batch(B=3).views[0]
    with torch.no_grad():
        ref = method.mae_teacher.forward_features(x)
    method.frozen_teacher_dtype = torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.frozen_teacher_features(method.mae_teacher, x)
    assert out.tokens.dtype == torch.float32
    torch.testing.assert_close(out.tokens, ref.tokens, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("build", [moma, hybrid], ids=["moma", "hybrid_distill"])
def test_loss_and_student_gradients_with_bf16_teachers_match_fp32_teachers(paths, build):
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        method = build(paths)
        method.frozen_teacher_dtype = dtype
        torch.manual_seed(5)
        out = method(tiny_batch(B=4))
        out["loss"].backward()
        grads = [p.grad.clone() for p in method.student.parameters() if p.grad is not None]
        assert out["loss"].dtype == torch.float32 and grads and all(g.dtype == torch.float32 for g in grads)
        results.append((out["loss"].detach(), grads))
    (loss32, grads32), (loss16, grads16) = results
    torch.testing.assert_close(loss16, loss32, rtol=0.03, atol=0.03)
    cosine = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads16]),
                                                   torch.cat([g.flatten() for g in grads32]), dim=0)
    assert cosine > 0.98
