"""Benchmark ``fastkd.ops.token_relation`` (forward + backward) against the materialised reference
``token_relation_reference`` (``log_softmax`` of full ``[B, H, N, N]`` maps and ``F.kl_div``), eager
and compiled with ``torch.compile``, side by side in one run.

Shapes: the small-N shapes of the end-to-end benchmark (ViT-Ti heads H=3 with N = 17 and 65, and
ViT-S at N = 197, batch 64: per-op overhead matters most there), ViT-S (H=6), ViT-B (H=12), ViT-L
(H=16) with N = 197, d = 64, batch 32, and a long sequence case (ViT-B heads, N = 1025, batch 4).
``--quick`` keeps the batch-64 cases, runs the others at batch 8 and the long case at batch 1,
without the ``torch.compile`` column. Each variant is timed in several alternating
rounds and the best round median is kept (other processes on a shared machine hit all alike).

Reported per variant: median / p10 / p90 ms, time ratio to the eager reference, peak extra memory
of one forward + backward *beyond inputs and gradients* (the two gradients ``dq_s, dk_s`` are
subtracted; both variants allocate them), its ratio to the reference, and a bytes / FLOPs model
of the fused GPU kernels against the unfused sequence (analytical, the roofline case):

- FLOPs: a ``QK^T`` tile product costs ``2 N^2 d`` per head. Reference: forward ``s, t`` (2), backward
  ``dq, dk`` (2) -> ``8 B H N^2 d``. Fused: forward 2, the dq and dk passes each recompute ``s, t`` (4)
  plus ``dq, dk`` (2) -> ``16 B H N^2 d`` (+ ``G`` teacher heads when head-mapped).
- Bytes: fused reads each ``[B, H, N, d]`` input once per program that needs it (k re-read by every
  query block: ``ceil(N / 64)`` times) and writes/reads ``O(B H N)`` statistics. Unfused moves fp32
  ``[B, H, N, N]`` maps: forward writes s, t, reads them and writes both log-softmaxes, kl_div
  reads 2 and writes 1 map, the row sum reads 1 (10 passes); backward ~8 more passes.

    python -m fastkd.benchmarks.bench_token_relation [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import peak_memory_bytes, report_results, time_alternating
from fastkd.ops import token_relation, token_relation_reference

HEAD_DIM = 64
CASES = [  # label, heads, tokens, batch, quick batch
    ("ViT-Ti N=17", 3, 17, 64, 64),
    ("ViT-Ti N=65", 3, 65, 64, 64),
    ("ViT-S B=64", 6, 197, 64, 64),
    ("ViT-S", 6, 197, 32, 8),
    ("ViT-B", 12, 197, 32, 8),
    ("ViT-L", 16, 197, 32, 8),
    ("ViT-B long", 12, 1025, 4, 1),
]
UNFUSED_MAP_PASSES = 18
FUSED_BLOCK = 64


def bytes_moved(B: int, H: int, N: int, d: int, elem: int) -> tuple[int, int]:
    """(fused, unfused) bytes of one forward + backward (see module docstring)."""
    tensor = B * H * N * d * elem
    reread = math.ceil(N / FUSED_BLOCK)
    stats = 4 * B * H * N
    # forward: q_s, q_t once, k_s, k_t per query block; writes kl, lse_s, lse_t.
    # backward: dq pass like forward + writes dq; dk pass reads q_s, q_t per key block + writes dk;
    # both read 4 stats vectors.
    fused = (2 + 2 * reread) * tensor + 3 * stats
    fused += (2 + 2 * reread) * tensor + tensor + 4 * stats
    fused += (2 + 2 * reread) * tensor + tensor + 4 * stats
    unfused = 4 * tensor + UNFUSED_MAP_PASSES * 4 * B * H * N * N + 2 * tensor
    return fused, unfused


def flops(B: int, H: int, N: int, d: int) -> tuple[int, int]:
    """(fused, unfused) matmul FLOPs of one forward + backward."""
    tile = 2 * B * H * N * N * d
    return 8 * tile, 4 * tile


def _fwd_bwd(fn, q_s, k_s, q_t, k_t):
    def run():
        torch.autograd.grad(fn(q_s, k_s, q_t, k_t).mean(), (q_s, k_s))

    return run


def main(argv: list[str] | None = None) -> list[dict]:
    parser = bench_parser(__doc__, "smaller batches, fewer repeats, no torch.compile column",
                          rounds_help="alternating timing rounds per variant")
    args = parse_bench_args(parser, argv)
    rounds = args.rounds or (2 if args.quick else 3)
    repeats = 3 if args.quick else 5
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    elem = torch.finfo(dtype).bits // 8

    records: list[dict] = []
    for label, H, N, batch, quick_batch in CASES:
        B = quick_batch if args.quick else batch
        generator = torch.Generator(device=args.device).manual_seed(0)
        q_s, k_s, q_t, k_t = (
            torch.randn(B, H, N, HEAD_DIM, device=args.device, dtype=dtype, generator=generator) for _ in range(4)
        )
        q_s.requires_grad_(True)
        k_s.requires_grad_(True)
        variants = {"reference eager": token_relation_reference, "fastkd token_relation": token_relation}
        if not args.quick:
            variants["reference compiled"] = torch.compile(token_relation_reference, dynamic=False)
        runs = {name: _fwd_bwd(fn, q_s, k_s, q_t, k_t) for name, fn in variants.items()}
        timings = time_alternating(runs, rounds=rounds, repeats=repeats, device=args.device)
        grad_bytes = 2 * q_s.numel() * elem
        memory = {name: peak_memory_bytes(run, device=args.device) - grad_bytes for name, run in runs.items()}
        fused_bytes, unfused_bytes = bytes_moved(B, H, N, HEAD_DIM, elem)
        fused_flops, unfused_flops = flops(B, H, N, HEAD_DIM)
        ref_ms, ref_mem = timings["reference eager"]["median_ms"], memory["reference eager"]
        for name in runs:
            is_fused = name.startswith("fastkd")
            records.append(
                {
                    "case": label,
                    "shape": f"B={B} H={H} N={N} d={HEAD_DIM}",
                    "variant": name,
                    "median_ms": timings[name]["median_ms"],
                    "p10_ms": timings[name]["p10_ms"],
                    "p90_ms": timings[name]["p90_ms"],
                    "time_vs_ref": timings[name]["median_ms"] / ref_ms,
                    "peak_MiB": memory[name] / 2**20,
                    "mem_vs_ref": memory[name] / ref_mem,
                    "bytes_moved_MiB": (fused_bytes if is_fused else unfused_bytes) / 2**20,
                    "gflops_model": (fused_flops if is_fused else unfused_flops) / 1e9,
                    "device": args.device,
                    "dtype": str(dtype).removeprefix("torch."),
                }
            )
    columns = [
        "case", "shape", "variant", "median_ms", "p10_ms", "p90_ms", "time_vs_ref", "peak_MiB", "mem_vs_ref",
        "bytes_moved_MiB", "gflops_model",
    ]  # fmt: skip
    report_results("bench_token_relation", records, columns, "token_relation, forward + backward",
                   device=args.device, out_dir=args.out, plot=_plot)
    return records


def _plot(records: list[dict], path: Path) -> None:
    """Time and extra memory per case and variant (``bench_token_relation.png``)."""
    from fastkd.benchmarks.plots import save_grouped_bars

    cases = list(dict.fromkeys(r["case"] for r in records))
    panels = []
    for key, ylabel in (("median_ms", "forward + backward, median ms"), ("peak_MiB", "peak extra memory, MiB")):
        values = {}
        for r in records:
            values.setdefault(r["variant"], {})[r["case"]] = r[key]
        panels.append((ylabel, {variant: [v[c] for c in cases] for variant, v in values.items()}))
    save_grouped_bars(path, cases, panels)


if __name__ == "__main__":
    main()
