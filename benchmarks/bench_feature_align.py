"""Benchmark ``FeatureAlignLoss`` (layernorm target, smooth-L1 beta 2, mean; forward + backward)
against the plain PyTorch sequence (``feature_align_reference(...).mean()``) in eager mode and the
same compiled with ``torch.compile``.

Shapes: ViT-S/B/L tokens ``[B, 197, D]`` with D = 384 / 768 / 1024, batch 64 (``--quick``: ViT-B
only, batch 16, no ``torch.compile`` column). Each variant is timed in alternating rounds and the
best round median is kept, so load from other processes on a shared machine hits all variants
alike. Also reported: peak extra memory of one forward + backward and the bytes moved by the fused
kernel against the unfused sequence (analytical: the GPU roofline case).

    python -m fastkd.benchmarks.bench_feature_align [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import torch

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import peak_memory_bytes, time_alternating
from fastkd.losses import FeatureAlignLoss
from fastkd.ops import feature_align_reference
from fastkd.reporting import markdown_table, write_results

MODELS = {"vit_small": 384, "vit_base": 768, "vit_large": 1024}
NUM_TOKENS = 197
COLUMNS = ["model", "shape", "variant", "median_ms", "p10_ms", "p90_ms", "speedup_vs_eager",
           "speedup_vs_compiled", "peak_MiB", "mem_vs_eager", "bytes_moved_MiB"]


def bytes_moved(M: int, D: int, elem: int) -> dict[str, int]:
    """Bytes of one forward + backward, counting each tensor read or write once.

    Unfused: layer_norm reads t, writes y; smooth_l1 reads s and y, writes the elementwise loss;
    mean reads it; the backward reads s and y and writes grad_s: 9 M*D elements. Fused: the
    forward reads s and t and writes d loss / d s; the backward scales it in place (read + write):
    5 M*D elements (3 when the CPU backward skips a scale of exactly one).
    """
    return {"eager": 9 * M * D * elem, "fastkd": 5 * M * D * elem}


def reference_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return feature_align_reference(student, teacher, target_norm="layernorm", loss="smooth_l1", beta=2.0).mean()


def fwd_bwd(loss_fn, student: torch.Tensor, teacher: torch.Tensor):
    def run():
        return torch.autograd.grad(loss_fn(student, teacher), student)

    return run


def bench_shape(model: str, B: int, D: int, *, device: str, dtype: torch.dtype, compiled: bool, rounds: int,
                repeats: int) -> list[dict]:
    student = torch.randn(B, NUM_TOKENS, D, device=device, dtype=dtype, requires_grad=True)
    teacher = torch.randn(B, NUM_TOKENS, D, device=device, dtype=dtype)
    variants = {"eager": reference_loss, "fastkd": FeatureAlignLoss()}
    if compiled:
        variants["compiled"] = torch.compile(reference_loss)
    runs = {name: fwd_bwd(fn, student, teacher) for name, fn in variants.items()}
    for run in runs.values():
        run()  # warm-up (and compile)
    best = time_alternating(runs, rounds=rounds, repeats=repeats, device=device)
    moved = bytes_moved(B * NUM_TOKENS, D, student.element_size())
    eager_mem = peak_memory_bytes(runs["eager"], device=device)
    rows = []
    for name, run in runs.items():
        mem = eager_mem if name == "eager" else peak_memory_bytes(run, device=device)
        rows.append({
            "model": model,
            "shape": f"{B}x{NUM_TOKENS}x{D}",
            "variant": name,
            **{k: best[name][k] for k in ("median_ms", "p10_ms", "p90_ms")},
            "speedup_vs_eager": best["eager"]["median_ms"] / best[name]["median_ms"],
            "speedup_vs_compiled": best["compiled"]["median_ms"] / best[name]["median_ms"] if compiled else None,
            "peak_MiB": mem / 2**20,
            "mem_vs_eager": mem / eager_mem,
            "bytes_moved_MiB": moved[name] / 2**20 if name in moved else None,
        })
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = bench_parser("feature_align forward + backward benchmark", "ViT-B only, batch 16, no torch.compile column")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parse_bench_args(parser, argv)
    models = {"vit_base": MODELS["vit_base"]} if args.quick else MODELS
    batch = 16 if args.quick else 64
    records = []
    for model, D in models.items():
        records += bench_shape(model, batch, D, device=args.device, dtype=getattr(torch, args.dtype),
                               compiled=not args.quick, rounds=2 if args.quick else 3, repeats=3 if args.quick else 5)
    table = markdown_table(records, COLUMNS)
    print(table)
    write_results("bench_feature_align", records, f"# feature_align fwd+bwd ({args.device}, {args.dtype})\n\n{table}",
                  out_dir=args.out)
    return records


if __name__ == "__main__":
    main()
