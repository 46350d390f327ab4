"""Per-size sweep of ``fastkd bench ops``: every fused op against its ``*_reference`` (``ema_``: its
``reference_ops()`` loop), forward + backward (``ema_``: the update), timed in alternating rounds.

Elements: ``feature_align`` student ``[M, 384]``; ``gather_tokens`` ``x [B, 16, 64]`` keeping 4 of 16
tokens with a positional embedding; ``token_relation`` relation-map elements ``B*H*N*N`` (B = 4, H = 3,
d = 32); ``ema_`` four teacher tensors of ``n / 4`` each.
"""

from __future__ import annotations

import math

import torch

from fastkd.benchmarks.common import grad_step, time_alternating
from fastkd.ops import (ema_, feature_align, feature_align_reference, gather_tokens, gather_tokens_reference,
                        random_keep, reference_ops, token_relation, token_relation_reference)
from fastkd.reporting import cpu_info

SIZES = (10**3, 10**4, 10**5, 10**6, 10**7)
QUICK_SIZES = (10**3, 10**4, 10**5, 10**6)
COLUMNS = ["op", "dtype", "elements", "shape", "fused_ms", "reference_ms", "speedup"]


def _feature_align(n: int, dtype: torch.dtype):
    M, D = max(1, round(n / 384)), 384
    s, t = torch.randn(M, D, dtype=dtype, requires_grad=True), torch.randn(M, D, dtype=dtype)
    return f"[{M}, {D}]", M * D, grad_step(feature_align, (s,), t), grad_step(feature_align_reference, (s,), t)


def _gather_tokens(n: int, dtype: torch.dtype):
    B, N, D, K = max(1, round(n / 1024)), 16, 64, 4
    x = torch.randn(B, N, D, dtype=dtype, requires_grad=True)
    pos = torch.randn(1, N, D, dtype=dtype, requires_grad=True)
    keep, _ = random_keep(B, N, K, generator=torch.Generator().manual_seed(0))
    return f"[{B}, {N}, {D}] keep {K}", B * N * D, *(grad_step(lambda x_, p_, fn=fn: fn(x_, keep, p_), (x, pos))
                                                     for fn in (gather_tokens, gather_tokens_reference))


def _token_relation(n: int, dtype: torch.dtype):
    B, H, d = 4, 3, 32
    N = max(2, round(math.sqrt(n / (B * H))))
    q_s, k_s = (torch.randn(B, H, N, d, dtype=dtype, requires_grad=True) for _ in range(2))
    q_t, k_t = (torch.randn(B, H, N, d, dtype=dtype) for _ in range(2))
    return (f"B={B} H={H} N={N} d={d}", B * H * N * N, grad_step(token_relation, (q_s, k_s), q_t, k_t),
            grad_step(token_relation_reference, (q_s, k_s), q_t, k_t))


def _ema(n: int, dtype: torch.dtype):
    size = max(1, n // 4)
    teacher = [torch.randn(size, dtype=dtype) for _ in range(4)]
    student = [torch.randn(size, dtype=dtype) for _ in range(4)]

    def plain():
        with reference_ops():
            ema_(teacher, student, 0.996)

    return f"4 x [{size}]", 4 * size, lambda: ema_(teacher, student, 0.996), plain


CASES = {"feature_align": _feature_align, "gather_tokens": _gather_tokens, "token_relation": _token_relation,
         "ema_": _ema}


def sweep(sizes=SIZES, dtypes=(torch.float32,), ops=tuple(CASES), *, rounds: int = 5,
          budget_s: float = 0.02) -> list[dict]:
    """Per op, dtype and size: ``fused_ms`` / ``reference_ms`` (best round median, each round about
    ``budget_s``) and ``speedup`` = reference / fused."""
    records = []
    for op in ops:
        for dtype in dtypes:
            for n in sizes:
                shape, elements, fused, reference = CASES[op](n, dtype)
                runs = {"fused": fused, "reference": reference}
                once = time_alternating(runs, rounds=1, repeats=1)
                repeats = max(1, min(500, int(budget_s / (max(t["median_ms"] for t in once.values()) / 1e3))))
                best = time_alternating(runs, rounds=rounds, repeats=repeats)
                records.append({
                    "op": op, "dtype": str(dtype).removeprefix("torch."), "elements": elements, "shape": shape,
                    "fused_ms": best["fused"]["median_ms"], "reference_ms": best["reference"]["median_ms"],
                    "speedup": best["reference"]["median_ms"] / best["fused"]["median_ms"], "repeats": repeats,
                })
    return records


def cpu_isa() -> str:
    """The CPU's vector ISA flags, torch's CPU capability and the ISA fastkd._C was built for."""
    from fastkd.ops import build_info

    return (f"vector ISA flags: {' '.join(cpu_info()[1]) or 'unknown'}; torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}; fastkd._C built for {build_info().get('cpu_isa')}")
