"""Benchmark ``fastkd.ops.gather_tokens`` (with pos-embed, forward + backward) against
``torch.gather(x + pos_embed)`` in eager mode and the same compiled with ``torch.compile``.

Shapes: ViT-S/B/L token widths (D = 384 / 768 / 1024), N = 197 tokens, batch 64, keep ratios
0.1 (MOMA's masked student) and 0.25 (MAE). ``--quick`` runs ViT-B only with fewer repeats and
without the ``torch.compile`` column. Each variant is timed in several alternating rounds
(``time_alternating``) and the best round median is kept, so that load from other processes on a
shared machine hits all variants alike. Also reported: peak extra memory of one forward + backward,
and the bytes the fused GPU kernels move against the unfused sequence (analytical, the roofline case).

    python -m fastkd.benchmarks.bench_gather [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import peak_memory_bytes, report_results, time_alternating
from fastkd.kernels.gather_tokens import bwd_batch_groups
from fastkd.ops import gather_tokens, gather_tokens_reference, random_keep

MODELS = {"vit_small": 384, "vit_base": 768, "vit_large": 1024}
NUM_TOKENS = 197
BATCH = 64
KEEP_RATIOS = (0.1, 0.25)


def bytes_moved(B: int, N: int, D: int, K: int, elem: int) -> tuple[int, int]:
    """(fused, unfused) bytes of one forward + backward, counting each tensor read/write once.

    Unfused: ``x + pos`` reads x and pos, writes B*N*D; gather reads and writes B*K*D; backward
    fills B*N*D zeros, scatters B*K*D rows in, and reduces B*N*D over the batch for the pos grad.
    Fused: forward reads B*K*D rows of x and of pos and writes B*K*D; backward reads the B*K*D
    gradient rows, writes grad_x (B*N*D) once and the fp32 partial / final pos gradients.
    """
    rows_kept, rows_all, pos = B * K * D, B * N * D, N * D
    unfused = elem * ((2 * rows_all + pos + 2 * rows_kept) + (rows_all + 2 * rows_kept + rows_all + pos))
    groups = bwd_batch_groups(B, True)[0]  # partial positional-gradient buffers
    fused = elem * (3 * rows_kept + rows_kept + rows_all) + 4 * (2 * groups * pos + pos) + elem * pos
    return fused, unfused


def _fwd_bwd(fn, x, keep, pos, grad):
    def run():
        out = fn(x, keep, pos)
        torch.autograd.grad(out, (x, pos), grad)

    return run


def main(argv: list[str] | None = None) -> list[dict]:
    parser = bench_parser(__doc__, "ViT-B only, fewer repeats, no torch.compile column",
                          rounds_help="alternating timing rounds per variant")
    args = parse_bench_args(parser, argv)
    rounds = args.rounds or (3 if args.quick else 5)
    repeats = 5 if args.quick else 10
    models = {"vit_base": MODELS["vit_base"]} if args.quick else MODELS
    dtype = torch.float32
    elem = torch.finfo(dtype).bits // 8

    records: list[dict] = []
    for model, D in models.items():
        for ratio in KEEP_RATIOS:
            B, N = BATCH, NUM_TOKENS
            K = max(1, round(ratio * N))
            generator = torch.Generator(device=args.device).manual_seed(0)
            x = torch.randn(B, N, D, device=args.device, dtype=dtype, generator=generator, requires_grad=True)
            pos = torch.randn(1, N, D, device=args.device, dtype=dtype, generator=generator, requires_grad=True)
            keep, _ = random_keep(B, N, K, generator=generator)
            grad = torch.randn(B, K, D, device=args.device, dtype=dtype, generator=generator)
            variants = {"torch.gather(x + pos) eager": gather_tokens_reference, "fastkd gather_tokens": gather_tokens}
            if not args.quick:
                variants["torch.gather(x + pos) compiled"] = torch.compile(gather_tokens_reference, dynamic=False)
            runs = {name: _fwd_bwd(fn, x, keep, pos, grad) for name, fn in variants.items()}
            timings = time_alternating(runs, rounds=rounds, repeats=repeats, device=args.device)
            fused, unfused = bytes_moved(B, N, D, K, elem)
            eager_ms = timings["torch.gather(x + pos) eager"]["median_ms"]
            for name, run in runs.items():
                is_fused = name.startswith("fastkd")
                records.append(
                    {
                        "model": model,
                        "shape": f"[{B}, {N}, {D}] keep {K}",
                        "keep_ratio": ratio,
                        "variant": name,
                        "median_ms": timings[name]["median_ms"],
                        "p10_ms": timings[name]["p10_ms"],
                        "p90_ms": timings[name]["p90_ms"],
                        "speedup_vs_eager": eager_ms / timings[name]["median_ms"],
                        "peak_MiB": peak_memory_bytes(run, device=args.device) / 2**20,
                        "bytes_moved_MiB": (fused if is_fused else unfused) / 2**20,
                        "device": args.device,
                        "dtype": str(dtype).removeprefix("torch."),
                    }
                )
    columns = [
        "model", "shape", "variant", "median_ms", "p10_ms", "p90_ms", "speedup_vs_eager", "peak_MiB",
        "bytes_moved_MiB",
    ]  # fmt: skip
    report_results("bench_gather", records, columns, "gather_tokens + pos-embed, forward + backward",
                   device=args.device, out_dir=args.out, plot=_plot)
    return records


def _plot(records: list[dict], path: Path) -> None:
    """Bar chart of forward + backward time per configuration and variant (``bench_gather.png``)."""
    from fastkd.benchmarks.plots import save_grouped_bars

    def config(r):
        return f"{r['model']}\nkeep {r['keep_ratio']}"

    configs = list(dict.fromkeys(config(r) for r in records))
    times = {}
    for r in records:
        times.setdefault(r["variant"], {})[config(r)] = r["median_ms"]
    series = {variant: [values[c] for c in configs] for variant, values in times.items()}
    save_grouped_bars(path, configs, [("forward + backward, median ms", series)])


if __name__ == "__main__":
    main()
