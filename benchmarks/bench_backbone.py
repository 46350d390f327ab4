"""Backbone forward + backward: fastkd's ViT paths against timm's own ``forward_features``.

Variants, on the same weights and images, timed in alternating rounds (best round median):

- ``timm``: ``model.forward_features`` of the timm model (what a user would otherwise run);
- ``sdpa`` / ``math``: ``Backbone.forward_features`` with each attention backend (``math``
  materialises the attention maps);
- ``sdpa+ckpt``: ``sdpa`` with activation checkpointing of the blocks;
- ``masked 0.25`` / ``masked 0.1``: the masked encoder on 25 % (MAE) / 10 % (MOMA) of the patches
  (``random_keep`` + ``gather_tokens``), blocks on visible tokens only.

Loss: ``tokens.square().mean()``; peak memory = extra memory of one forward + backward.
``speedup`` = timm time / variant time; ``memory_ratio`` = variant peak / timm peak.

    fastkd bench backbone [--quick] [--device cpu|cuda] [--model NAME] [--batch B]
"""

from __future__ import annotations

import torch

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import compare_variants, report_results
from fastkd.models import build_backbone
from fastkd.ops import random_keep


def _variants(name: str, batch: int, device: str, img_size: int) -> dict:
    torch.manual_seed(0)
    sdpa = build_backbone(name, attention="sdpa", img_size=img_size).to(device)
    others = {label: build_backbone(name, attention=attention, checkpointing=ckpt, img_size=img_size)
              for label, attention, ckpt in (("math", "math", False), ("sdpa+ckpt", "sdpa", True))}
    for backbone in others.values():
        backbone.load_state_dict(sdpa.state_dict())
        backbone.to(device)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    n = sdpa.num_patches
    keep_25 = random_keep(batch, n, max(1, n // 4), device=device)[0]
    keep_10 = random_keep(batch, n, max(1, n // 10), device=device)[0]

    def step(forward):
        return lambda: forward().square().mean().backward()

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
    img_size, batch, repeats = (64, 2, 1) if args.quick else (224, 8, 3)
    batch = args.batch or (64 if args.device == "cuda" else batch)
    records = compare_variants({"model": args.model, "img_size": img_size, "batch": batch},
                               _variants(args.model, batch, args.device, img_size), device=args.device,
                               dtype=torch.float32, rounds=2, repeats=repeats, baseline="timm")
    report_results("bench_backbone", records, ["variant", "median_ms", "peak_MiB", "speedup", "memory_ratio"],
                   f"Backbone forward + backward ({args.model}, {img_size} px, batch {batch}); speedup = timm "
                   "forward_features time / variant time, memory_ratio = variant peak / timm peak",
                   device=args.device, out_dir=args.out)


if __name__ == "__main__":
    main()
