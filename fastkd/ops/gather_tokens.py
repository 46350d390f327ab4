"""``gather_tokens``: keep a subset of tokens per sample, fused with the positional-embedding add.

Math (``x[B, N, D]``, ``keep[B, K]`` int64, ``pos_embed[N, D]`` or ``[1, N, D]`` or ``None``)::

    gather_tokens(x, keep, pos_embed) == torch.gather(x + pos_embed, 1, keep[..., None].expand(-1, -1, D))

The output dtype is ``torch.result_type(x, pos_embed)`` (as for ``x + pos_embed``). Backward::

    grad_x         = zeros(B, N, D).scatter_add_(1, keep[..., None].expand(-1, -1, D), grad_out)
    grad_pos_embed = grad_x.sum(0)           # only when pos_embed requires grad, in its shape

Neither ``x + pos_embed`` nor any ``[B, N, D]`` temporary is materialised: the forward reads only the
kept rows of ``x`` and ``pos_embed``; the backward writes ``grad_x`` once and accumulates the
positional gradient (in fp32) from the ``B * K`` kept rows only, never from ``grad_x``.

Registered as ``fastkd::gather_tokens`` (+ ``fastkd::gather_tokens_backward``) with
``torch.library.custom_op``; implementations are chosen by the rule of ``fastkd.ops._dispatch`` (the
same for every op): CUDA -> the Triton kernels of ``fastkd.kernels.gather_tokens``; CPU -> the C++
kernels ``torch.ops.fastkd.gather_tokens_cpu`` / ``gather_tokens_backward_cpu`` of ``fastkd._C``
(parallel over rows, one write of ``grad_x``); float64 on CUDA, other devices or a missing extension
-> an ``index_select`` / ``index_put_`` PyTorch path over flattened rows.
Indices are checked (range) on CPU always and on CUDA when the
environment variable ``FASTKD_DEBUG=1`` is set (the check synchronises the device).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from fastkd.ops._dispatch import OpImplementations
from fastkd.ops.reference_mode import cpu_reference, reference_ops_enabled, small_on_cpu

__all__ = ["gather_tokens", "gather_tokens_reference"]


def _check_indices(keep: Tensor, N: int) -> None:
    """Raise ValueError when some index of ``keep`` is outside ``[0, N)`` (reads the data)."""
    if keep.numel() == 0:
        return
    low, high = torch.aminmax(keep)
    low, high = int(low), int(high)
    if low < 0 or high >= N:
        raise ValueError(f"keep indices must be in [0, {N}) (N = x.shape[1]), got values in [{low}, {high}]")


def _checks_indices(device: torch.device) -> bool:
    """Indices are range-checked on CPU always, elsewhere (a device sync) only with FASTKD_DEBUG=1."""
    return device.type == "cpu" or os.environ.get("FASTKD_DEBUG", "0") not in ("", "0")


def _pos_grad_dtype(grad_dtype: torch.dtype) -> torch.dtype:
    """The positional gradient is accumulated in float32 (float64 for float64 gradients)."""
    return torch.float64 if grad_dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- forward op


def _gather_tokens_torch(x: Tensor, keep: Tensor, pos_embed: Tensor | None) -> Tensor:
    """PyTorch path (any device): ``index_select`` of the kept rows of x and of pos_embed, then add."""
    B, N, D = x.shape
    K = keep.shape[1]
    rows = (keep + torch.arange(B, dtype=keep.dtype, device=keep.device).mul_(N)[:, None]).view(-1)
    out = x.reshape(B * N, D).index_select(0, rows).view(B, K, D)
    if pos_embed is None:
        return out
    pos_rows = pos_embed.reshape(N, D).index_select(0, keep.reshape(-1)).view(B, K, D)
    if out.dtype == pos_rows.dtype:
        return out.add_(pos_rows)
    return torch.add(out, pos_rows)


def _gather_tokens_triton(x: Tensor, keep: Tensor, pos_embed: Tensor | None) -> Tensor:
    from fastkd.kernels.gather_tokens import launch_gather_tokens_fwd

    B, N, D = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    keep = keep.contiguous()
    pos = None if pos_embed is None else pos_embed.reshape(N, D)
    if pos is not None and pos.stride(-1) != 1:
        pos = pos.contiguous()
    dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
    out = x.new_empty((B, keep.shape[1], D), dtype=dtype)
    launch_gather_tokens_fwd(x, keep, pos, out)
    return out


_FORWARD = OpImplementations(
    "gather_tokens", torch=_gather_tokens_torch, native="gather_tokens_cpu", triton=_gather_tokens_triton
)


@torch.library.custom_op("fastkd::gather_tokens", mutates_args=())
def _gather_tokens_op(x: Tensor, keep: Tensor, pos_embed: Tensor | None) -> Tensor:
    if _checks_indices(x.device):
        _check_indices(keep, x.shape[1])
    return _FORWARD(x, keep, pos_embed)


@_gather_tokens_op.register_fake
def _(x: Tensor, keep: Tensor, pos_embed: Tensor | None) -> Tensor:
    dtype = x.dtype if pos_embed is None else torch.promote_types(x.dtype, pos_embed.dtype)
    return x.new_empty((x.shape[0], keep.shape[1], x.shape[2]), dtype=dtype)


# ----------------------------------------------------------------------------- backward op


def _gather_tokens_backward_torch(
    grad_out: Tensor, keep: Tensor, num_tokens: int, x_dtype: torch.dtype, with_pos: bool
) -> tuple[Tensor, Tensor]:
    """PyTorch path (any device): accumulate the gradient rows into zeros (grad_x, and grad_pos in
    the accumulation dtype straight from grad_out)."""
    B, K, D = grad_out.shape
    N = num_tokens
    flat_grad = grad_out.reshape(B * K, D)
    rows = (keep + torch.arange(B, dtype=keep.dtype, device=keep.device).mul_(N)[:, None]).view(-1)
    grad_x = grad_out.new_zeros((B * N, D), dtype=x_dtype)
    grad_x.index_put_((rows,), flat_grad.to(x_dtype), accumulate=True)
    acc = _pos_grad_dtype(grad_out.dtype)
    grad_pos = grad_out.new_zeros((N if with_pos else 0, D), dtype=acc)
    if with_pos:
        grad_pos.index_add_(0, keep.reshape(-1), flat_grad.to(acc))
    return grad_x.view(B, N, D), grad_pos


def _gather_tokens_backward_triton(
    grad_out: Tensor, keep: Tensor, num_tokens: int, x_dtype: torch.dtype, with_pos: bool
) -> tuple[Tensor, Tensor]:
    from fastkd.kernels.gather_tokens import launch_gather_tokens_bwd

    B, K, D = grad_out.shape
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    grad_x = grad_out.new_empty((B, num_tokens, D), dtype=x_dtype)
    grad_pos = launch_gather_tokens_bwd(grad_out, keep.contiguous(), grad_x, with_pos)
    acc = _pos_grad_dtype(grad_out.dtype)
    grad_pos = grad_out.new_empty((0, D), dtype=acc) if grad_pos is None else grad_pos.to(acc)
    return grad_x, grad_pos


_BACKWARD = OpImplementations(
    "gather_tokens_backward", torch=_gather_tokens_backward_torch, native="gather_tokens_backward_cpu",
    triton=_gather_tokens_backward_triton,
)


@torch.library.custom_op("fastkd::gather_tokens_backward", mutates_args=())
def _gather_tokens_backward_op(
    grad_out: Tensor, keep: Tensor, num_tokens: int, x_dtype: torch.dtype, with_pos: bool
) -> tuple[Tensor, Tensor]:
    """Returns ``(grad_x [B, N, D] in x_dtype, grad_pos [N, D])`` with ``grad_pos`` in float32
    (float64 for float64 gradients); ``grad_pos`` is ``[0, D]`` when ``with_pos`` is False
    (custom ops cannot return None)."""
    return _BACKWARD(grad_out, keep, num_tokens, x_dtype, with_pos)


@_gather_tokens_backward_op.register_fake
def _(grad_out: Tensor, keep: Tensor, num_tokens: int, x_dtype: torch.dtype, with_pos: bool) -> tuple[Tensor, Tensor]:
    B, _, D = grad_out.shape
    grad_x = grad_out.new_empty((B, num_tokens, D), dtype=x_dtype)
    grad_pos = grad_out.new_empty((num_tokens if with_pos else 0, D), dtype=_pos_grad_dtype(grad_out.dtype))
    return grad_x, grad_pos


# ----------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output) -> None:
    x, keep, pos_embed = inputs
    ctx.save_for_backward(keep)
    ctx.num_tokens = x.shape[1]
    ctx.x_dtype = x.dtype
    ctx.pos_shape = None if pos_embed is None else tuple(pos_embed.shape)
    ctx.pos_dtype = None if pos_embed is None else pos_embed.dtype


def _backward(ctx, grad_out: Tensor):
    (keep,) = ctx.saved_tensors
    with_pos = ctx.pos_shape is not None and ctx.needs_input_grad[2]
    if not (ctx.needs_input_grad[0] or with_pos):
        return None, None, None
    grad_x, grad_pos = _gather_tokens_backward_op(grad_out, keep, ctx.num_tokens, ctx.x_dtype, with_pos)
    grad_x = grad_x if ctx.needs_input_grad[0] else None
    grad_pos = grad_pos.to(ctx.pos_dtype).view(ctx.pos_shape) if with_pos else None
    return grad_x, None, grad_pos


_gather_tokens_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def _validate(x: object, keep: object, pos_embed: object) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if not isinstance(keep, Tensor):
        raise TypeError(f"keep must be a Tensor, got {type(keep).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape [B, N, D], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if keep.dtype != torch.int64:
        raise TypeError(f"keep must be an int64 tensor, got {keep.dtype}")
    B, N, D = x.shape
    if keep.dim() != 2 or keep.shape[0] != B:
        raise ValueError(f"keep must have shape [B, K] with B = x.shape[0] = {B}, got {tuple(keep.shape)}")
    if keep.shape[1] > N:
        raise ValueError(f"keep selects K = {keep.shape[1]} tokens but x has only N = {N} (x shape {tuple(x.shape)})")
    if keep.device != x.device:
        raise ValueError(f"keep is on {keep.device} but x is on {x.device}")
    if pos_embed is None:
        return
    if not isinstance(pos_embed, Tensor):
        raise TypeError(f"pos_embed must be a Tensor or None, got {type(pos_embed).__name__}")
    if tuple(pos_embed.shape) not in ((N, D), (1, N, D)):
        raise ValueError(
            f"pos_embed must have shape [N, D] or [1, N, D] = {[N, D]} (from x shape {tuple(x.shape)}), "
            f"got {tuple(pos_embed.shape)}"
        )
    if not pos_embed.is_floating_point():
        raise TypeError(f"pos_embed must be a floating-point tensor, got {pos_embed.dtype}")
    if pos_embed.device != x.device:
        raise ValueError(f"pos_embed is on {pos_embed.device} but x is on {x.device}")


def gather_tokens(x: Tensor, keep: Tensor, pos_embed: Tensor | None = None) -> Tensor:
    """``torch.gather(x + pos_embed, 1, keep[..., None].expand(-1, -1, D))`` -> ``[B, K, D]``, fused.

    ``x``: ``[B, N, D]`` floating point; ``keep``: ``[B, K]`` int64 token indices in ``[0, N)``
    (K <= N; duplicates allowed, their gradients add up); ``pos_embed``: ``[N, D]``, ``[1, N, D]``
    or ``None``. Differentiable w.r.t. ``x`` and ``pos_embed``. Inside ``reference_ops()``, and for a
    small CPU input (see :mod:`fastkd.ops.reference_mode`), it is :func:`gather_tokens_reference`.
    """
    if reference_ops_enabled():
        return gather_tokens_reference(x, keep, pos_embed)
    _validate(x, keep, pos_embed)
    if small_on_cpu("gather_tokens", x.device, keep.numel() * x.shape[-1]):
        return cpu_reference(gather_tokens_reference, x, keep, pos_embed)
    return _gather_tokens_op(x, keep, pos_embed)


def gather_tokens_reference(x: Tensor, keep: Tensor, pos_embed: Tensor | None = None) -> Tensor:
    """The plain PyTorch formula (materialises ``x + pos_embed``): oracle for tests and benchmark baseline."""
    _validate(x, keep, pos_embed)
    if pos_embed is not None:
        x = x + pos_embed
    return torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[2]))
