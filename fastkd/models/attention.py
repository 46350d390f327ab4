"""Multi-head attention with selectable backends.

Every backend computes, for ``q [B, H, N, d]``, ``k [B, H, M, d]``, ``v [B, H, M, dv]``::

    out = dropout(softmax(q @ k.transpose(-2, -1) * scale, dim=-1)) @ v        # [B, H, N, dv]

with ``scale = d ** -0.5`` unless given.

Backends:

- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
  kernels on GPU, fused CPU kernel), never materialises the ``N x M`` map;
- ``"xformers"``: ``xformers.ops.memory_efficient_attention``; CUDA tensors only (xformers has no
  CPU kernels). Asking for it where it cannot run raises ``RuntimeError``;
- ``"math"``: the explicit formula above, materialising the map;
- ``"auto"`` (default): the fastest of these for the device and the dtype the matmuls run in (the
  autocast dtype where autocast is on): ``xformers`` where it can run; on CPU ``math`` for
  bf16 / fp16 and ``sdpa`` otherwise; ``sdpa`` everywhere else. Measured (torch 2.14.1, 2-core x86
  CPU, forward + backward, B x H = 192-1536, N = 5-197 tokens, d = 32-64): in fp32 ``sdpa`` is
  1.2-5x faster than ``math`` at every length; in bf16 the CPU ``sdpa`` kernel is 2-8x slower than
  ``math`` at every length from 10 tokens up. Sequence length did not move the choice on CPU, so
  the rule is by dtype (``CPU_MATH_DTYPES``).

The environment variable ``FASTKD_ATTENTION`` sets the backend used when none is given.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "xformers", "auto", "math")
ENV_VAR = "FASTKD_ATTENTION"
CPU_MATH_DTYPES = (torch.bfloat16, torch.float16)  # where "auto" picks "math" on CPU (measured: module doc)


def default_backend() -> str:
    """The backend named by ``$FASTKD_ATTENTION``, or ``"auto"`` when unset."""
    name = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {name!r}")
    return name


def check_backend(backend: str | None) -> str:
    """Validate ``backend`` (``None`` -> :func:`default_backend`) and return its name."""
    if backend is None:
        return default_backend()
    if not isinstance(backend, str):
        raise TypeError(f"attention backend must be a str or None, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    return backend


_XFORMERS: list = []  # [xformers.ops or the reason it cannot be used], filled on first use


def _xformers_ops():
    """The ``xformers.ops`` module, or the reason it cannot be used (a str). Cached in a plain
    module list (not ``functools.lru_cache``, which ``torch.compile`` traces through)."""
    if not _XFORMERS:
        if importlib.util.find_spec("xformers") is None:
            _XFORMERS.append("xformers is not installed")
        else:
            try:
                import xformers.ops as xops

                _XFORMERS.append(xops)
            except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised here
                _XFORMERS.append(f"xformers failed to import ({type(exc).__name__}: {exc})")
    return _XFORMERS[0]


def _xformers_unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"xformers has no {device.type} kernels (tensors are on {device})"
    ops = _xformers_ops()
    return ops if isinstance(ops, str) else None


def compute_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype matmuls on ``device`` run in: the autocast dtype where autocast is on for the
    device, else ``dtype`` (float32 when None)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32 if dtype is None else dtype


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend (``sdpa``, ``xformers`` or ``math``) for tensors of ``dtype`` on
    ``device`` (``auto``: see the module doc)."""
    backend = check_backend(backend)
    if backend not in ("xformers", "auto"):
        return backend
    reason = _xformers_unavailable_reason(device)
    if reason is None:
        return "xformers"
    if backend == "xformers":
        raise RuntimeError(f"attention backend 'xformers' cannot run here: {reason}; use 'sdpa' or 'auto'")
    if device.type == "cpu" and compute_dtype(device, dtype) in CPU_MATH_DTYPES:
        return "math"
    return "sdpa"


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, d], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q [B,H,N,d], k [B,H,M,d], v [B,H,M,dv] do not match: q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` per head, ``[B, H, N, dv]``, through ``backend`` (see module doc)."""
    _check_qkv(q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive or None, got {scale}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    name = resolve_backend(backend, q.device, q.dtype)
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if name == "xformers":
        xops = _xformers_ops()
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p=dropout_p, scale=scale
        )
        return out.transpose(1, 2)
    attn = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v
