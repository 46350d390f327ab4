"""``gather_tokens``: keep a subset of tokens per sample, fused with the positional-embedding add.

Math (``x[B, N, D]``, ``keep[B, K]`` int64, ``pos_embed[N, D]`` or ``[1, N, D]`` or ``None``)::

    gather_tokens(x, keep, pos_embed) == torch.gather(x + pos_embed, 1, keep[..., None].expand(-1, -1, D))

The output dtype is ``torch.result_type(x, pos_embed)`` (as for ``x + pos_embed``). Backward::

    grad_x         = zeros(B, N, D).scatter_add_(1, keep[..., None].expand(-1, -1, D), grad_out)
    grad_pos_embed = grad_x.sum(0)           # only when pos_embed requires grad, in its shape

The kernels (``fastkd::gather_tokens`` + ``_backward``) read only the kept rows, write ``grad_x`` once and
accumulate the positional gradient in fp32. Indices are range-checked on CPU always, on CUDA with
``FASTKD_DEBUG=1`` (a device sync).
"""

from __future__ import annotations

import os
from typing import Iterator

import torch
from torch import Tensor

from fastkd.ops._dispatch import Route, accumulation_dtype, register

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
    return device.type == "cpu" or os.environ.get("FASTKD_DEBUG", "0") not in ("", "0")


# ----------------------------------------------------------------------------- forward op


def _gather_tokens_triton(x: Tensor, keep: Tensor, pos_embed: Tensor | None) -> Tensor:
    from fastkd.kernels.gather_tokens import launch_gather_tokens_fwd

    B, N, D = x.shape
    if _checks_indices(x.device):
        _check_indices(keep, N)
    x = x if x.stride(-1) == 1 else x.contiguous()
    keep = keep.contiguous()
    pos = None if pos_embed is None else pos_embed.reshape(N, D)
    if pos is not None and pos.stride(-1) != 1:
        pos = pos.contiguous()
    dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
    out = x.new_empty((B, keep.shape[1], D), dtype=dtype)
    launch_gather_tokens_fwd(x, keep, pos, out)
    return out


def _fake(x: Tensor, keep: Tensor, pos_embed: Tensor | None) -> Tensor:
    dtype = x.dtype if pos_embed is None else torch.promote_types(x.dtype, pos_embed.dtype)
    return x.new_empty((x.shape[0], keep.shape[1], x.shape[2]), dtype=dtype)


register("gather_tokens", _fake, cuda=_gather_tokens_triton)


# ----------------------------------------------------------------------------- backward op


def _gather_tokens_backward_triton(grad_out: Tensor, keep: Tensor, num_tokens: int, x_dtype: torch.dtype,
                                   with_pos: bool) -> tuple[Tensor, Tensor]:
    from fastkd.kernels.gather_tokens import launch_gather_tokens_bwd

    B, K, D = grad_out.shape
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    grad_x = grad_out.new_empty((B, num_tokens, D), dtype=x_dtype)
    grad_pos = launch_gather_tokens_bwd(grad_out, keep.contiguous(), grad_x, with_pos)
    acc = accumulation_dtype(grad_out)
    grad_pos = grad_out.new_empty((0, D), dtype=acc) if grad_pos is None else grad_pos.to(acc)
    return grad_x, grad_pos


def _fake_backward(grad_out: Tensor, keep: Tensor, num_tokens: int, x_dtype: torch.dtype,
                   with_pos: bool) -> tuple[Tensor, Tensor]:
    """``(grad_x [B, N, D] in x_dtype, grad_pos [N, D])`` with ``grad_pos`` in float32 (float64 for
    float64 gradients); ``grad_pos`` is ``[0, D]`` when ``with_pos`` is False."""
    B, _, D = grad_out.shape
    grad_x = grad_out.new_empty((B, num_tokens, D), dtype=x_dtype)
    grad_pos = grad_out.new_empty((num_tokens if with_pos else 0, D), dtype=accumulation_dtype(grad_out))
    return grad_x, grad_pos


register("gather_tokens_backward", _fake_backward, cuda=_gather_tokens_backward_triton)
_ROUTE = Route("gather_tokens")


# ----------------------------------------------------------------------------- public API


def _problems(x: object, keep: object, pos_embed: object) -> Iterator[tuple[type[Exception], str]]:
    """The first problem of the arguments of :func:`gather_tokens`, if any."""
    if not isinstance(x, Tensor):
        yield TypeError, f"x must be a Tensor, got {type(x).__name__}"
    if not isinstance(keep, Tensor):
        yield TypeError, f"keep must be a Tensor, got {type(keep).__name__}"
    if x.dim() != 3:
        yield ValueError, f"x must have shape [B, N, D], got {tuple(x.shape)}"
    if not x.is_floating_point():
        yield TypeError, f"x must be a floating-point tensor, got {x.dtype}"
    if keep.dtype != torch.int64:
        yield TypeError, f"keep must be an int64 tensor, got {keep.dtype}"
    B, N, D = x.shape
    if keep.dim() != 2 or keep.shape[0] != B:
        yield ValueError, f"keep must have shape [B, K] with B = x.shape[0] = {B}, got {tuple(keep.shape)}"
    if keep.shape[1] > N:
        yield ValueError, f"keep selects K = {keep.shape[1]} tokens but x has only N = {N} (x shape {tuple(x.shape)})"
    if keep.device != x.device:
        yield ValueError, f"keep is on {keep.device} but x is on {x.device}"
    if pos_embed is None:
        return
    if not isinstance(pos_embed, Tensor):
        yield TypeError, f"pos_embed must be a Tensor or None, got {type(pos_embed).__name__}"
    if tuple(pos_embed.shape) not in ((N, D), (1, N, D)):
        yield ValueError, (f"pos_embed must have shape [N, D] or [1, N, D] = {[N, D]} (from x shape "
                           f"{tuple(x.shape)}), got {tuple(pos_embed.shape)}")
    if not pos_embed.is_floating_point():
        yield TypeError, f"pos_embed must be a floating-point tensor, got {pos_embed.dtype}"
    if pos_embed.device != x.device:
        yield ValueError, f"pos_embed is on {pos_embed.device} but x is on {x.device}"


def _validate(x: object, keep: object, pos_embed: object) -> None:
    for error, message in _problems(x, keep, pos_embed):
        raise error(message)


def gather_tokens(x: Tensor, keep: Tensor, pos_embed: Tensor | None = None) -> Tensor:
    """``[B, K, D]`` (module docstring); ``keep`` in ``[0, N)``, duplicates allowed (their gradients add up)."""
    _validate(x, keep, pos_embed)
    dtypes = (x.dtype,) if pos_embed is None else (x.dtype, pos_embed.dtype)
    return _ROUTE.run(_reference, (x, keep, pos_embed), x.device, dtypes)


def gather_tokens_reference(x: Tensor, keep: Tensor, pos_embed: Tensor | None = None) -> Tensor:
    """The plain PyTorch formula (materialises ``x + pos_embed``): oracle, baseline and fallback."""
    _validate(x, keep, pos_embed)
    return _reference(x, keep, pos_embed)


def _reference(x: Tensor, keep: Tensor, pos_embed: Tensor | None) -> Tensor:
    if pos_embed is not None:
        x = x + pos_embed
    return torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[2]))
