"""fastkd.ops.token_relation against the materialised reference: CPU paths (C++ kernel and the
fallback, the reference through the dispatch), gradcheck, torch.compile, errors (the Triton kernels: tests/kernels/test_token_relation.py)."""

import importlib

import pytest
import torch

from fastkd.ops import DIRECTIONS, token_relation, token_relation_reference
from fastkd.ops import _dispatch
from fastkd.ops._dispatch import native_op
from tests.ops.conftest import force_torch_path

# the package attribute fastkd.ops.token_relation is the function; the module holds the CPU switches
token_relation_module = importlib.import_module("fastkd.ops.token_relation")

# B, H_s, H_t, N, d_s, d_t, head_map
CASES = [
    (2, 2, 2, 7, 32, 32, None),
    (1, 3, 3, 197, 64, 64, None),
    (2, 2, 4, 50, 32, 64, "mean"),
    (1, 1, 1, 1, 32, 32, None),
    (3, 1, 3, 13, 64, 32, "mean"),
]
# shared with the Triton-kernel tests (tests/kernels/test_token_relation.py)
TOLERANCES = {  # dtype: (kl atol, grad tolerance relative to the largest reference gradient)
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (2e-4, 2e-2),
    torch.float16: (1e-4, 4e-3),
}


def _inputs(B, H_s, H_t, N, d_s, d_t, dtype=torch.float32, spread=2.0):
    q_s, k_s = (torch.randn(B, H_s, N, d_s) * spread for _ in range(2))
    q_t, k_t = (torch.randn(B, H_t, N, d_t) * spread for _ in range(2))
    return [x.to(dtype) for x in (q_s, k_s, q_t, k_t)]


def _forward_backward(fn, q_s, k_s, q_t, k_t, grad, **kwargs):
    q_s, k_s = (x.clone().requires_grad_(True) for x in (q_s, k_s))
    kl = fn(q_s, k_s, q_t, k_t, **kwargs)
    kl.backward(grad)
    return kl.detach(), q_s.grad, k_s.grad


def _assert_close(ours, ref, dtype):
    kl_atol, grad_rtol = TOLERANCES[dtype]
    torch.testing.assert_close(ours[0].float(), ref[0].float(), atol=kl_atol, rtol=1e-4)
    for got, want in zip(ours[1:], ref[1:]):
        assert got.dtype == want.dtype and got.shape == want.shape
        scale = max(want.float().abs().max().item(), 0.05)
        torch.testing.assert_close(got.float(), want.float(), atol=grad_rtol * scale, rtol=grad_rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case", CASES)
def test_cpu_matches_reference(case, direction, dtype):
    *shape, head_map = case
    q_s, k_s, q_t, k_t = _inputs(*shape, dtype=dtype)
    grad = torch.randn(shape[0], shape[1], shape[3])
    kwargs = dict(direction=direction, head_map=head_map, temperature=0.7)
    ours = _forward_backward(token_relation, q_s, k_s, q_t, k_t, grad, **kwargs)
    ref = _forward_backward(token_relation_reference, q_s, k_s, q_t, k_t, grad, **kwargs)
    assert ours[0].shape == (shape[0], shape[1], shape[3]) and ours[0].dtype == torch.float32
    _assert_close(ours, ref, dtype)


@pytest.mark.parametrize(
    "use_cpp,tile_elements,direction",
    [(True, 600, "teacher_to_student"), (False, 600, "student_to_teacher"), (True, 10_000, "teacher_to_student")],
)
def test_cpu_paths_with_many_tiles(monkeypatch, use_cpp, tile_elements, direction):
    """Small tile budgets of the C++ kernel: many row blocks (600) or chunks of whole heads (10_000),
    and the fallback (the reference through the dispatch); custom scales and a head-mapped teacher
    with a different head dim."""
    if use_cpp and native_op("token_relation") is None:
        pytest.skip("fastkd._C is not built")
    monkeypatch.setattr(token_relation_module, "CPU_TILE_ELEMENTS", tile_elements)
    if not use_cpp:
        force_torch_path(monkeypatch)
        monkeypatch.setattr(_dispatch, "_warn_once", lambda op, reason: None)
    q_s, k_s, q_t, k_t = _inputs(3, 2, 4, 50, 16, 24)
    grad = torch.randn(3, 2, 50)
    kwargs = dict(direction=direction, head_map="mean", scale_s=0.3, scale_t=0.2, temperature=1.5)
    ours = _forward_backward(token_relation, q_s, k_s, q_t, k_t, grad, **kwargs)
    ref = _forward_backward(token_relation_reference, q_s, k_s, q_t, k_t, grad, **kwargs)
    _assert_close(ours, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("H_t,head_map", [(3, None), (6, "mean")])
def test_cpu_tiles_of_several_heads(H_t, head_map, direction, dtype):
    """Many heads at small N (B * H_s = 39): the C++ kernel batches several heads per tile (the last
    tile partial) and rows of 17 / 33 keys end in a masked partial vector."""
    for N in (17, 33):
        q_s, k_s, q_t, k_t = _inputs(13, 3, H_t, N, 32, 16, dtype=dtype)
        grad = torch.randn(13, 3, N)
        kwargs = dict(direction=direction, head_map=head_map, temperature=0.9)
        ours = _forward_backward(token_relation, q_s, k_s, q_t, k_t, grad, **kwargs)
        ref = _forward_backward(token_relation_reference, q_s, k_s, q_t, k_t, grad, **kwargs)
        _assert_close(ours, ref, dtype)


def test_non_contiguous_inputs():
    """q, k as views of a fused [B, N, 3, H, d] qkv tensor, as attention layers hand them over."""
    qkv = torch.randn(2, 19, 3, 4, 32)
    q_s, k_s = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    q_t, k_t = (x.contiguous() for x in _inputs(2, 4, 4, 19, 32, 32)[2:])
    grad = torch.randn(2, 4, 19)
    ours = _forward_backward(token_relation, q_s, k_s, q_t, k_t, grad)
    ref = _forward_backward(token_relation_reference, q_s, k_s, q_t, k_t, grad)
    _assert_close(ours, ref, torch.float32)


@pytest.mark.parametrize(
    "direction,head_map,H_t", [("teacher_to_student", None, 2), ("student_to_teacher", "mean", 4)]
)
def test_gradcheck_cpu(direction, head_map, H_t):
    q_s, k_s, q_t, k_t = _inputs(1, 2, H_t, 5, 3, 4, dtype=torch.float64, spread=1.0)
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)

    def fn(q, k):
        return token_relation(q, k, q_t, k_t, direction=direction, head_map=head_map, temperature=0.8)

    assert torch.autograd.gradcheck(fn, (q_s, k_s))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_identical_student_and_teacher_give_zero(direction):
    q, k = _inputs(2, 3, 3, 50, 32, 32)[:2]
    q_s, k_s = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    kl = token_relation(q_s, k_s, q, k, direction=direction)
    kl.sum().backward()
    assert kl.abs().max().item() < 1e-5
    assert q_s.grad.abs().max().item() < 1e-6 and k_s.grad.abs().max().item() < 1e-6


def test_teacher_gets_no_gradient_and_stats_are_fp32():
    q_s, k_s, q_t, k_t = (x.requires_grad_(True) for x in _inputs(1, 2, 2, 9, 32, 32))
    token_relation(q_s, k_s, q_t, k_t).sum().backward()
    assert q_t.grad is None and k_t.grad is None
    assert q_s.grad is not None and k_s.grad is not None


def test_torch_compile_fullgraph():
    q_s, k_s, q_t, k_t = _inputs(2, 2, 4, 11, 32, 32)
    grad = torch.randn(2, 2, 11)

    def loss(q, k, qt, kt):
        return token_relation(q, k, qt, kt, head_map="mean", direction="student_to_teacher") * 2.0

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    ours = _forward_backward(compiled, q_s, k_s, q_t, k_t, grad)
    ref = _forward_backward(loss, q_s, k_s, q_t, k_t, grad)
    _assert_close(ours, ref, torch.float32)


def test_opcheck():
    q_s, k_s, q_t, k_t = _inputs(1, 2, 4, 6, 8, 8)
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    torch.library.opcheck(torch.ops.fastkd.token_relation.default, (q_s, k_s, q_t, k_t, 0.5, 0.4, True))


@pytest.mark.parametrize(
    "kwargs,shapes,error,match",
    [
        ({}, ((2, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16)), ValueError, "q_s must be"),
        ({}, ((2, 2, 8, 16), (2, 2, 9, 16), (2, 2, 8, 16), (2, 2, 8, 16)), ValueError, "q_s and k_s"),
        ({}, ((2, 2, 8, 16), (2, 2, 8, 16), (2, 2, 7, 16), (2, 2, 7, 16)), ValueError, "same batch and tokens"),
        ({}, ((2, 2, 8, 16), (2, 2, 8, 16), (2, 4, 8, 16), (2, 4, 8, 16)), ValueError, "head_map='mean'"),
        ({"head_map": "mean"}, ((2, 2, 8, 16), (2, 2, 8, 16), (2, 3, 8, 16), (2, 3, 8, 16)), ValueError, "multiple"),
        ({"head_map": "max"}, ((2, 2, 8, 16),) * 4, ValueError, "head_map"),
        ({"direction": "forward"}, ((2, 2, 8, 16),) * 4, ValueError, "direction"),
        ({"temperature": 0.0}, ((2, 2, 8, 16),) * 4, ValueError, "temperature"),
        ({"scale_s": -1.0}, ((2, 2, 8, 16),) * 4, ValueError, "scale_s"),
    ],
)
def test_bad_inputs(kwargs, shapes, error, match):
    tensors = [torch.randn(*shape) for shape in shapes]
    with pytest.raises(error, match=match):
        token_relation(*tensors, **kwargs)


def test_bad_dtypes_and_types():
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(TypeError, match="k_t must be a torch.Tensor"):
        token_relation(x, x, x, x.numpy())
    with pytest.raises(TypeError, match="q_s must be float"):
        token_relation(x.long(), x.long(), x, x)
