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
- ``"auto"`` (default): on CPU and CUDA, the fastest of these (``xformers`` only where it can run),
  measured on the running machine and cached in the user cache directory
  (:mod:`fastkd.measured_choice`), per device, compute dtype (the autocast dtype where autocast is
  on), grad mode and token class: the key count rounded up to a power of two, clamped to ``AUTO_TOKENS`` (e.g. 5 -> 8, 17 -> 32,
  197 -> 256 tokens). The measurement runs each backend forward (and backward when gradients are
  on) at ``d = 64`` on ``B x H`` rows sized to tens of milliseconds. Inside a ``torch.compile`` trace
  the token count may be symbolic (the kept-token count is dynamic; reading it would specialise the
  graph), so there the token class is ``COMPILED_TOKENS``'s whatever the count, and the decision is
  a trace-time constant: dynamo calls :func:`measured_backend` eagerly (``assume_constant_result``,
  on real tensors, outside the graph) and puts the name in the graph, with no graph break and no
  guard on the cache. On other devices (e.g. ``meta``) it is ``sdpa``.

The environment variable ``FASTKD_ATTENTION`` sets the backend used when none is given.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from fastkd import measured_choice

BACKENDS = ("sdpa", "xformers", "auto", "math")
ENV_VAR = "FASTKD_ATTENTION"
AUTO_TOKENS = (8, 1024)  # token classes of "auto": powers of two in this range
COMPILED_TOKENS = 256  # the class measured for "auto" inside a torch.compile trace
MEASURED_ROWS = (2**12, 2**16)  # measured B x H = min(rows / N, elements / N^2), >= 1


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


def token_class(tokens: int) -> int:
    """``tokens`` rounded up to a power of two, clamped to :data:`AUTO_TOKENS`."""
    low, high = AUTO_TOKENS
    return min(max(1 << (max(tokens, 1) - 1).bit_length(), low), high)


@torch._dynamo.assume_constant_result
def measured_backend(device: str, dtype: torch.dtype, grad: bool, tokens: int) -> str:
    """``auto``'s backend for ``dtype`` tensors on ``device`` at ``tokens`` (a :func:`token_class`)
    keys, with or without gradients: measured once per machine (see the module doc)."""

    def candidates():
        rows, elements = MEASURED_ROWS
        heads = max(1, min(rows // tokens, elements // tokens**2))
        shape = (1, heads, tokens, 64)
        numel = heads * tokens * 64
        q, k, v = (torch.linspace(-1, 1, numel, device=device).to(dtype).reshape(shape).roll(i, -1)
                   .requires_grad_(grad) for i in range(3))  # deterministic: the global RNG stays put

        def run(name):
            with torch.set_grad_enabled(grad):
                out = _run_backend(name, q, k, v, 0.125, 0.0)
                if grad:
                    torch.autograd.grad(out.sum(), (q, k, v))

        return {name: (lambda name=name: run(name)) for name in names}

    names = ("sdpa", "math") + (("xformers",) if _xformers_unavailable_reason(torch.device(device)) is None else ())
    mode = "train" if grad else "no-grad"
    return measured_choice.choose("attention", f"{str(dtype).removeprefix('torch.')} {mode} {tokens} tokens",
                                  device, names, candidates)


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype | None = None,
                    tokens: int | None = None, grad: bool | None = None) -> str:
    """The backend for tensors of ``dtype`` on ``device`` attending over ``tokens`` keys: an explicit
    name as given (``xformers`` checked that it can run); ``auto`` measured (see the module doc;
    ``grad`` defaults to :func:`torch.is_grad_enabled`) where ``tokens`` is given, else ``"auto"``
    (:func:`attention` resolves it per call from the tensors)."""
    backend = check_backend(backend)
    if backend == "xformers" and (reason := _xformers_unavailable_reason(device)) is not None:
        raise RuntimeError(f"attention backend 'xformers' cannot run here: {reason}; use 'sdpa' or 'auto'")
    if backend != "auto" or tokens is None:
        return backend
    if device.type not in ("cpu", "cuda"):
        return "sdpa"  # nothing to time (e.g. meta tensors)
    grad = torch.is_grad_enabled() if grad is None else grad
    tokens = COMPILED_TOKENS if torch.compiler.is_compiling() else token_class(tokens)
    return measured_backend(str(device), compute_dtype(device, dtype), grad, tokens)


def _run_backend(name: str, q, k, v, scale: float, dropout_p: float) -> torch.Tensor:
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
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    name = resolve_backend(backend, q.device, q.dtype, tokens=k.shape[2], grad=grad)
    return _run_backend(name, q, k, v, scale, dropout_p)
