"""``FeatureAlignLoss`` (layernorm target, smooth-L1 beta 2, mean; forward + backward) against
``feature_align_reference(...).mean()``, eager and ``torch.compile``-d.

Shapes: ViT-S/B/L tokens ``[64, 197, D]``, D = 384 / 768 / 1024. Timed in alternating rounds (best
round median); also peak extra memory and the bytes the fused GPU kernel moves against the unfused
sequence (analytical, the roofline case).

    fastkd bench feature_align [--quick] [--device cpu|cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import torch

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import NUM_TOKENS, OP_COLUMNS, VIT_WIDTHS, compare_variants, grad_step, report_results
from fastkd.losses import FeatureAlignLoss
from fastkd.ops import feature_align_reference


def bytes_moved(M: int, D: int, elem: int) -> dict[str, int]:
    """Bytes of one forward + backward, each tensor read or write counted once. Unfused: layer_norm
    reads t, writes y; smooth_l1 reads s, y, writes the elementwise loss; mean reads it; the backward
    reads s, y, writes grad_s: 9 M*D elements. Fused: the forward reads s, t, writes d loss / d s; the
    backward scales it in place: 5 M*D (3 when the CPU backward skips a scale of exactly one)."""
    return {"eager": 9 * M * D * elem, "fastkd": 5 * M * D * elem}


def reference_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return feature_align_reference(student, teacher, target_norm="layernorm", loss="smooth_l1", beta=2.0).mean()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = bench_parser("feature_align forward + backward benchmark", "ViT-B only, batch 16, no torch.compile column")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parse_bench_args(parser, argv)
    dtype, B = getattr(torch, args.dtype), 16 if args.quick else 64
    variants = {"eager": reference_loss, "fastkd": FeatureAlignLoss()}
    if not args.quick:
        variants["compiled"] = torch.compile(reference_loss)
    records = []
    for model, D in ({"vit_base": VIT_WIDTHS["vit_base"]} if args.quick else VIT_WIDTHS).items():
        student = torch.randn(B, NUM_TOKENS, D, device=args.device, dtype=dtype, requires_grad=True)
        teacher = torch.randn(B, NUM_TOKENS, D, device=args.device, dtype=dtype)
        runs = {name: grad_step(fn, (student,), teacher) for name, fn in variants.items()}
        records += compare_variants({"model": model, "shape": f"{B}x{NUM_TOKENS}x{D}"}, runs, device=args.device,
                                    dtype=dtype, rounds=2 if args.quick else 3, repeats=3 if args.quick else 5,
                                    baseline="eager", moved=bytes_moved(B * NUM_TOKENS, D, student.element_size()))
    report_results("bench_feature_align", records, OP_COLUMNS, f"feature_align forward + backward, {args.dtype}",
                   device=args.device, out_dir=args.out)
    return records


if __name__ == "__main__":
    main()
