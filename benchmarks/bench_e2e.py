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

Models (``--model``): ``demo`` (default, the issue's setting) builds each method exactly as
``configs/demo/`` trains it in ``make demo`` (32 px, patch 8; students of 64-96 dims x 4 blocks, the
demo's heads, keep schedule and recipe options) with frozen teachers of the demo teachers' shape
(96-d x 4 blocks) and random weights (throughput does not depend on them); ``vit64`` uses a
ViT-Tiny-like student (embed 192, depth 4, 3 heads, 64 px -> 64 patches) and teachers of that
shape, MOKD pairing it with a 96-d ViT. Batch 64 (``--quick``: batch 8, 32 px, one round). The
variants are timed in 5 alternating rounds of 3 steps (after one warm-up step each), the round
with the lowest median kept (load from other processes hits both alike).

Per method and variant: steps/s and images/s (batch / step time), median / p10 / p90 step time,
peak memory of one step, ``speedup`` = plain time / variant time, ``memory_ratio`` = variant peak /
plain peak, the model FLOPs of a step (``FlopCounterMode`` on the plain copy, where every op is a
countable aten op) and the achieved GFLOP/s (on CUDA also against the device's bf16 peak; on CPU
"needs a GPU"), ``fused_ops_share`` = share of the profiled step's wall time spent inside fastkd's
ops, ``ceiling_speedup`` = plain time / (fastkd time x (1 - fused_ops_share)), the speedup fastkd
would reach if its fused ops took no time (Amdahl's bound on what fusing them can buy), ``top_ops`` = the five ops with the most self
time (CPU time on CPU, kernel time on CUDA), and ``fused_ops_called``: fastkd ops seen in the step's profile (must be empty
for the plain copy, else the reference switch is not wired into that op).

    python -m fastkd.benchmarks.bench_e2e [--quick] [--device cpu|cuda] [--methods moma ...] [--batch B]
                                          [--model demo|vit64] [--rounds R]
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

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import peak_memory_bytes, time_alternating
from fastkd.benchmarks.gpu_peak import fraction_of_peak, gpu_peak
from fastkd.benchmarks.plots import save_grouped_bars
from fastkd.data.batch import Batch
from fastkd.data.recipes import build_recipe
from fastkd.methods import build_method
from fastkd.models import build_backbone, save_backbone
from fastkd.ops.reference_mode import reference_ops
from fastkd.reporting import markdown_table, write_results

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


DEMO_CONFIGS = {"moma": "moma_both", "hybrid_distill": "hybrid_distill", "resmoco": "resmoco_teacher",
                "mokd": "mokd"}
# The demo's teachers (configs/demo/resmoco_teacher.yaml, mae_teacher.yaml): 32 px, patch 8, 96-d x 4 blocks.
DEMO_TEACHER = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3)
MODELS = ("demo", "vit64")


def vit_kwargs(img_size: int, embed_dim: int = 192) -> dict:
    """The ``vit64`` models: patch 8, depth 4, 3 heads."""
    return dict(img_size=img_size, patch_size=8, embed_dim=embed_dim, depth=4, num_heads=3)


def write_teachers(root: Path, teacher_kwargs: dict) -> dict[str, str]:
    """Two randomly initialised tiny-ViT teachers in fastkd's checkpoint format; name -> path."""
    paths = {}
    for seed, name in enumerate(("contrastive", "mim")):
        torch.manual_seed(100 + seed)
        paths[name] = str(save_backbone(build_backbone(VIT, **teacher_kwargs), root / f"{name}.pt"))
    return paths


def demo_method_config(name: str, teachers: dict[str, str], batch_size: int) -> tuple[dict, dict]:
    """``(method config, recipe overrides)`` of method ``name`` exactly as ``configs/demo/`` trains
    it in ``make demo`` (student, heads, keep schedule, recipe options), with the teacher files
    replaced by ``teachers`` (random weights of the demo teachers' shape)."""
    from fastkd.config import load_config
    from fastkd.configs import demo_config_dir

    path = demo_config_dir() / f"{DEMO_CONFIGS[name]}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"the demo config {path} is missing from the fastkd installation (use --model vit64)")
    overrides = {"moma": {"mocov3_teacher_path": "contrastive", "mae_teacher_path": "mim"},
                 "hybrid_distill": {"feature_teacher_path": "contrastive", "relation_teacher_path": "mim"}}
    config = load_config(path, [f"method.{key}={teachers[teacher]}" for key, teacher in overrides.get(name, {}).items()]
                         + [f"data.batch_size={batch_size}"])
    return config.method_config, dict(config.data.recipe_options)


def vit64_method_config(name: str, teachers: dict[str, str], img_size: int) -> tuple[dict, dict]:
    """``(method config, recipe overrides)`` of method ``name`` for the ``vit64`` models (192-d
    ViTs at ``img_size`` px, wider heads)."""
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


def bench_method(name: str, config: dict, recipe_overrides: dict, *, batch_size: int, device: str,
                 repeats: int, rounds: int) -> list[dict]:
    """Both variants of method ``name`` built from ``config``: one record each."""
    steps, recipe, views = {}, None, None
    for variant in VARIANTS:
        torch.manual_seed(0)
        method = build_method(name, config).to(device).train()
        recipe = method.recipe
        batch = synthetic_batch(recipe, recipe_overrides, batch_size, device)
        views = [v.shape[-1] for v in batch.views]
        steps[variant] = training_step(method, batch, plain=variant == "plain", device=device)
    timings = time_alternating(steps, rounds=rounds, repeats=repeats, device=device)
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
            "img_size": views[0], "device": device, "dtype": "bf16 autocast" if device == "cuda" else "fp32",
            "median_ms": t["median_ms"], "p10_ms": t["p10_ms"], "p90_ms": t["p90_ms"], "repeats": t["repeats"],
            "steps_per_s": 1e3 / t["median_ms"], "images_per_s": batch_size * 1e3 / t["median_ms"],
            "peak_MiB": peaks[variant] / 2**20, "speedup": speedup, "memory_ratio": memory_ratio,
            "gflop_per_step": flops / 1e9, "achieved_GFLOPs": achieved,
            "vs_peak_bf16": fraction_of_peak(achieved / 1e3, peak and peak["peak_bf16_TFLOPs"], device),
            **profiles[variant],
        }
        if variant == "fastkd":
            # Amdahl: the speedup fastkd would reach if its fused ops took no time at all
            record["ceiling_speedup"] = plain_ms / (t["median_ms"] * max(1e-9, 1.0 - record["fused_ops_share"]))
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
                     f"fused ops: {', '.join(plain['fused_ops_called']) or 'none'}. Even if they took no time "
                     f"the step would be {fastkd['ceiling_speedup']:.2f}x the plain one"
                     + (" (below the target: it cannot be met by fusing these ops on this device)."
                        if fastkd["ceiling_speedup"] < TARGET_SPEEDUP[fastkd["method"]] else ".") + "\n")
        rows = [{"variant": r["variant"], **op} for r in (plain, fastkd) for op in r["top_ops"]]
        lines.append(markdown_table(rows, ["variant", "op", "self_ms", "calls"]) + "\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "batch 8 at 32 px, one timed round of 3 steps",
                          rounds_help="alternating timing rounds (default 5, --quick 1)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 64, --quick 8)")
    parser.add_argument("--model", choices=MODELS, default="demo",
                        help="demo: each method exactly as configs/demo/ trains it in make demo (default); "
                             "vit64: 192-d ViTs at 64 px with wider heads")
    args = parse_bench_args(parser, argv)
    batch_size = args.batch if args.batch is not None else (8 if args.quick else 64)
    img_size = 32 if args.quick else IMG_SIZE
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    if batch_size < 2:
        raise SystemExit(f"--batch must be >= 2 (batch-norm projectors), got {batch_size}")
    repeats = 3
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fastkd-bench-e2e-") as tmp:
        teachers = write_teachers(Path(tmp), DEMO_TEACHER if args.model == "demo" else vit_kwargs(img_size))
        for name in args.methods:
            try:
                config, recipe_overrides = (demo_method_config(name, teachers, batch_size) if args.model == "demo"
                                            else vit64_method_config(name, teachers, img_size))
                records += bench_method(name, config, recipe_overrides, batch_size=batch_size, device=args.device,
                                        repeats=repeats, rounds=rounds)
            except Exception as error:  # noqa: BLE001 - one broken method is reported, the others still run
                traceback.print_exc()
                records.append({"method": name, "error": f"{type(error).__name__}: {error}"})
    columns = ["method", "variant", "steps_per_s", "images_per_s", "median_ms", "p10_ms", "p90_ms", "peak_MiB",
               "speedup", "memory_ratio", "achieved_GFLOPs", "vs_peak_bf16", "fused_ops_share", "ceiling_speedup", "target",
               "meets_target", "error"]
    threads = torch.get_num_threads()
    markdown = (
        f"## End-to-end training step ({args.device}, {threads} threads, "
        + ("the demo's models (configs/demo/: 32 px, patch 8, 64-96-d x 4 blocks)" if args.model == "demo"
           else f"tiny ViT 192-d x 4 blocks, {img_size} px, patch 8")
        + f", batch {batch_size})\n\n" + markdown_table(records, columns)
        + "\n\nspeedup = plain-assembly step time / variant step time; memory_ratio = variant peak / plain peak; "
        "ceiling_speedup = the speedup if fastkd's fused ops took no time (plain / (fastkd x (1 - fused_ops_share)));"
        " "
        "vs_peak_bf16 = achieved FLOP rate / the GPU's dense bf16 peak (a GPU-only figure)."
    )
    missed = where_time_goes([r for r in records if "error" not in r])
    if missed:
        markdown += "\n\n## Where time goes (methods below target)\n\n" + missed
    write_results("bench_e2e", records, markdown, out_dir=args.out)
    ok = [r for r in records if "error" not in r]
    if ok:
        methods = list(dict.fromkeys(r["method"] for r in ok))
        value = {(r["method"], r["variant"]): r for r in ok}
        panels = [(label, {v: [value[(m, v)][key] if (m, v) in value else 0.0 for m in methods] for v in VARIANTS})
                  for key, label in (("images_per_s", "training images / s"), ("peak_MiB", "peak memory, MiB"))]
        save_grouped_bars(args.out / "bench_e2e.png", methods, panels,
                          title=f"training throughput per method ({args.device}, batch {batch_size})")
    print(markdown)
    return 1 if len(ok) < len(records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
