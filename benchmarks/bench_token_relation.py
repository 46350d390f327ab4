"""``fastkd.ops.token_relation`` (forward + backward) against ``token_relation_reference``
(``log_softmax`` of full ``[B, H, N, N]`` maps and ``F.kl_div``), eager and ``torch.compile``-d.

Shapes (:data:`CASES`, d = 64): the end-to-end benchmark's small N (ViT-Ti H = 3 at N = 17 and 65,
ViT-S at 197, batch 64), ViT-S/B/L (H = 6 / 12 / 16) at N = 197, batch 32, and ViT-B at N = 1025,
batch 4. Timed in alternating rounds (best round median). Peak memory: beyond inputs and the two
gradients ``dq_s, dk_s``. Model of the fused GPU kernels against the unfused sequence (the roofline case):

- FLOPs: a ``QK^T`` tile product costs ``2 N^2 d`` per head. Reference: forward ``s, t`` (2), backward
  ``dq, dk`` (2) -> ``8 B H N^2 d``. Fused: forward 2, the dq and dk passes each recompute ``s, t`` (4)
  plus ``dq, dk`` (2) -> ``16 B H N^2 d``.
- Bytes: fused reads each ``[B, H, N, d]`` input once per program that needs it (k re-read by every
  query block: ``ceil(N / 64)`` times) and writes/reads ``O(B H N)`` statistics; unfused moves fp32
  ``[B, H, N, N]`` maps: 10 passes forward, ~8 backward.

    fastkd bench token_relation [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import math

import torch

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import OP_COLUMNS, compare_variants, grad_step, report_results
from fastkd.benchmarks.plots import bars_per_problem
from fastkd.ops import token_relation, token_relation_reference

HEAD_DIM = 64
CASES = [  # label, heads, tokens, batch, quick batch
    ("ViT-Ti N=17", 3, 17, 64, 64), ("ViT-Ti N=65", 3, 65, 64, 64), ("ViT-S B=64", 6, 197, 64, 64),
    ("ViT-S", 6, 197, 32, 8), ("ViT-B", 12, 197, 32, 8), ("ViT-L", 16, 197, 32, 8), ("ViT-B long", 12, 1025, 4, 1),
]
UNFUSED_MAP_PASSES = 18
FUSED_BLOCK = 64
EAGER = "reference eager"
COLUMNS = ["case", *OP_COLUMNS[1:], "gflops_model"]


def bytes_moved(B: int, H: int, N: int, d: int, elem: int) -> tuple[int, int]:
    """(fused, unfused) bytes of one forward + backward (module docstring; 3 statistics vectors
    written, 4 read by each backward pass)."""
    tensor = B * H * N * d * elem
    per_pass = (2 + 2 * math.ceil(N / FUSED_BLOCK)) * tensor
    stats = 4 * B * H * N
    fused = 3 * per_pass + 2 * tensor + 11 * stats
    unfused = 6 * tensor + UNFUSED_MAP_PASSES * 4 * B * H * N * N
    return fused, unfused


def flops(B: int, H: int, N: int, d: int) -> tuple[int, int]:
    """(fused, unfused) matmul FLOPs of one forward + backward."""
    tile = 2 * B * H * N * N * d
    return 8 * tile, 4 * tile


def main(argv: list[str] | None = None) -> list[dict]:
    parser = bench_parser(__doc__, "smaller batches, fewer repeats, no torch.compile column",
                          rounds_help="alternating timing rounds per variant")
    args = parse_bench_args(parser, argv)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    variants = {EAGER: token_relation_reference, "fastkd token_relation": token_relation}
    if not args.quick:
        variants["reference compiled"] = torch.compile(token_relation_reference, dynamic=False)
    records: list[dict] = []
    for label, H, N, batch, quick_batch in CASES:
        B = quick_batch if args.quick else batch
        generator = torch.Generator(device=args.device).manual_seed(0)
        q_s, k_s, q_t, k_t = (torch.randn(B, H, N, HEAD_DIM, device=args.device, dtype=dtype, generator=generator)
                              for _ in range(4))
        q_s.requires_grad_(True)
        k_s.requires_grad_(True)
        runs = {name: grad_step(fn, (q_s, k_s), q_t, k_t) for name, fn in variants.items()}
        fused, unfused = bytes_moved(B, H, N, HEAD_DIM, q_s.element_size())
        fused_flops, unfused_flops = flops(B, H, N, HEAD_DIM)
        rows = compare_variants({"case": label, "shape": f"B={B} H={H} N={N} d={HEAD_DIM}"}, runs, device=args.device,
                                dtype=dtype, rounds=args.rounds or (2 if args.quick else 3),
                                repeats=3 if args.quick else 5, baseline=EAGER,
                                moved={name: fused if name.startswith("fastkd") else unfused for name in runs},
                                memory_offset=2 * q_s.numel() * q_s.element_size())
        for row in rows:
            row["gflops_model"] = (fused_flops if row["variant"].startswith("fastkd") else unfused_flops) / 1e9
        records += rows
    report_results("bench_token_relation", records, COLUMNS, "token_relation, forward + backward",
                   device=args.device, out_dir=args.out, plot=bars_per_problem(lambda r: r["case"],
                                                                               ["median_ms", "peak_MiB"]))
    return records


if __name__ == "__main__":
    main()
