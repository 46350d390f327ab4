"""End-to-end training throughput per method: fastkd's fused ops against the same method assembled
from plain PyTorch parts, side by side in one run.

For each method (``moma``, ``hybrid_distill``, ``resmoco``, ``mokd``) two copies are built from the
same seed (same weights) with ``fastkd.methods.build_method`` and trained on the same synthetic
batch (random images of the shapes of the method's data recipe; data loading is timed by
``bench_data``). The *plain* copy runs every step inside ``fastkd.ops.reference_mode.reference_ops()``,
so ``feature_align`` is an unfused normalise + loss, ``token_relation`` works on materialised
attention maps, ``gather_tokens`` is ``torch.gather`` and ``ema_`` a Python loop. One training step::

    out = method(batch)                      # bf16 autocast on CUDA, fp32 on CPU
    optimiser.zero_grad(set_to_none=True); out["loss"].backward(); optimiser.step()   # AdamW
    method.after_step(step, total_steps)

Models: a ViT-Tiny-like student (embed 192, depth 4, 3 heads, 64 px, patch 8 -> 64 patches) and
frozen teachers of the same shape (random weights: throughput does not depend on them); MOKD pairs
it with a narrower ViT (embed 96). Batch 64 (``--quick``: batch 8 at 32 px, one round). The
variants are timed in 5 alternating rounds of 3 steps (after one warm-up step each), the round
with the lowest median kept (load from other processes hits both alike).

Per method and variant: steps/s and images/s (batch / step time), median / p10 / p90 step time,
peak memory of one step, ``speedup`` = plain time / variant time, ``memory_ratio`` = variant peak /
plain peak, the model FLOPs of a step (``FlopCounterMode`` on the plain copy, where every op is a
countable aten op) and the achieved GFLOP/s (on CUDA also against the device's bf16 peak; on CPU
"needs a GPU"), ``fused_ops_share`` = share of the profiled step's wall time spent inside fastkd's
ops (the ceiling on what fusing them can save), ``top_ops`` = the five ops with the most self
time (CPU time on CPU, kernel time on CUDA), and ``fused_ops_called``: fastkd ops seen in the step's profile (must be empty
for the plain copy, else the reference switch is not wired into that op).

    python -m fastkd.benchmarks.bench_e2e [--quick] [--device cpu|cuda] [--methods moma ...] [--batch B]
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from fastkd.benchmarks.common import (RESULTS_DIR, bench_parser, markdown_table, parse_bench_args, peak_memory_bytes,
                                      time_fn, write_results)
from fastkd.benchmarks.gpu_peak import fraction_of_peak, gpu_peak
from fastkd.benchmarks.plots import save_grouped_bars
from fastkd.data.batch import Batch
from fastkd.data.recipes import build_recipe
from fastkd.methods import build_method
from fastkd.models import build_backbone, save_backbone
from fastkd.ops.reference_mode import reference_ops

METHODS = ("moma", "hybrid_distill", "resmoco", "mokd")
# Required speedup of fastkd over the plain assembly; hybrid_distill must also use less peak memory.
TARGET_SPEEDUP = {"moma": 1.1, "hybrid_distill": 1.3, "resmoco": 1.1, "mokd": 1.1}
LOWER_MEMORY_REQUIRED = ("hybrid_distill",)
FUSED_OPS = ("feature_align", "token_relation", "gather_tokens", "ema_")
VARIANTS = ("plain", "fastkd")
VIT = "vit_tiny_patch16_224"
IMG_SIZE = 64
HYBRID_KEEP_RATIO = 0.7  # the last (longest) stage of Hybrid Distill's default keep schedule
TOTAL_STEPS = 1000
TOP_OPS = 5


def vit_kwargs(img_size: int, embed_dim: int = 192) -> dict:
    """The benchmark's tiny ViT: patch 8, depth 4, 3 heads."""
    return dict(img_size=img_size, patch_size=8, embed_dim=embed_dim, depth=4, num_heads=3)


def write_teachers(root: Path, img_size: int) -> dict[str, str]:
    """Two randomly initialised tiny-ViT teachers in fastkd's checkpoint format; name -> path."""
    paths = {}
    for seed, name in enumerate(("contrastive", "mim")):
        torch.manual_seed(100 + seed)
        paths[name] = str(save_backbone(build_backbone(VIT, **vit_kwargs(img_size)), root / f"{name}.pt"))
    return paths


def method_config(name: str, teachers: dict[str, str], img_size: int) -> tuple[dict, dict]:
    """``(method config, recipe overrides)`` of method ``name`` for the benchmark's tiny models."""
    vit = vit_kwargs(img_size)
    contrastive = dict(arch=VIT, kwargs=vit, path=teachers["contrastive"])
    mim = dict(arch=VIT, kwargs=vit, path=teachers["mim"])
    if name == "moma":
        config = dict(mode="both_to_random", student_arch=VIT, student_kwargs=vit, teacher_format="fastkd")
        for role, teacher in (("mocov3", contrastive), ("mae", mim)):
            config.update({f"{role}_teacher_{key}": value for key, value in teacher.items()})
        return config, dict(size=img_size)
    if name == "hybrid_distill":
        config = dict(student_arch=VIT, student_kwargs=vit, teacher_format="fastkd",
                      keep_schedule=[[0.0, HYBRID_KEEP_RATIO]])
        for role, teacher in (("feature_teacher", contrastive), ("relation_teacher", mim)):
            config.update({f"{role}_{key}": value for key, value in teacher.items()})
        return config, dict(size=img_size)
    if name == "resmoco":
        return dict(arch=VIT, arch_kwargs=vit, proj_hidden_dim=1024, pred_hidden_dim=1024, out_dim=256), \
            dict(size=img_size)
    if name == "mokd":
        return dict(model_a_arch=VIT, model_a_kwargs={**vit, "dynamic_img_size": True}, model_b_arch=VIT,
                    model_b_kwargs={**vit_kwargs(img_size, embed_dim=96), "dynamic_img_size": True},
                    out_dim=4096, dino_hidden_dim=512, bottleneck_dim=128, thead_dim=192, thead_depth=1,
                    thead_heads=3), \
            dict(global_size=img_size, local_size=img_size // 2, local_crops=4)
    raise ValueError(f"method must be one of {METHODS}, got {name!r}")


def synthetic_batch(recipe: str, overrides: dict, batch_size: int, device: str, seed: int = 0) -> Batch:
    """Random normalised images with the view shapes of ``build_recipe(recipe, **overrides)``."""
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch_size, 3, spec.size, spec.size, generator=generator).to(device)
             for spec in build_recipe(recipe, **overrides).views]
    return Batch(views, torch.full((batch_size,), -1, dtype=torch.long, device=device),
                 torch.arange(batch_size, device=device))


def training_step(method, batch: Batch, *, plain: bool, device: str) -> Callable[[], None]:
    """One AdamW training step of ``method`` on ``batch`` per call (plain: inside ``reference_ops()``)."""
    optimiser = torch.optim.AdamW(method.param_groups(0.05), lr=1e-4)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else contextlib.nullcontext
    state = {"step": 0}

    def step() -> None:
        with reference_ops(plain):
            with autocast():
                out = method(batch)
            optimiser.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimiser.step()
            method.after_step(state["step"] % TOTAL_STEPS, TOTAL_STEPS)
        state["step"] += 1

    return step


def step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step`` counted by ``FlopCounterMode`` (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def profile_step(step: Callable[[], None], device: str) -> dict:
    """Where one step's time goes: ``fused_ops_share`` (time of the outermost fastkd op events over
    the step's wall time; CPU time on CPU, kernel time on CUDA), ``fused_ops_called`` and the
    ``top_ops`` by self time."""
    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    fused_us, called = 0.0, set()
    for event in prof.events():
        called.update(op for op in FUSED_OPS if event.name.startswith(f"fastkd::{op}"))
        if "fastkd" in event.name:
            parent = event.cpu_parent
            while parent is not None and "fastkd" not in parent.name:
                parent = parent.cpu_parent
            if parent is None:
                fused_us += event.device_time_total if cuda else event.cpu_time_total
    self_us = (lambda a: a.self_device_time_total) if cuda else (lambda a: a.self_cpu_time_total)
    averages = sorted(prof.key_averages(), key=self_us, reverse=True)[:TOP_OPS]
    return {
        "fused_ops_share": fused_us / wall_us,
        "fused_ops_called": sorted(called),
        "top_ops": [{"op": a.key, "self_ms": self_us(a) / 1e3, "calls": a.count} for a in averages],
    }


def bench_method(name: str, teachers: dict[str, str], *, batch_size: int, img_size: int, device: str,
                 repeats: int, rounds: int) -> list[dict]:
    """Both variants of method ``name``: one record each."""
    config, recipe_overrides = method_config(name, teachers, img_size)
    steps, recipe, views = {}, None, None
    for variant in VARIANTS:
        torch.manual_seed(0)
        method = build_method(name, config).to(device).train()
        recipe = method.recipe
        batch = synthetic_batch(recipe, recipe_overrides, batch_size, device)
        views = [v.shape[-1] for v in batch.views]
        steps[variant] = training_step(method, batch, plain=variant == "plain", device=device)
    timings: dict[str, dict] = {}
    for _ in range(rounds):
        for variant, step in steps.items():
            timing = time_fn(step, repeats=repeats, warmup=1, device=device)
            if variant not in timings or timing["median_ms"] < timings[variant]["median_ms"]:
                timings[variant] = timing
    peaks = {variant: peak_memory_bytes(step, device=device) for variant, step in steps.items()}
    flops = step_flops(steps["plain"])
    profiles = {variant: profile_step(step, device) for variant, step in steps.items()}
    peak = gpu_peak() if device == "cuda" else None
    plain_ms, plain_peak = timings["plain"]["median_ms"], peaks["plain"]
    records = []
    for variant in VARIANTS:
        t = timings[variant]
        speedup = plain_ms / t["median_ms"]
        memory_ratio = peaks[variant] / plain_peak if plain_peak else None
        achieved = flops / (t["median_ms"] / 1e3) / 1e9
        record = {
            "method": name, "variant": variant, "recipe": recipe, "views": views, "batch": batch_size,
            "img_size": img_size, "device": device, "dtype": "bf16 autocast" if device == "cuda" else "fp32",
            "median_ms": t["median_ms"], "p10_ms": t["p10_ms"], "p90_ms": t["p90_ms"], "repeats": t["repeats"],
            "steps_per_s": 1e3 / t["median_ms"], "images_per_s": batch_size * 1e3 / t["median_ms"],
            "peak_MiB": peaks[variant] / 2**20, "speedup": speedup, "memory_ratio": memory_ratio,
            "gflop_per_step": flops / 1e9, "achieved_GFLOPs": achieved,
            "vs_peak_bf16": fraction_of_peak(achieved / 1e3, peak and peak["peak_bf16_TFLOPs"], device),
            **profiles[variant],
        }
        if variant == "fastkd":
            lower_memory = name not in LOWER_MEMORY_REQUIRED or (memory_ratio is not None and memory_ratio < 1)
            record["target"] = f">= {TARGET_SPEEDUP[name]}x" + (", lower peak memory" if name in
                                                                 LOWER_MEMORY_REQUIRED else "")
            record["meets_target"] = speedup >= TARGET_SPEEDUP[name] and lower_memory
        records.append(record)
    return records


def where_time_goes(records: list[dict]) -> str:
    """Markdown: for each method whose fastkd variant misses its target, the fused-op share and the
    top ops of both variants."""
    lines = []
    for fastkd in (r for r in records if r.get("variant") == "fastkd" and r.get("meets_target") is False):
        plain = next(r for r in records if r.get("method") == fastkd["method"] and r.get("variant") == "plain")
        lines.append(f"### {fastkd['method']}: {fastkd['speedup']:.2f}x, memory ratio "
                     f"{fastkd['memory_ratio']:.2f} (target {fastkd['target']})\n")
        lines.append(f"fastkd's fused ops take {100 * fastkd['fused_ops_share']:.1f} % of the fastkd step "
                     f"(ops called: {', '.join(fastkd['fused_ops_called']) or 'none'}); the plain step calls "
                     f"fused ops: {', '.join(plain['fused_ops_called']) or 'none'}.\n")
        rows = [{"variant": r["variant"], **op} for r in (plain, fastkd) for op in r["top_ops"]]
        lines.append(markdown_table(rows, ["variant", "op", "self_ms", "calls"]) + "\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "batch 8 at 32 px, one timed round of 3 steps",
                          rounds_help="alternating timing rounds (default 5, --quick 1)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 64, --quick 8)")
    args = parse_bench_args(parser, argv)
    batch_size = args.batch if args.batch is not None else (8 if args.quick else 64)
    img_size = 32 if args.quick else IMG_SIZE
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    if batch_size < 2:
        raise SystemExit(f"--batch must be >= 2 (batch-norm projectors), got {batch_size}")
    repeats = 3
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fastkd-bench-e2e-") as tmp:
        teachers = write_teachers(Path(tmp), img_size)
        for name in args.methods:
            try:
                records += bench_method(name, teachers, batch_size=batch_size, img_size=img_size,
                                        device=args.device, repeats=repeats, rounds=rounds)
            except Exception as error:  # noqa: BLE001 - one broken method is reported, the others still run
                traceback.print_exc()
                records.append({"method": name, "error": f"{type(error).__name__}: {error}"})
    columns = ["method", "variant", "steps_per_s", "images_per_s", "median_ms", "p10_ms", "p90_ms", "peak_MiB",
               "speedup", "memory_ratio", "achieved_GFLOPs", "vs_peak_bf16", "fused_ops_share", "target",
               "meets_target", "error"]
    threads = torch.get_num_threads()
    markdown = (
        f"## End-to-end training step ({args.device}, {threads} threads, tiny ViT 192-d x 4 blocks, "
        f"{img_size} px, patch 8, batch {batch_size})\n\n" + markdown_table(records, columns)
        + "\n\nspeedup = plain-assembly step time / variant step time; memory_ratio = variant peak / plain peak; "
        "vs_peak_bf16 = achieved FLOP rate / the GPU's dense bf16 peak (a GPU-only figure)."
    )
    missed = where_time_goes([r for r in records if "error" not in r])
    if missed:
        markdown += "\n\n## Where time goes (methods below target)\n\n" + missed
    write_results("bench_e2e", records, markdown)
    ok = [r for r in records if "error" not in r]
    if ok:
        methods = list(dict.fromkeys(r["method"] for r in ok))
        value = {(r["method"], r["variant"]): r for r in ok}
        panels = [(label, {v: [value[(m, v)][key] if (m, v) in value else 0.0 for m in methods] for v in VARIANTS})
                  for key, label in (("images_per_s", "training images / s"), ("peak_MiB", "peak memory, MiB"))]
        save_grouped_bars(RESULTS_DIR / "bench_e2e.png", methods, panels,
                          title=f"training throughput per method ({args.device}, batch {batch_size})")
    print(markdown)
    return 1 if len(ok) < len(records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
