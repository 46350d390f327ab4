"""EMA teacher update over the parameter sets of timm ViT-S/16, ViT-B/16, ViT-L/16.

Variants, in place on the same teacher lists: fastkd ``ema_`` (fp32 student, with gap statistics,
bf16 student); a Python ``mul_``/``add_`` loop (many SSL codebases); ``torch._foreach_lerp_`` (timm
ModelEmaV3); the same plus a separate gap pass (fp32 foreach norms: ``||s - t||^2``, ``||t||^2``,
``||s||^2``, ``<s, t>`` by polarisation); a bf16 student cast to fp32, then ``_foreach_lerp_``; and
``lerp_`` over one flat buffer of the same size, the bandwidth ceiling. Columns: median ms, ``GB_s``
of the useful update (12 bytes per fp32 parameter, 10 with a bf16 student), ``of_ceiling`` (of the
flat ``lerp_``'s), ``speedup`` against the matching unfused ``baseline``, ``bytes_moved_MiB``.

    fastkd bench ema [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import timm
import torch

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import compare_variants, report_results
from fastkd.ops import build_info, ema_

MODELS = {"ViT-S/16": "vit_small_patch16_224", "ViT-B/16": "vit_base_patch16_224", "ViT-L/16": "vit_large_patch16_224"}
MOMENTUM = 0.996
CEILING = "flat lerp_ (ceiling)"
COLUMNS = ["model", "params_M", "tensors", "variant", "median_ms", "p10_ms", "p90_ms", "GB_s", "of_ceiling",
           "bytes_moved_MiB", "speedup", "baseline"]


def separate_gap(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[float]:
    """What a user writes without the fused op: a second pass of fp32 foreach reductions."""
    diff_sq = sum(n.item() ** 2 for n in torch._foreach_norm(torch._foreach_sub(student, teacher)))
    t_sq = sum(n.item() ** 2 for n in torch._foreach_norm(teacher))
    s_sq = sum(n.item() ** 2 for n in torch._foreach_norm(student))
    return [diff_sq, 0.5 * (t_sq + s_sq - diff_sq), t_sq, s_sq]


def mul_add_loop(teacher, student, momentum):
    for t, s in zip(teacher, student):
        t.mul_(momentum).add_(s, alpha=1.0 - momentum)


def bench_model(label: str, timm_name: str, device: str, repeats: int) -> list[dict]:
    with torch.device("meta"):
        shapes = [p.shape for p in timm.create_model(timm_name, pretrained=False).parameters()]
    numel = sum(s.numel() for s in shapes)
    teacher, student = ([torch.randn(s, device=device) for s in shapes] for _ in range(2))
    student_bf16 = [s.to(torch.bfloat16) for s in student]
    flat_t, flat_s = torch.randn(numel, device=device), torch.randn(numel, device=device)
    w, f32, bf16 = 1.0 - MOMENTUM, 12 * numel, 10 * numel
    # name: (fn, bytes moved, bytes of the useful update, the baseline of its speed-up)
    variants = {
        CEILING: (lambda: flat_t.lerp_(flat_s, w), f32, f32, CEILING),
        "torch._foreach_lerp_": (lambda: torch._foreach_lerp_(teacher, student, w), f32, f32, None),
        "mul_/add_ loop": (lambda: mul_add_loop(teacher, student, MOMENTUM), 2 * f32 - 4 * numel, f32, None),
        "fastkd ema_": (lambda: ema_(teacher, student, MOMENTUM), f32, f32, "torch._foreach_lerp_"),
        "foreach + separate gap": (lambda: (separate_gap(teacher, student), torch._foreach_lerp_(teacher, student, w)),
                                   3 * f32, f32, None),
        "fastkd ema_ + gap": (lambda: ema_(teacher, student, MOMENTUM, return_gap=True), f32, f32,
                              "foreach + separate gap"),
        "bf16 cast + foreach": (lambda: torch._foreach_lerp_(teacher, [s.float() for s in student_bf16], w),
                                6 * numel + f32, bf16, None),
        "fastkd ema_ bf16 student": (lambda: ema_(teacher, student_bf16, MOMENTUM), bf16, bf16, "bf16 cast + foreach"),
    }
    rows = compare_variants({"model": label, "params_M": numel / 1e6, "tensors": len(shapes)},
                            {name: v[0] for name, v in variants.items()}, device=device, dtype=torch.float32,
                            rounds=1, repeats=repeats, baseline={name: v[3] or name for name, v in variants.items()},
                            moved={name: v[1] for name, v in variants.items()}, memory=False)
    for row in rows:
        row["GB_s"] = variants[row["variant"]][2] / row["median_ms"] / 1e6
        row["of_ceiling"] = row["GB_s"] / rows[0]["GB_s"]
    return rows


def main(argv=None) -> list[dict]:
    args = parse_bench_args(bench_parser(__doc__.splitlines()[0], "ViT-S and ViT-B only, fewer repeats"), argv)
    records = []
    for label in ["ViT-S/16", "ViT-B/16"] if args.quick else list(MODELS):
        records += bench_model(label, MODELS[label], args.device, 5 if args.quick else 10)
    info = build_info()
    report_results("bench_ema", records, COLUMNS, f"EMA update, momentum {MOMENTUM}, fastkd._C built: "
                   f"{info['built']}, CPU ISA: {info.get('cpu_isa')}", device=args.device, out_dir=args.out)
    return records


if __name__ == "__main__":
    main()
