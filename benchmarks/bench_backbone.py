"""Backbone forward + backward: fastkd's ViT paths against timm's own ``forward_features``.

Variants, all on the same weights and images, timed side by side in one run (alternating rounds,
best round median kept, so load from other processes hits all variants alike):

- ``timm``: ``model.forward_features`` of the timm model (what a user would otherwise run);
- ``sdpa`` / ``math``: ``Backbone.forward_features`` with each attention backend (``math``
  materialises the attention maps);
- ``sdpa+ckpt``: ``sdpa`` with activation checkpointing of the blocks;
- ``masked 0.25`` / ``masked 0.1``: the masked encoder on 25 % (MAE) / 10 % (MOMA) of the patches
  (``random_keep`` + ``gather_tokens``), blocks on visible tokens only.

Loss: ``tokens.square().mean()``; peak memory = extra memory of one forward + backward.
``speedup`` = timm time / variant time; ``memory_ratio`` = variant peak / timm peak.

    python -m fastkd.benchmarks.bench_backbone [--quick] [--device cpu|cuda] [--model NAME] [--batch B]
"""

from __future__ import annotations

import torch

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import peak_memory_bytes, time_alternating
from fastkd.models import build_backbone
from fastkd.ops import random_keep
from fastkd.reporting import markdown_table, write_results


def _variants(name: str, batch: int, device: str, img_size: int) -> dict:
    torch.manual_seed(0)
    sdpa = build_backbone(name, attention="sdpa", img_size=img_size).to(device)
    others = {
        "math": build_backbone(name, attention="math", img_size=img_size),
        "sdpa+ckpt": build_backbone(name, attention="sdpa", checkpointing=True, img_size=img_size),
    }
    for backbone in others.values():
        backbone.load_state_dict(sdpa.state_dict())
        backbone.to(device)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    n = sdpa.num_patches
    keep_25 = random_keep(batch, n, max(1, n // 4), device=device)[0]
    keep_10 = random_keep(batch, n, max(1, n // 10), device=device)[0]

    def step(forward):
        def run():
            forward().square().mean().backward()
        return run

    return {
        "timm": step(lambda: sdpa.model.forward_features(x)),
        "sdpa": step(lambda: sdpa.forward_features(x).tokens),
        "math": step(lambda: others["math"].forward_features(x).tokens),
        "sdpa+ckpt": step(lambda: others["sdpa+ckpt"].forward_features(x).tokens),
        "masked 0.25": step(lambda: sdpa.forward_features(x, keep=keep_25).tokens),
        "masked 0.1": step(lambda: sdpa.forward_features(x, keep=keep_10).tokens),
    }


def main(argv=None) -> None:
    parser = bench_parser(__doc__.splitlines()[0], "ViT-S at 64 px, batch 2, one repeat")
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=None)
    args = parse_bench_args(parser, argv)
    if args.batch is not None and args.batch <= 0:
        raise ValueError(f"--batch must be positive, got {args.batch}")
    img_size, batch, repeats, rounds = (64, 2, 1, 2) if args.quick else (224, 8, 3, 2)
    if args.device == "cuda":
        batch = 64
    batch = args.batch or batch
    variants = _variants(args.model, batch, args.device, img_size)
    best = time_alternating(variants, rounds=rounds, repeats=repeats, device=args.device)
    peaks = {label: peak_memory_bytes(fn, device=args.device) for label, fn in variants.items()}
    records = [
        {
            "variant": label, "model": args.model, "img_size": img_size, "batch": batch, "device": args.device,
            "median_ms": best[label]["median_ms"], "p10_ms": best[label]["p10_ms"], "p90_ms": best[label]["p90_ms"],
            "peak_MiB": peaks[label] / 2**20,
            "speedup": best["timm"]["median_ms"] / best[label]["median_ms"],
            "memory_ratio": peaks[label] / peaks["timm"],
        }
        for label in variants
    ]
    markdown = (
        f"## Backbone forward + backward ({args.model}, {img_size} px, batch {batch}, {args.device})\n\n"
        + markdown_table(records, ["variant", "median_ms", "peak_MiB", "speedup", "memory_ratio"])
        + "\n\nspeedup = timm forward_features time / variant time; memory_ratio = variant peak / timm peak."
    )
    write_results("bench_backbone", records, markdown, out_dir=args.out)
    print(markdown)


if __name__ == "__main__":
    main()
