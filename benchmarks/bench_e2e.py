"""End-to-end training throughput per method, every variant side by side in one run.

Variants, built from one seed, trained on one synthetic batch of the method's recipe views:
``plain_eager`` (hand-written: plain ops under ``reference_ops()``, single-tensor AdamW, per-step host
syncs of the loss parts and gradient norm); ``plain_compiled`` (the same under ``torch.compile``);
``fastkd`` (``Trainer.train_step`` as shipped: fused ops and AdamW, ``auto`` skip_decision /
teacher_precision / attention / compile); ``fastkd_compiled`` (with ``train.compile: true``). fp32 on
CPU, bf16 autocast on CUDA. Timed in alternating rounds of 3 steps after warm-up (best round median).

Models (``--model``): ``demo`` (each method as ``configs/demo/`` trains it, batch 64), ``vit64``
(192-d x 4-block ViTs at 64 px, batch 64), ``vits224`` (ViT-S/16, batch 32, the CPU target),
``vitb224`` (ViT-B/16, batch 128, the CUDA target). ``--runs N``: each method's rows from the run
whose ``fastkd`` row has the lowest ``vs_plain_eager`` (every run's ratios in ``*_runs``).

Columns: ``vs_plain_eager`` / ``vs_plain_compiled`` (their step time / this one's), ``memory_ratio``
(peak / plain_eager's), ``teacher_dtype``, GFLOP/s, ``vs_mm_fp32``, ``vs_peak_bf16`` and the phases of
the median of three profiled steps (``teacher_fwd``, empty in a compiled graph, ``student_fwd``,
``backward``, ``optimizer``, ``after_step``, ``data``, ``other``, ``fused_ops``) with ``top_ops``.
:data:`TARGETS` are checked per record (``meets_target``), never asserted by tests.

    fastkd bench e2e [--quick] [--model vits224] [--methods moma ...] [--runs N]
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import (TIMING_KEYS, image_batch, machine_line, peak_memory_bytes, time_alternating,
                                      top_ops, trainer_step)
from fastkd.benchmarks.gpu_peak import fraction_of_peak, gpu_peak
from fastkd.benchmarks.plots import save_grouped_bars
from fastkd.config import load_config
from fastkd.configs import demo_config_dir
from fastkd.data.recipes import build_recipe
from fastkd.methods import METHODS as REGISTERED
from fastkd.methods import build_method
from fastkd.models import build_backbone, save_backbone
from fastkd.ops import reference_ops
from fastkd.reporting import load_average, markdown_table, write_results
from fastkd.train.trainer import PHASES

METHODS = ("moma", "hybrid_distill", "resmoco", "mokd")  # the default set; --methods takes any of demo_methods()
VARIANTS = ("plain_eager", "plain_compiled", "fastkd", "fastkd_compiled")
BASELINE = "plain_eager"
# (model, method) -> {ratio: its minimum, "memory_ratio": its maximum}; "*" matches every model / method.
TARGETS = {
    ("demo", "moma"): {"vs_plain_eager": 1.2}, ("demo", "hybrid_distill"): {"vs_plain_eager": 1.2},
    ("vits224", "moma"): {"vs_plain_eager": 1.05},
    ("vits224", "hybrid_distill"): {"vs_plain_eager": 1.05, "memory_ratio": 0.9},
    ("*", "*"): {"vs_plain_compiled": 1.0},
    ("vits224", "*"): {"vs_mm_fp32": 0.7},
}
GEMM_SIZE = 4096  # the n x n fp32 torch.mm whose rate vs_mm_fp32 divides by (--quick: 1024)
FUSED_OPS = ("feature_align", "token_relation", "gather_tokens", "ema_")
PHASE_COLUMNS = ("teacher_fwd", "student_fwd", "backward", "optimizer", "after_step", "data", "other", "fused_ops")
TEACHER_RANGE = "fastkd/teacher_forward"
VIT = "vit_tiny_patch16_224"
TOTAL_STEPS = 1000
PROFILED_STEPS = 3
# The demo's teachers (configs/demo/resmoco.yaml, mae.yaml): 32 px, patch 8, 96-d x 4 blocks.
DEMO_TEACHER = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3)
# model -> (student / teacher arch, its kwargs, image size, default batch)
VIT_MODELS = {
    "vit64": (VIT, dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3), 64, 64),
    "vits224": ("vit_small_patch16_224", {}, 224, 32),
    "vitb224": ("vit_base_patch16_224", {}, 224, 128),
}
MODELS = ("demo", *VIT_MODELS)
SHAPE_KWARGS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")  # replaced by --model's
SPEC_FIELDS = ("backbone", "student")  # a method config's backbone specs; "teachers", "models": role -> spec


def demo_methods() -> list[str]:
    """Every registered method with a ``configs/demo/<name>.yaml`` (what :func:`method_config` builds)."""
    return [name for name in sorted(REGISTERED) if (demo_config_dir() / f"{name}.yaml").is_file()]


def write_teachers(root: Path, arch: str, teacher_kwargs: dict) -> list[str]:
    """Paths of two random teachers in fastkd's checkpoint format (contrastive and MIM stand-ins)."""
    paths = []
    for seed, name in enumerate(("contrastive", "mim")):
        torch.manual_seed(100 + seed)
        paths.append(str(save_backbone(build_backbone(arch, **teacher_kwargs), root / f"{name}.pt")))
    return paths


def method_config(name: str, teachers: list[str], model: str, batch_size: int) -> tuple[dict, dict]:
    """``(method config, recipe overrides)`` of ``configs/demo/<name>.yaml``, its frozen teachers
    ``teachers`` in turn; a :data:`VIT_MODELS` ``model`` gives every backbone that ViT's architecture
    and shape and scales the recipe's image sizes to its input size."""
    run = load_config(demo_config_dir() / f"{name}.yaml", [f"data.batch_size={batch_size}"])
    config, recipe = run.method_config, dict(run.data.recipe_options)
    config = {**config, **{key: dict(config[key]) for key in ("teachers", "models") if key in config}}
    for i, role in enumerate(config.get("teachers", {})):
        config["teachers"][role] = {**config["teachers"][role], "path": teachers[i % len(teachers)], "format": "fastkd"}
    if model == "demo":
        return config, recipe
    arch, shape, img_size, _ = VIT_MODELS[model]

    def resized(spec: dict) -> dict:
        kept = {k: v for k, v in spec.get("kwargs", {}).items() if k not in SHAPE_KWARGS}
        return {**spec, "arch": arch, "kwargs": {**shape, **kept}}

    for key in SPEC_FIELDS:
        if key in config:
            config[key] = resized(config[key])
    for key in ("teachers", "models"):
        for role, spec in config.get(key, {}).items():
            config[key][role] = resized(spec)
    base = recipe.get("size", recipe.get("global_size"))
    if base:
        recipe = {k: (round(v * img_size / base) if k.endswith("size") else v) for k, v in recipe.items()}
    return config, recipe


def plain_step(method, batch, *, device: str, compile_backend: str | None) -> Callable[[], None]:
    """One ``plain_eager`` step per call (``plain_compiled`` with ``compile_backend``)."""
    optimiser = torch.optim.AdamW(method.param_groups(0.05), lr=1e-4, foreach=False, fused=False)
    params = [p for group in optimiser.param_groups for p in group["params"]]
    forward = method if compile_backend is None else torch.compile(method, backend=compile_backend)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    state = {"step": 0}

    def step() -> None:
        with reference_ops(True):
            with autocast, record_function(PHASES["forward"]):
                out = forward(batch)
            with record_function(PHASES["backward"]):
                out["loss"].backward()
            with record_function(PHASES["optimizer"]):
                norm = nn.utils.clip_grad_norm_(params, math.inf)
                logged = {k: float(v.detach()) for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
                if math.isfinite(logged["loss"]) and math.isfinite(float(norm)):
                    optimiser.step()
                optimiser.zero_grad(set_to_none=True)
            with record_function(PHASES["after_step"]):
                method.after_step(state["step"] % TOTAL_STEPS, TOTAL_STEPS)
        state["step"] += 1

    return step


@contextlib.contextmanager
def teacher_ranges(method: nn.Module):
    """Profiler range ``TEACHER_RANGE`` around ``forward`` / ``forward_features`` of the teachers
    (outermost all-frozen modules: frozen and EMA teachers) and their sub-modules two levels down
    (methods call parts like ``teachers["a"].module.thead`` directly), as instance attributes removed
    on exit."""
    outermost: list[str] = []
    selected: list[nn.Module] = []
    for name, module in method.named_modules():
        params = list(module.parameters())
        inside = next((outer for outer in outermost if name.startswith(f"{outer}.")), None)
        if inside is not None:
            if name.count(".") - inside.count(".") <= 2:
                selected.append(module)
        elif name and params and not any(p.requires_grad for p in params):
            outermost.append(name)
            selected.append(module)

    def in_range(function):
        def call(*args, **kwargs):
            with record_function(TEACHER_RANGE):
                return function(*args, **kwargs)
        return call

    wrapped = [(module, attribute) for module in selected for attribute in ("forward", "forward_features")
               if callable(getattr(module, attribute, None)) and attribute not in vars(module)]
    for module, attribute in wrapped:
        setattr(module, attribute, in_range(getattr(module, attribute)))
    try:
        yield
    finally:
        for module, attribute in wrapped:
            delattr(module, attribute)


def profile_once(step: Callable[[], None], method: nn.Module, device: str, *, split_teachers: bool) -> dict:
    """One profiled step: the phases (ms, host-side ranges, the device synchronised around the
    step), ``fused_ops_share``, ``fused_ops_called`` and ``top_ops`` (kernel time on CUDA)."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with teacher_ranges(method) if split_teachers else contextlib.nullcontext():
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            sync()
            start = time.perf_counter()
            step()
            sync()
            wall_ms = (time.perf_counter() - start) * 1e3
    ranges = {name: 0.0 for name in (*PHASES.values(), TEACHER_RANGE)}
    fused_us, called = 0.0, set()
    for event in prof.events():
        called.update(op for op in FUSED_OPS if event.name.startswith(f"fastkd::{op}"))
        parents, parent = [], event.cpu_parent
        while parent is not None:
            parents.append(parent.name)
            parent = parent.cpu_parent
        if event.name in ranges and event.name not in parents:
            ranges[event.name] += event.cpu_time_total / 1e3
        if event.name.startswith("fastkd::") and not any(p.startswith("fastkd::") for p in parents):
            fused_us += event.device_time_total if cuda else event.cpu_time_total
    forward, teacher = ranges[PHASES["forward"]], ranges[TEACHER_RANGE] if split_teachers else None
    phases = {"teacher_fwd": teacher, "student_fwd": forward - (teacher or 0.0),
              **{name: ranges[PHASES[name]] for name in ("backward", "optimizer", "after_step", "data")}}
    phases["other"] = max(0.0, wall_ms - sum(v for v in phases.values() if v is not None))
    phases["fused_ops"] = fused_us / 1e3
    return {"profiled_ms": wall_ms, **{f"{name}_ms": value for name, value in phases.items()},
            "fused_ops_share": fused_us / 1e3 / wall_ms, "fused_ops_called": sorted(called),
            "top_ops": top_ops(prof, cuda=cuda)}


def gemm_rate(device: str, n: int) -> float:
    """GFLOP/s of an fp32 ``n x n`` ``torch.mm`` on ``device``: ``2 n^3`` over the best of 3 timed calls."""
    a, b = (torch.randn(n, n, device=device, generator=torch.Generator(device).manual_seed(i)) for i in (0, 1))
    seconds = []
    for _ in range(4):  # the first call warms up
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / min(seconds[1:]) / 1e9


def targets_for(model: str, method: str) -> dict:
    return {key: value for (m_model, m_method), target in TARGETS.items()
            if m_model in ("*", model) and m_method in ("*", method) for key, value in target.items()}


def describe_target(target: dict) -> str:
    parts = [f"{key} >= {value}x" for key, value in target.items() if key.startswith("vs_")]
    if "memory_ratio" in target:
        parts.append(f"memory <= {target['memory_ratio']}x plain_eager")
    return ", ".join(parts)


def bench_method(name: str, config: dict, recipe_overrides: dict, *, model: str, batch_size: int, device: str,
                 repeats: int, rounds: int, variants: tuple[str, ...], compile_backend: str,
                 workdir: Path, mm_GFLOPs: float, teacher_precision: str = "auto") -> list[dict]:
    steps, methods, warmup_s, recipe, views = {}, {}, {}, None, None
    for variant in variants:
        torch.manual_seed(0)
        method = build_method(name, config).to(device).train()
        recipe = method.recipe
        generator = torch.Generator().manual_seed(0)  # random normalised images of the recipe's views
        batch = image_batch([torch.randn(batch_size, 3, spec.size, spec.size, generator=generator).to(device)
                             for spec in build_recipe(recipe, **recipe_overrides).views])
        views = [v.shape[-1] for v in batch.views]
        backend = compile_backend if variant.endswith("compiled") else None
        if variant.startswith("fastkd"):
            compiled = {} if backend is None else {"compile": True, "compile_backend": backend}
            steps[variant] = trainer_step(method, batch, workdir / name / variant, device=device,
                                          teacher_precision=teacher_precision, **compiled)
        else:
            steps[variant] = plain_step(method, batch, device=device, compile_backend=backend)
        methods[variant] = method
        start = time.perf_counter()
        steps[variant]()  # warm-up; compiles the compiled variant
        warmup_s[variant] = time.perf_counter() - start
    timings = time_alternating(steps, rounds=rounds, repeats=repeats, device=device)
    peaks = {variant: peak_memory_bytes(step, device=device) for variant, step in steps.items()}
    eager, flops = [v for v in variants if not v.endswith("compiled")], None  # FlopCounterMode: eager code only
    if eager:
        with FlopCounterMode(display=False) as counter:  # matmuls, convolutions, attention
            steps[eager[0]]()
        flops = counter.get_total_flops()
    peak = gpu_peak() if device == "cuda" else None
    records = []
    for variant in variants:
        t = timings[variant]  # no teacher split inside a compiled forward (plain_compiled, train.compile)
        compiled_forward = variant == "plain_compiled" or getattr(steps[variant], "compiled", False)
        record = {
            "method": name, "variant": variant, "model": model, "recipe": recipe, "views": views,
            "batch": batch_size, "img_size": views[0], "device": device,
            "dtype": "bf16 autocast" if device == "cuda" else "fp32",
            "teacher_dtype": (getattr(steps[variant], "teacher_precision", "bf16" if device == "cuda" else "fp32")
                              if getattr(methods[variant], "frozen_teachers", ()) else "no frozen teacher"),
            **{k: t[k] for k in (*TIMING_KEYS, "repeats")},
            "steps_per_s": 1e3 / t["median_ms"], "images_per_s": batch_size * 1e3 / t["median_ms"],
            "peak_MiB": peaks[variant] / 2**20, "warmup_s": warmup_s[variant],
            **({"compile_backend": compile_backend} if variant.endswith("compiled") else {}),
            **sorted((profile_once(steps[variant], methods[variant], device, split_teachers=not compiled_forward)
                      for _ in range(PROFILED_STEPS)), key=lambda p: p["profiled_ms"])[PROFILED_STEPS // 2],
            **speed_ratios({v: timings[v]["median_ms"] for v in timings}, variant),
        }
        if peaks.get(BASELINE):
            record["memory_ratio"] = peaks[variant] / peaks[BASELINE]
        if flops:
            record["gflop_per_step"] = flops / 1e9
            record["achieved_GFLOPs"] = flops / (t["median_ms"] / 1e3) / 1e9
            record["vs_peak_bf16"] = fraction_of_peak(record["achieved_GFLOPs"] / 1e3,
                                                      peak and peak["peak_bf16_TFLOPs"], device)
            record["mm_fp32_GFLOPs"], record["vs_mm_fp32"] = mm_GFLOPs, record["achieved_GFLOPs"] / mm_GFLOPs
        judge(record)
        records.append(record)
    return records


def one_run_per_method(runs: list[list[dict]]) -> list[dict]:
    """Per method, all its rows from one run where it did not fail (an ``error`` record): the one
    whose ``fastkd`` row (else first row with a ``vs_plain_eager``) has the lowest ``vs_plain_eager``;
    each row gets ``run`` (1-based) and ``<ratio>_runs`` (every run's). Failed in every run: run 1's
    error record."""
    grouped: dict[str, dict[int, list[dict]]] = {}
    for number, records in enumerate(runs, 1):
        for record in records:
            grouped.setdefault(record["method"], {}).setdefault(number, []).append(record)

    def headline(rows: list[dict]) -> float:
        ranked = sorted((r for r in rows if "vs_plain_eager" in r), key=lambda r: r["variant"] != "fastkd")
        return ranked[0]["vs_plain_eager"] if ranked else 0.0

    published = []
    for numbered in grouped.values():
        ok = {n: rows for n, rows in numbered.items() if not any("error" in r for r in rows)}
        if not ok:
            published += next(iter(numbered.values()))
            continue
        number = min(ok, key=lambda n: headline(ok[n]))
        for row in ok[number]:
            row = {**row, "run": number}
            for ratio in ("vs_plain_eager", "vs_plain_compiled"):
                if ratio in row:
                    row[f"{ratio}_runs"] = [round(r[ratio], 3) for rows in ok.values() for r in rows
                                            if r["variant"] == row["variant"] and ratio in r]
            published.append(row)
    return published


def speed_ratios(medians: dict[str, float], variant: str) -> dict[str, float]:
    """``vs_<baseline>`` = the baseline's median / ``variant``'s, from ``medians`` (variant -> ms)."""
    return {f"vs_{other}": medians[other] / medians[variant] for other in ("plain_eager", "plain_compiled")
            if other in medians}


def judge(record: dict) -> None:
    """Set a fastkd record's ``target`` and ``meets_target`` from :data:`TARGETS`."""
    if not record["variant"].startswith("fastkd"):
        return
    target = {k: v for k, v in targets_for(record["model"], record["method"]).items() if k in record}
    record["target"] = describe_target(target)
    record["meets_target"] = all(record[key] <= value if key == "memory_ratio" else record[key] >= value
                                 for key, value in target.items())


def where_time_goes(records: list[dict]) -> str:
    """Markdown: per fastkd row below a target, the phase with the most extra time and the top ops."""
    lines = []
    for fastkd in (r for r in records if r.get("variant", "").startswith("fastkd") and r.get("meets_target") is False):
        others = {r["variant"]: r for r in records if r.get("method") == fastkd["method"]}
        lines.append(f"### {fastkd['method']}, {fastkd['variant']}: target {fastkd['target']}\n")
        for name, other in others.items():
            if name.startswith("fastkd"):
                continue
            deltas = {p: (fastkd[f"{p}_ms"] or 0.0) - (other[f"{p}_ms"] or 0.0)
                      for p in PHASE_COLUMNS if p not in ("fused_ops", "teacher_fwd", "student_fwd")}
            deltas["forward"] = ((fastkd["teacher_fwd_ms"] or 0.0) + fastkd["student_fwd_ms"]) - \
                ((other["teacher_fwd_ms"] or 0.0) + other["student_fwd_ms"])
            worst = max(deltas, key=deltas.get)
            lines.append(f"- vs {name}: {fastkd[f'vs_{name}']:.2f}x; the phase fastkd spends most extra time "
                         f"in: {worst} ({deltas[worst]:+.1f} ms); fused ops take "
                         f"{100 * fastkd['fused_ops_share']:.1f} % of the fastkd step.")
        rows = [{"variant": r["variant"], **op} for r in others.values() if r is fastkd or not r["variant"].startswith(
            "fastkd") for op in r["top_ops"]]
        lines.append("\n" + markdown_table(rows, ["variant", "op", "self_ms", "calls"]) + "\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "batch 8, demo shapes, one timed round of 3 steps, compiled on the eager backend",
                          rounds_help="alternating timing rounds (default 5, --quick 1)",
                          runs_help="measure everything this many times (default 1)")
    parser.add_argument("--methods", nargs="+", choices=demo_methods(), default=None,
                        help="default: every method (vits224 / vitb224: moma and hybrid_distill, the targets)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=None,
                        help="images per batch, >= 2 for the batch-norm projectors (default: the model's)")
    parser.add_argument("--model", choices=MODELS, default="demo")
    parser.add_argument("--teacher-precision", default="auto", choices=("auto", "fp32", "bf16", "same"),
                        help="the fastkd variants' train.teacher_precision (plain variants: fp32)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compiled variants (default inductor; --quick: eager, "
                             "dynamo without a compiler, a wiring check)")
    args = parse_bench_args(parser, argv, min_batch=2)
    load = load_average()
    model = "demo" if args.quick else args.model
    batch_size = args.batch or (8 if args.quick else 64 if model == "demo" else VIT_MODELS[model][3])
    rounds = args.rounds or (1 if args.quick else 5)
    compile_backend = args.compile_backend or ("eager" if args.quick else "inductor")
    methods = args.methods or (list(METHODS) if args.model in ("demo", "vit64") else ["moma", "hybrid_distill"])
    variants = tuple(v for v in VARIANTS if v in args.variants)
    runs: list[list[dict]] = []
    gemm_n = 1024 if args.quick else GEMM_SIZE
    for run in range(args.runs):
        mm_GFLOPs = gemm_rate(args.device, gemm_n)  # in every run: the machine's state of that run
        print(f"run {run + 1}: fp32 {gemm_n}x{gemm_n} torch.mm {mm_GFLOPs:.1f} GFLOP/s", flush=True)
        records: list[dict] = []
        with tempfile.TemporaryDirectory(prefix="fastkd-bench-e2e-") as tmp:
            arch, teacher_kwargs = (VIT, DEMO_TEACHER) if model == "demo" else VIT_MODELS[model][:2]
            teachers = write_teachers(Path(tmp), arch, teacher_kwargs)
            for name in methods:
                try:
                    config, recipe_overrides = method_config(name, teachers, model, batch_size)
                    records += bench_method(name, config, recipe_overrides, model=model, batch_size=batch_size,
                                            device=args.device, repeats=3, rounds=rounds, variants=variants,
                                            compile_backend=compile_backend, workdir=Path(tmp) / str(run),
                                            mm_GFLOPs=mm_GFLOPs, teacher_precision=args.teacher_precision)
                except Exception as error:  # noqa: BLE001 - one broken method is reported, the others still run
                    traceback.print_exc()
                    records.append({"method": name, "error": f"{type(error).__name__}: {error}"})
        runs.append(records)
    records = one_run_per_method(runs)
    ok = [r for r in records if "error" not in r]
    columns = ["method", "variant", "run", "teacher_dtype", "images_per_s", *TIMING_KEYS, "peak_MiB", "vs_plain_eager",
               "vs_plain_compiled", "memory_ratio", "warmup_s", "achieved_GFLOPs", "vs_mm_fp32", "vs_peak_bf16",
               "fused_ops_share", "target", "meets_target", "error"]
    columns += ["vs_plain_eager_runs", "vs_plain_compiled_runs"] if args.runs > 1 else []
    phases = markdown_table([{"method": r["method"], "variant": r["variant"], "step_ms": r["profiled_ms"],
                              **{name: r[f"{name}_ms"] for name in PHASE_COLUMNS}} for r in ok],
                            ["method", "variant", "step_ms", *PHASE_COLUMNS])
    shapes = ("the demo's models (configs/demo/: 32 px, patch 8, 64-96-d x 4 blocks)" if model == "demo"
              else f"{VIT_MODELS[model][0]} students and teachers at {VIT_MODELS[model][2]} px")
    markdown = (
        f"## End-to-end training step ({args.device}, {torch.get_num_threads()} threads, {shapes}, batch {batch_size})"
        f"\n\n{machine_line(load)} Compiled variant: {compile_backend}."
        + (f" {args.runs} runs: each method's rows all come from one run (the run column), the one in which its "
           "fastkd row's vs_plain_eager is lowest, so every ratio is that run's plain_eager / plain_compiled median "
           "over the row's own median (every run's ratios in the *_runs columns; phases and top ops: that run)."
           if args.runs > 1 else "")
        + f"\n\n{markdown_table(records, columns)}\n\n"
        "vs_X = X's step time / this variant's (higher is faster); memory_ratio = peak / plain_eager's peak; "
        "warmup_s = the first step (with compilation); vs_mm_fp32 = achieved FLOP rate / this run's fp32 "
        f"{gemm_n}x{gemm_n} torch.mm rate (model FLOPs of the eager step); vs_peak_bf16 = achieved FLOP rate / "
        f"the GPU's dense bf16 peak. fastkd teachers: teacher_precision {args.teacher_precision}."
        f"\n\n## Where a step's time goes (ms, the median of three profiled steps)\n\n{phases}\n\n"
        "teacher_fwd: frozen and EMA teachers' forward (none shown in a compiled forward); student_fwd: the rest; "
        "optimizer: clipping, the optimiser and plain_eager's host syncs; fused_ops: inside fastkd's ops."
    )
    missed = where_time_goes(ok)
    if missed:
        markdown += "\n\n## Methods below a target\n\n" + missed
    write_results("bench_e2e", records, markdown, out_dir=args.out, load_at_start=load)
    if ok:
        names = list(dict.fromkeys(r["method"] for r in ok))
        value = {(r["method"], r["variant"]): r for r in ok}
        panels = [(label, {v: [value[(m, v)][key] if (m, v) in value else 0.0 for m in names] for v in variants})
                  for key, label in (("images_per_s", "training images / s"), ("peak_MiB", "peak memory, MiB"))]
        save_grouped_bars(args.out / "bench_e2e.png", names, panels,
                          title=f"training throughput per method ({args.device}, {model}, batch {batch_size})")
    print(markdown)
    return 1 if len(ok) < len(records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
