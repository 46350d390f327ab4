"""Multi-head attention with selectable backends. Every backend computes, for ``q [B, H, N, d]``,
``k [B, H, M, d]``, ``v [B, H, M, dv]`` and ``scale = d ** -0.5`` unless given::

    out = dropout(softmax(q @ k.transpose(-2, -1) * scale, dim=-1)) @ v        # [B, H, N, dv]

- ``"sdpa"``: ``F.scaled_dot_product_attention`` (flash / memory-efficient / fused CPU kernels);
- ``"xformers"``: ``xformers.ops.memory_efficient_attention``, CUDA only (``RuntimeError`` elsewhere);
- ``"math"``: the formula above, materialising the ``N x M`` map;
- ``"auto"`` (default; ``$FASTKD_ATTENTION`` overrides): on CPU and CUDA the fastest of these at ``d = 64``,
  measured and cached (:mod:`fastkd.measured_choice`) per device, compute dtype, grad mode and token class (key
  count rounded up to a power of two within ``AUTO_TOKENS``; ``COMPILED_TOKENS`` inside a ``torch.compile`` trace,
  where the choice is a trace-time constant). Elsewhere (e.g. ``meta``) ``sdpa``.

:func:`vit_block_forward` equals timm's ``Block.forward`` with attention through :func:`attention`::

    q, k, v = split(qkv(norm1(x)));  q, k = q_norm(q), k_norm(k)          # each [B, H, N, d]
    x = x + drop_path1(ls1(proj(gate * norm(merge_heads(attention(q, k, v, scale=attn.scale))))))
    x = x + drop_path2(ls2(mlp(norm2(x))))

and also returns the ``(q, k)`` the attention consumed, for relation distillation.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block

from fastkd import measured_choice
from fastkd.checks import check_choice, check_number

BACKENDS = ("sdpa", "xformers", "auto", "math")
ENV_VAR = "FASTKD_ATTENTION"
AUTO_TOKENS = (8, 1024)  # token classes of "auto": powers of two in this range
COMPILED_TOKENS = 256  # the class measured for "auto" inside a torch.compile trace
MEASURED_ROWS = (2**12, 2**16)  # measured B x H = min(rows / N, elements / N^2), >= 1


def default_backend() -> str:
    """The backend named by ``$FASTKD_ATTENTION``, or ``"auto"`` when unset."""
    name = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    check_choice(ENV_VAR, name, BACKENDS)
    return name


def check_backend(backend: str | None) -> str:
    """Validate ``backend`` (``None`` -> :func:`default_backend`) and return its name."""
    if backend is None:
        return default_backend()
    check_choice("attention backend", backend, BACKENDS)
    return backend


_XFORMERS: list = []  # [xformers.ops or the reason it cannot be used], filled on first use


def _xformers_ops():
    """``xformers.ops``, or why it cannot be used (a str); cached in a list (``lru_cache`` is traced through)."""
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
    """The autocast dtype where autocast is on for ``device``, else ``dtype`` (float32 when None)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32 if dtype is None else dtype


def token_class(tokens: int) -> int:
    """``tokens`` rounded up to a power of two, clamped to :data:`AUTO_TOKENS`."""
    low, high = AUTO_TOKENS
    return min(max(1 << (max(tokens, 1) - 1).bit_length(), low), high)


@torch._dynamo.assume_constant_result
def measured_backend(device: str, dtype: torch.dtype, grad: bool, tokens: int) -> str:
    """``auto``'s backend at ``tokens`` (a :func:`token_class`) keys, measured once per machine."""

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
    """An explicit name as given (``xformers`` checked to run here); ``auto`` measured where ``tokens`` is given,
    else left ``"auto"`` for :func:`attention` to resolve per call."""
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
    tensors = {"q": q, "k": k, "v": v}
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors.values()) or \
            not q.dtype == k.dtype == v.dtype:
        raise TypeError("q, k, v must be floating tensors of one dtype, got "
                        + ", ".join(f"{n} {getattr(t, 'dtype', type(t).__name__)}" for n, t in tensors.items()))
    if not q.dim() == k.dim() == v.dim() == 4 or q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or \
            q.shape[-1] != k.shape[-1] or not q.device == k.device == v.device:
        raise ValueError("q [B, H, N, d], k [B, H, M, d], v [B, H, M, dv] on one device do not match: "
                         + ", ".join(f"{n} {tuple(t.shape)} on {t.device}" for n, t in tensors.items()))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None,
              scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` per head, ``[B, H, N, dv]``, through ``backend`` (see module doc)."""
    _check_qkv(q, k, v)
    check_number("dropout_p", dropout_p, low=0.0, high=1.0, high_open=True)
    if scale is not None:
        check_number("scale", scale, low=0.0, low_open=True)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    name = resolve_backend(backend, q.device, q.dtype, tokens=k.shape[2], grad=grad)
    return _run_backend(name, q, k, v, scale, dropout_p)


def check_vit_block(block: torch.nn.Module, index: int) -> None:
    """Raise ``TypeError`` unless ``block`` is a timm ``Block`` with a timm ``Attention``."""
    if not isinstance(block, Block) or not isinstance(block.attn, Attention):
        raise TypeError(
            f"block {index} is {type(block).__name__} with attention {type(getattr(block, 'attn', None)).__name__}; "
            "fastkd supports timm VisionTransformer models built from timm Block + Attention"
        )


def vit_block_forward(block: Block, x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(block(x), q, k)`` with attention through ``backend``; ``q, k`` are ``[B, H, N, d]``."""
    attn, h = block.attn, block.norm1(x)
    B, N, _ = h.shape
    q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = attention(q, k, v, backend=backend, scale=attn.scale, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(h).sigmoid()
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, q, k
