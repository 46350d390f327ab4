"""``fastkd.ops.gather_tokens`` (with pos-embed, forward + backward) against ``torch.gather(x +
pos_embed)``, eager and ``torch.compile``-d.

Shapes: ViT-S/B/L widths (D = 384 / 768 / 1024), N = 197, batch 64, keep ratios 0.1 (MOMA) and
0.25 (MAE). Timed in alternating rounds (best round median); also peak extra memory and the bytes the
fused GPU kernels move against the unfused sequence (analytical, the roofline case).

    fastkd bench gather [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import torch

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import NUM_TOKENS, OP_COLUMNS, VIT_WIDTHS, compare_variants, grad_step, report_results
from fastkd.benchmarks.plots import bars_per_problem
from fastkd.kernels.gather_tokens import bwd_batch_groups
from fastkd.ops import gather_tokens, gather_tokens_reference, random_keep

BATCH, KEEP_RATIOS = 64, (0.1, 0.25)
EAGER = "torch.gather(x + pos) eager"


def bytes_moved(B: int, N: int, D: int, K: int, elem: int) -> tuple[int, int]:
    """(fused, unfused) bytes of one forward + backward, each tensor read/write counted once. Unfused:
    ``x + pos`` reads x, pos, writes B*N*D; gather reads and writes B*K*D; backward fills B*N*D zeros,
    scatters B*K*D rows in, reduces B*N*D over the batch for the pos grad. Fused: forward reads B*K*D
    rows of x and of pos, writes B*K*D; backward reads the B*K*D gradient rows, writes grad_x (B*N*D)
    once and the fp32 partial / final pos gradients."""
    rows_kept, rows_all, pos = B * K * D, B * N * D, N * D
    unfused = elem * ((2 * rows_all + pos + 2 * rows_kept) + (rows_all + 2 * rows_kept + rows_all + pos))
    groups = bwd_batch_groups(B, True)[0]  # partial positional-gradient buffers
    fused = elem * (3 * rows_kept + rows_kept + rows_all) + 4 * (2 * groups * pos + pos) + elem * pos
    return fused, unfused


def main(argv: list[str] | None = None) -> list[dict]:
    parser = bench_parser(__doc__, "ViT-B only, fewer repeats, no torch.compile column",
                          rounds_help="alternating timing rounds per variant")
    args = parse_bench_args(parser, argv)
    dtype, B, N = torch.float32, BATCH, NUM_TOKENS
    variants = {EAGER: gather_tokens_reference, "fastkd gather_tokens": gather_tokens}
    if not args.quick:
        variants["torch.gather(x + pos) compiled"] = torch.compile(gather_tokens_reference, dynamic=False)
    records: list[dict] = []
    for model, D in ({"vit_base": VIT_WIDTHS["vit_base"]} if args.quick else VIT_WIDTHS).items():
        for ratio in KEEP_RATIOS:
            K = max(1, round(ratio * N))
            generator = torch.Generator(device=args.device).manual_seed(0)
            x, pos = (torch.randn(*shape, D, device=args.device, dtype=dtype, generator=generator, requires_grad=True)
                      for shape in ((B, N), (1, N)))
            keep, _ = random_keep(B, N, K, generator=generator)
            fused, unfused = bytes_moved(B, N, D, K, x.element_size())
            runs = {name: grad_step(lambda x_, p_, fn=fn: fn(x_, keep, p_), (x, pos)) for name, fn in variants.items()}
            records += compare_variants(
                {"model": model, "shape": f"[{B}, {N}, {D}] keep {K}", "keep_ratio": ratio}, runs,
                device=args.device, dtype=dtype, rounds=args.rounds or (3 if args.quick else 5),
                repeats=5 if args.quick else 10, baseline=EAGER,
                moved={name: fused if name.startswith("fastkd") else unfused for name in runs})
    report_results("bench_gather", records, OP_COLUMNS, "gather_tokens + pos-embed, forward + backward",
                   device=args.device, out_dir=args.out,
                   plot=bars_per_problem(lambda r: f"{r['model']}\nkeep {r['keep_ratio']}", ["median_ms"]))
    return records


if __name__ == "__main__":
    main()
