"""Multi-head attention with selectable backends.

Every backend computes, for ``q [B, H, N, d]``, ``k [B, H, M, d]``, ``v [B, H, M, dv]``::

    out = dropout(softmax(q @ k.transpose(-2, -1) * scale, dim=-1)) @ v        # [B, H, N, dv]

with ``scale = d ** -0.5`` unless given.

Backends:

- ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention`` (flash /
  memory-efficient kernels on GPU, fused CPU kernel), never materialises the ``N x M`` map;
- ``"xformers"``: ``xformers.ops.memory_efficient_attention``; CUDA tensors only (xformers has no
  CPU kernels). Asking for it where it cannot run raises ``RuntimeError``;
- ``"auto"``: ``xformers`` where it can run, otherwise ``sdpa`` with one warning per process;
- ``"math"``: the explicit formula above, materialising the map; for tests only.

The environment variable ``FASTKD_ATTENTION`` sets the backend used when none is given.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "xformers", "auto", "math")
ENV_VAR = "FASTKD_ATTENTION"
_fallback_warned = False


def default_backend() -> str:
    """The backend named by ``$FASTKD_ATTENTION``, or ``"sdpa"`` when unset."""
    name = os.environ.get(ENV_VAR, "").strip().lower() or "sdpa"
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


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    """The ``xformers.ops`` module, or the reason it cannot be used (a str)."""
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    try:
        import xformers.ops as xops
    except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised here
        return f"xformers failed to import ({type(exc).__name__}: {exc})"
    return xops


def _xformers_unavailable_reason(device: torch.device) -> str | None:
    ops = _xformers_ops()
    if isinstance(ops, str):
        return ops
    if device.type != "cuda":
        return f"xformers has no {device.type} kernels (tensors are on {device})"
    return None


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The concrete backend (``sdpa``, ``xformers`` or ``math``) used for tensors on ``device``."""
    global _fallback_warned
    backend = check_backend(backend)
    if backend not in ("xformers", "auto"):
        return backend
    reason = _xformers_unavailable_reason(device)
    if reason is None:
        return "xformers"
    if backend == "xformers":
        raise RuntimeError(f"attention backend 'xformers' cannot run here: {reason}; use 'sdpa' or 'auto'")
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(f"attention backend 'auto': {reason}; using 'sdpa'", RuntimeWarning, stacklevel=3)
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
    name = resolve_backend(backend, q.device)
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
