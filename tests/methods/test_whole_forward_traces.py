"""Every method's whole forward (backbones, heads, losses and glue, the fused ops as custom ops)
traces into one graph: ``torch.compile(fullgraph=True)`` with the ``aot_eager`` backend (dynamo
capture plus the joint forward / backward graph, what ``inductor`` would compile) gives the
eager loss and gradients, with no graph break (a break raises under ``fullgraph``). In float64:
the compiled graph may pick other kernels (another rounding), which fp32 shows as ~1e-5 on
ill-conditioned gradients (the 1e-6-scale CLS token's)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

from fastkd.data.batch import Batch
from fastkd.methods import build_method
from tests.methods import test_hybrid_distill, test_moma
from tests.methods.common import assert_close_relative
from tests.methods.plain import TINY_MOCO, TINY_VIT, TINY_VIT_ARCH, tiny_batch, write_tiny_teacher
from tests.methods.test_mokd import CONFIG as TINY_MOKD
from tests.methods.test_mokd import multicrop


# role -> (seed, overrides) of the tiny teachers MOMA and Hybrid Distill read
TEACHERS = {"mocov3": (1, {"embed_dim": 48}), "mae": (2, {"embed_dim": 48}), "feature": (11, {"embed_dim": 48}),
            "relation": (12, {"num_heads": 4})}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace")
    return {role: write_tiny_teacher(root / f"{role}.pt", seed, **kw) for role, (seed, kw) in TEACHERS.items()}


def method_and_batch(name: str, teachers: dict) -> tuple[torch.nn.Module, Batch]:
    if name == "mokd":
        return build_method("mokd", TINY_MOKD), multicrop()
    if name == "moma":
        return build_method("moma", test_moma.config(teachers)), tiny_batch(views=1, B=4)
    if name == "hybrid_distill":
        return build_method("hybrid_distill", test_hybrid_distill.config(teachers)), tiny_batch(views=1, B=4)
    if name == "mae":
        config = {"backbone": {"arch": TINY_VIT_ARCH, "kwargs": TINY_VIT}, "decoder_dim": 32, "decoder_depth": 1,
                  "decoder_num_heads": 2}
        return build_method("mae", config), tiny_batch(views=1, B=4)
    return build_method(name, TINY_MOCO), tiny_batch(views=2, B=4)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name", ["mocov3", "resmoco", "mae", "moma", "hybrid_distill", "mokd"])
def test_whole_forward_is_one_graph_with_the_eager_result(name, teachers):
    torch.manual_seed(0)
    eager, batch = method_and_batch(name, teachers)
    eager.train()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    forward = torch.compile(compiled.forward, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    expected = eager(batch)
    torch.manual_seed(1)  # the same random masks in both
    out = forward(batch)
    torch.testing.assert_close(out["loss"], expected["loss"], rtol=1e-5, atol=1e-6)
    expected["loss"].backward()
    out["loss"].backward()
    pairs = [(key, p.grad, q.grad) for (key, p), q in zip(eager.named_parameters(), compiled.parameters())
             if p.grad is not None]
    scale = max(g.norm() for _, g, _ in pairs)
    for key, expected_grad, grad in pairs:
        if expected_grad.norm() <= 1e-9 * scale:  # zero up to rounding (a bias a BatchNorm cancels)
            assert grad.norm() <= 1e-9 * scale, key
        else:
            assert_close_relative(grad, expected_grad, key)


@pytest.mark.parametrize("weights", [{"a": 1.0}, {"a": 1.0, "b": 0.5}])
def test_loss_dict_under_inductor_keeps_the_loss_gradient(weights):
    """A one-part loss of weight 1 (MoCo v3, MAE) once came out of an inductor-compiled forward without
    ``requires_grad`` (``1.0 * part`` folded into the part whose detached copy is also returned)."""
    from fastkd.methods.base import loss_dict

    w = torch.linspace(-1.0, 1.0, 5, requires_grad=True)

    def forward(x):
        return loss_dict({name: (w * x * (i + 1)).sum() for i, name in enumerate(weights)}, weights)

    torch._dynamo.reset()
    out = torch.compile(forward, fullgraph=True, backend="inductor")(torch.ones(5))
    assert out["loss"].requires_grad
    out["loss"].backward()
    expected = sum(weight * (i + 1) for i, weight in enumerate(weights.values()))
    torch.testing.assert_close(w.grad, torch.full((5,), expected))
    torch.testing.assert_close(out["a"], torch.tensor(0.0))
