"""gather_tokens against torch.gather(x + pos_embed): CPU op, the op's Triton paths (interpreter), errors,
compile (the Triton kernels' own tests: tests/kernels/test_gather_tokens.py)."""

import importlib
import warnings

import pytest
import torch

from fastkd.ops import gather_tokens, gather_tokens_reference, random_keep

# the package attribute ``fastkd.ops.gather_tokens`` is the function, so fetch the module itself
op_module = importlib.import_module("fastkd.ops.gather_tokens")



TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _inputs(B, N, D, K, dtype, pos_shape, *, duplicates=False, pos_dtype=None):
    x = torch.randn(B, N, D, dtype=dtype, requires_grad=True)
    keep = torch.randint(0, N, (B, K)) if duplicates else random_keep(B, N, K)[0]
    pos = None
    if pos_shape is not None:
        pos = torch.randn(*pos_shape, dtype=pos_dtype or dtype, requires_grad=True)
    return x, keep, pos


def _fwd_bwd(fn, x, keep, pos, grad):
    out = fn(x, keep, pos)
    inputs = [x] + ([pos] if pos is not None else [])
    grads = torch.autograd.grad(out, inputs, grad)
    return out, grads


def _assert_matches_reference(x, keep, pos):
    grad = torch.randn(x.shape[0], keep.shape[1], x.shape[2], dtype=x.dtype if pos is None else torch.result_type(x, pos))
    out, grads = _fwd_bwd(gather_tokens, x, keep, pos, grad)
    ref, ref_grads = _fwd_bwd(gather_tokens_reference, x, keep, pos, grad)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[x.dtype])
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        # the positional gradient is accumulated in fp32, the reference sums in the input dtype
        torch.testing.assert_close(got.float(), want.float(), **TOL[want.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "B,N,D,K,pos_shape",
    [
        (2, 197, 768, 20, "nd"),
        (3, 197, 384, 50, "1nd"),
        (2, 13, 1000, 13, None),
        (1, 1, 1, 1, "nd"),
        (4, 7, 3, 0, "1nd"),
        (5, 9, 1, 4, "nd"),
    ],
)
def test_cpu_matches_reference(B, N, D, K, pos_shape, dtype, cpu_path):
    shape = {None: None, "nd": (N, D), "1nd": (1, N, D)}[pos_shape]
    _assert_matches_reference(*_inputs(B, N, D, K, dtype, shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_duplicate_indices_sum_their_gradients(dtype, cpu_path):
    x, keep, pos = _inputs(3, 6, 5, 6, dtype, (6, 5), duplicates=True)
    assert any(len(set(row.tolist())) < len(row) for row in keep)
    _assert_matches_reference(x, keep, pos)


def test_cpu_mixed_dtypes_promote_like_addition(cpu_path):
    x, keep, pos = _inputs(2, 11, 8, 4, torch.bfloat16, (1, 11, 8), pos_dtype=torch.float32)
    _assert_matches_reference(x, keep, pos)


def test_cpu_non_contiguous_inputs(cpu_path):
    x = torch.randn(3, 16, 7).transpose(1, 2).requires_grad_(True)  # [3, 7, 16], feature dim strided
    keep = torch.tensor([[6, 0, 3, 2], [1, 1, 5, 0], [2, 4, 0, 6]])[:, ::2]
    pos = torch.randn(16, 7).t().requires_grad_(True)
    assert not x.is_contiguous() and not keep.is_contiguous() and not pos.is_contiguous()
    _assert_matches_reference(x, keep, pos)
    _assert_matches_reference(x, keep, None)


def test_only_pos_or_only_x_requires_grad(cpu_path):
    x, keep, pos = _inputs(2, 9, 4, 3, torch.float32, (9, 4))
    out = gather_tokens(x.detach(), keep, pos)
    (gp,) = torch.autograd.grad(out.sum(), [pos])
    torch.testing.assert_close(gp, torch.autograd.grad(gather_tokens_reference(x.detach(), keep, pos).sum(), [pos])[0])
    out = gather_tokens(x, keep, pos.detach())
    (gx,) = torch.autograd.grad(out.sum(), [x])
    torch.testing.assert_close(gx, torch.autograd.grad(gather_tokens_reference(x, keep, pos.detach()).sum(), [x])[0])


def test_gradcheck_float64(cpu_path):
    x, keep, pos = _inputs(2, 5, 3, 4, torch.float64, (1, 5, 3), duplicates=True)
    assert torch.autograd.gradcheck(gather_tokens, (x, keep, pos))


def test_torch_compile_fullgraph():
    def fn(x, keep, pos):
        return gather_tokens(x * 2.0, keep, pos).square().sum()

    x, keep, pos = _inputs(2, 10, 6, 3, torch.float32, (10, 6))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, keep, pos), [x, pos])
    want = torch.autograd.grad(fn(x, keep, pos), [x, pos])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_opcheck(cpu_path):
    x, keep, pos = _inputs(2, 6, 4, 3, torch.float32, (6, 4))
    torch.library.opcheck(torch.ops.fastkd.gather_tokens.default, (x, keep, pos))
    torch.library.opcheck(torch.ops.fastkd.gather_tokens.default, (x, keep, None))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda x, k, p: (x, k.int(), p), TypeError, "keep must be an int64"),
        (lambda x, k, p: (x, k.float(), p), TypeError, "keep must be an int64"),
        (lambda x, k, p: (x.long(), k, p), TypeError, "x must be a floating-point"),
        (lambda x, k, p: (x[0], k, p), ValueError, r"x must have shape \[B, N, D\]"),
        (lambda x, k, p: (x, k[0], p), ValueError, r"keep must have shape \[B, K\]"),
        (lambda x, k, p: (x, k[:1], p), ValueError, r"keep must have shape \[B, K\]"),
        (lambda x, k, p: (x, torch.zeros(2, 6, dtype=torch.long), p), ValueError, "K = 6 tokens but x has only N = 5"),
        (lambda x, k, p: (x, k, p[:, :4]), ValueError, "pos_embed must have shape"),
        (lambda x, k, p: (x, k, p[None, None]), ValueError, "pos_embed must have shape"),
        (lambda x, k, p: (x, k, p.long()), TypeError, "pos_embed must be a floating-point"),
        (lambda x, k, p: (x, k, 1.0), TypeError, "pos_embed must be a Tensor"),
        (lambda x, k, p: (x.tolist(), k, p), TypeError, "x must be a Tensor"),
        (lambda x, k, p: (x, k.tolist(), p), TypeError, "keep must be a Tensor"),
        (lambda x, k, p: (x, k.clone().fill_(5), p), ValueError, r"in \[0, 5\).*\[5, 5\]"),
        (lambda x, k, p: (x, k.clone().fill_(-1), p), ValueError, r"in \[0, 5\).*\[-1, -1\]"),
    ],
)
def test_bad_inputs_raise(make, error, match):
    x, keep, pos = torch.randn(2, 5, 8), torch.tensor([[0, 4], [3, 1]]), torch.randn(5, 8)
    with pytest.raises(error, match=match):
        gather_tokens(*make(x, keep, pos))


def test_index_check_off_the_cpu_runs_only_under_debug_flag(monkeypatch):
    """Off the CPU the range check reads the indices back (a device sync): only with FASTKD_DEBUG=1."""
    monkeypatch.delenv("FASTKD_DEBUG", raising=False)
    assert op_module._checks_indices(torch.device("cpu"))
    assert not op_module._checks_indices(torch.device("cuda", 0))
    monkeypatch.setenv("FASTKD_DEBUG", "1")
    assert op_module._checks_indices(torch.device("cuda", 0))


# ----------------------------------------------------------------------------- Triton kernels (interpreter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "B,N,D,K,pos_shape,duplicates",
    [
        (2, 11, 37, 4, "nd", False),
        (3, 5, 1030, 5, "1nd", True),  # two feature blocks, every token kept, repeats
        (10, 6, 3, 2, "nd", True),  # more batches than batch groups
        (1, 1, 1, 1, None, False),
        (2, 4, 8, 0, "nd", False),
    ],
)
def test_triton_op_paths_match_reference(B, N, D, K, pos_shape, duplicates, dtype):
    """The CUDA implementations of both ops, run on CPU tensors through the interpreted kernels."""
    shape = {None: None, "nd": (N, D), "1nd": (1, N, D)}[pos_shape]
    x, keep, pos = _inputs(B, N, D, K, dtype, shape, duplicates=duplicates)
    x, pos = x.detach(), None if pos is None else pos.detach()
    out = op_module._gather_tokens_triton(x, keep, pos)
    torch.testing.assert_close(out, gather_tokens_reference(x, keep, pos), **TOL[dtype])
    grad = torch.randn(B, K, D, dtype=dtype)
    grad_x, grad_pos = op_module._gather_tokens_backward_triton(grad, keep, N, dtype, pos is not None)
    want_x = torch.zeros(B, N, D, dtype=torch.float32).scatter_add_(1, keep[..., None].expand(-1, -1, D), grad.float())
    torch.testing.assert_close(grad_x, want_x.to(dtype), **TOL[dtype])
    if pos is None:
        assert grad_pos.shape == (0, D)
    else:
        torch.testing.assert_close(grad_pos, want_x.sum(0), atol=1e-5, rtol=1e-5)
