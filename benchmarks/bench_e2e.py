"""End-to-end training throughput per method: what a user compares, side by side in one run.

Three variants of each method, built from the same seed (same weights) with
``fastkd.methods.build_method`` and trained on the same synthetic batch (random images of the shapes
of the method's data recipe; data loading is timed by ``bench_data``):

- ``plain_eager``: what a user writes by hand. Every op is its plain PyTorch form
  (``fastkd.ops.reference_ops()``: ``feature_align`` an unfused normalise + loss,
  ``token_relation`` materialised attention maps, ``gather_tokens`` ``torch.gather``, ``ema_`` a
  Python loop over parameters), single-tensor AdamW (``foreach=False``) and the usual per-step host
  syncs (every loss part and the gradient norm read as Python floats to log them and to skip a
  non-finite step).
- ``plain_compiled``: the same with ``torch.compile(method)`` (``--compile-backend``, default
  inductor; compilation is done in the warm-up and reported as ``compile_s``).
- ``fastkd``: fastkd as shipped: ``fastkd.train.Trainer.train_step`` with the trainer's defaults
  (fused ops, fused AdamW where torch has it for the device, loss parts and norms kept on the device,
  ``train.skip_decision: auto`` = a non-finite step skipped on the device without a host read on
  CUDA, one flag read per step on CPU where reading it costs nothing, ``train.teacher_precision:
  auto`` = frozen pretrained teachers in bf16 on CUDA and, on CPU, in bf16 or fp32 as measured on
  the running machine, ``attention: auto`` = the backend measured on the running machine,
  ``train.compile: auto`` = compiled backbones on CUDA only).
- ``fastkd_compiled``: the same with ``train.compile: true`` (every backbone pass compiled with the
  fused ops inside the graph, same backend as ``plain_compiled``): on CUDA it equals ``fastkd``'s
  default, on CPU it is what ``train.compile=true`` buys.

The training precision is the same for all: fp32 on CPU, bf16 autocast on CUDA; the ``teacher_dtype``
column says what the frozen teachers computed in (fastkd's ``teacher_precision: auto`` runs them in
bf16 where that measured faster on this CPU, e.g. one with AVX512-BF16 / AMX; the plain variants,
like a hand-written loop, keep fp32).

Models (``--model``): ``demo`` (default) builds each method exactly as ``configs/demo/`` trains it in
``make demo`` (32 px, patch 8; students of 64-96 dims x 4 blocks) with frozen teachers of the demo
teachers' shape (96-d x 4 blocks, random weights: throughput does not depend on them), batch 64;
``vit64``: ViT-Tiny-like students (192-d x 4 blocks, 64 px, patch 8), batch 64; ``vits224``:
ViT-S/16 at 224 px students and teachers, batch 32 (the CPU target size); ``vitb224``: ViT-B/16 at
224 px, batch 128 (the CUDA target size). ``--quick``: batch 8, demo shapes, one round, the compiled
variant on the ``aot_eager`` backend. Variants are timed in alternating rounds of 3 steps (after
warm-up), the round with the lowest median kept (load from other processes hits all alike); the
machine's load average at the start, the CPU model and its ISA flags head the results (Markdown and
JSON). ``--runs N`` measures everything N times and publishes, per method, **one run's rows**
(:func:`one_run_per_method`): the run in which the method's ``fastkd`` row has the lowest
``vs_plain_eager`` (a published ratio must survive a re-run), so every ratio, images/s and median of
a method's rows comes from that run (the ``run`` column); every run's ratios are in
``vs_plain_eager_runs`` / ``vs_plain_compiled_runs``.

Per method and variant: images/s, median / p10 / p90 step time, peak memory of one step,
``vs_plain_eager`` / ``vs_plain_compiled`` = their step time / this variant's, ``memory_ratio`` =
peak / plain_eager's peak, the model FLOPs of a step and achieved GFLOP/s, and **where the time goes**
(the median of three profiled steps): ``teacher_fwd`` (frozen and EMA teachers' forward passes), ``student_fwd`` (the
rest of the method's forward: students, heads, losses), ``backward``, ``optimizer`` (clipping / norm,
the optimiser step, the host syncs of plain_eager), ``after_step`` (EMA teacher updates, schedules),
``data`` (the trainer taking the batch), ``other`` (the rest of the step's wall time), and,
overlapping forward and backward, ``fused_ops`` (time inside fastkd's ops). Inside a compiled graph
the teacher / student split is not visible (``teacher_fwd`` empty). ``top_ops``: the five ops with
the most self time.

Targets (speed ratios over plain eager / plain compiled, memory over plain eager) are in
``TARGETS`` and checked per record (``meets_target``); they are never asserted by tests.

    python -m fastkd.benchmarks.bench_e2e [--quick] [--device cpu|cuda] [--methods moma ...] [--batch B]
                                          [--model demo|vit64|vits224|vitb224] [--rounds R] [--runs N]
                                          [--variants plain_eager plain_compiled fastkd]
"""

from __future__ import annotations

import contextlib
import itertools
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
from fastkd.benchmarks.common import peak_memory_bytes, time_alternating
from fastkd.benchmarks.gpu_peak import fraction_of_peak, gpu_peak
from fastkd.benchmarks.plots import save_grouped_bars
from fastkd.config import load_config
from fastkd.configs import demo_config_dir
from fastkd.data.batch import Batch
from fastkd.data.recipes import build_recipe
from fastkd.methods import METHODS as REGISTERED
from fastkd.methods import build_method
from fastkd.models import build_backbone, save_backbone
from fastkd.ops import reference_ops
from fastkd.reporting import cpu_info, load_average, markdown_table, write_results
from fastkd.train.options import OptimConfig, TrainConfig
from fastkd.train.trainer import PHASES, Trainer

METHODS = ("moma", "hybrid_distill", "resmoco", "mokd")  # the default set; --methods takes any of demo_methods()
VARIANTS = ("plain_eager", "plain_compiled", "fastkd", "fastkd_compiled")
BASELINE = "plain_eager"
# (model, method) -> {"vs_plain_eager": min ratio, "vs_plain_compiled": min ratio, "memory_ratio": max ratio};
# "*" matches every method / model. Checked per fastkd record, reported, never asserted by tests.
TARGETS = {
    ("demo", "moma"): {"vs_plain_eager": 1.2}, ("demo", "hybrid_distill"): {"vs_plain_eager": 1.2},
    ("vits224", "moma"): {"vs_plain_eager": 1.05},
    ("vits224", "hybrid_distill"): {"vs_plain_eager": 1.05, "memory_ratio": 0.9},
    ("*", "*"): {"vs_plain_compiled": 1.0},
}
FUSED_OPS = ("feature_align", "token_relation", "gather_tokens", "ema_")
PHASE_COLUMNS = ("teacher_fwd", "student_fwd", "backward", "optimizer", "after_step", "data", "other", "fused_ops")
TEACHER_RANGE = "fastkd/teacher_forward"
VIT = "vit_tiny_patch16_224"
IMG_SIZE = 64
TOTAL_STEPS = 1000
TOP_OPS = 5
PROFILED_STEPS = 3


# The demo's teachers (configs/demo/resmoco.yaml, mae.yaml): 32 px, patch 8, 96-d x 4 blocks.
DEMO_TEACHER = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3)
# model -> (student / teacher arch, its kwargs, image size, default batch)
VIT_MODELS = {
    "vit64": (VIT, dict(img_size=IMG_SIZE, patch_size=8, embed_dim=192, depth=4, num_heads=3), IMG_SIZE, 64),
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
    """Two randomly initialised teachers in fastkd's checkpoint format (a contrastive and a masked
    image modelling stand-in); their paths."""
    paths = []
    for seed, name in enumerate(("contrastive", "mim")):
        torch.manual_seed(100 + seed)
        paths.append(str(save_backbone(build_backbone(arch, **teacher_kwargs), root / f"{name}.pt")))
    return paths


def method_config(name: str, teachers: list[str], model: str, batch_size: int) -> tuple[dict, dict]:
    """``(method config, recipe overrides)`` of method ``name`` as ``configs/demo/<name>.yaml``
    trains it in ``make demo`` (heads, schedules, recipe options), its frozen teachers replaced by
    ``teachers`` (random weights, one each in turn). For a ``--model`` of :data:`VIT_MODELS`
    every backbone spec of the config takes that ViT's architecture and shape, and the recipe's
    image sizes scale to its input size."""
    path = demo_config_dir() / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"the demo config {path} is missing from the fastkd installation")
    run = load_config(path, [f"data.batch_size={batch_size}"])
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


def synthetic_batch(recipe: str, overrides: dict, batch_size: int, device: str, seed: int = 0) -> Batch:
    """Random normalised images with the view shapes of ``build_recipe(recipe, **overrides)``."""
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch_size, 3, spec.size, spec.size, generator=generator).to(device)
             for spec in build_recipe(recipe, **overrides).views]
    return Batch(views, torch.full((batch_size,), -1, dtype=torch.long, device=device),
                 torch.arange(batch_size, device=device))


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def plain_step(method, batch: Batch, *, device: str, compile_backend: str | None) -> Callable[[], None]:
    """One hand-written training step per call: plain ops, single-tensor AdamW, per-step host
    syncs; with ``compile_backend`` the method runs under ``torch.compile``."""
    optimiser = torch.optim.AdamW(method.param_groups(0.05), lr=1e-4, foreach=False, fused=False)
    params = [p for group in optimiser.param_groups for p in group["params"]]
    forward = method if compile_backend is None else torch.compile(method, backend=compile_backend)
    state = {"step": 0}

    def step() -> None:
        with reference_ops(True):
            with _autocast(device), record_function(PHASES["forward"]):
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


def fastkd_step(method, batch: Batch, *, device: str, workdir: Path, compile_backend: str | None) -> Callable[[], None]:
    """One ``Trainer.train_step`` per call, the trainer as shipped (its defaults; with
    ``compile_backend`` ``train.compile: true`` on that backend), precision matched to the plain
    variants."""
    compiled = {} if compile_backend is None else {"compile": True, "compile_backend": compile_backend}
    train = TrainConfig(device=device, precision="bf16" if device == "cuda" else "fp32", epochs=1,
                        output_dir=str(workdir), progress=False, tensorboard=False, **compiled)
    trainer = Trainer(method, [batch] * TOTAL_STEPS, batch_size=int(batch.views[0].shape[0]), train=train,
                      optim=OptimConfig())
    batches = itertools.repeat(batch)
    state = {"step": 0}

    def step() -> None:
        trainer.train_step(batches, state["step"] % trainer.total_steps)
        state["step"] += 1

    step.teacher_precision = trainer.teacher_precision
    return step


def step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step`` counted by ``FlopCounterMode`` (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


@contextlib.contextmanager
def teacher_ranges(method: nn.Module):
    """Profiler range ``TEACHER_RANGE`` around every ``forward`` / ``forward_features`` call of the
    method's teachers: the outermost modules whose parameters are all frozen (frozen and EMA
    teachers) and their sub-modules two levels down (methods call a teacher's parts directly, e.g.
    ``teachers["a"].module.thead``; nested ranges are counted once). The wrappers are instance
    attributes, removed on exit."""
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

    wrapped = []
    for module in selected:
        for attribute in ("forward", "forward_features"):
            if callable(getattr(module, attribute, None)) and attribute not in vars(module):
                setattr(module, attribute, in_range(getattr(module, attribute)))
                wrapped.append((module, attribute))
    try:
        yield
    finally:
        for module, attribute in wrapped:
            delattr(module, attribute)


def profile_step(step: Callable[[], None], method: nn.Module, device: str, *, split_teachers: bool,
                 steps: int = PROFILED_STEPS) -> dict:
    """Where a step's time goes: ``steps`` steps profiled one by one, the one with the median wall
    time kept (one step alone is at the mercy of a scheduler hiccup); see :func:`profile_once`."""
    profiles = sorted((profile_once(step, method, device, split_teachers=split_teachers) for _ in range(steps)),
                      key=lambda p: p["profiled_ms"])
    return profiles[len(profiles) // 2]


def profile_once(step: Callable[[], None], method: nn.Module, device: str, *, split_teachers: bool) -> dict:
    """One profiled step: the phases (ms, see the module docstring), ``fused_ops_share``,
    ``fused_ops_called`` and the ``top_ops`` by self time (CPU time on CPU, kernel time on CUDA for
    ops; phases are host-side ranges, the device synchronised around the step)."""
    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with teacher_ranges(method) if split_teachers else contextlib.nullcontext():
        with profile(activities=activities) as prof:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - start) * 1e3
    ranges = {name: 0.0 for name in (*PHASES.values(), TEACHER_RANGE)}
    fused_us, called = 0.0, set()
    for event in prof.events():
        called.update(op for op in FUSED_OPS if event.name.startswith(f"fastkd::{op}"))
        parents = []
        parent = event.cpu_parent
        while parent is not None:
            parents.append(parent.name)
            parent = parent.cpu_parent
        if event.name in ranges and event.name not in parents:
            ranges[event.name] += event.cpu_time_total / 1e3
        if event.name.startswith("fastkd::") and not any(p.startswith("fastkd::") for p in parents):
            fused_us += event.device_time_total if cuda else event.cpu_time_total
    forward = ranges[PHASES["forward"]]
    phases = {
        "teacher_fwd": ranges[TEACHER_RANGE] if split_teachers else None,
        "student_fwd": forward - ranges[TEACHER_RANGE] if split_teachers else forward,
        "backward": ranges[PHASES["backward"]], "optimizer": ranges[PHASES["optimizer"]],
        "after_step": ranges[PHASES["after_step"]], "data": ranges[PHASES["data"]],
    }
    phases["other"] = max(0.0, wall_ms - sum(v for v in phases.values() if v is not None))
    phases["fused_ops"] = fused_us / 1e3
    self_us = (lambda a: a.self_device_time_total) if cuda else (lambda a: a.self_cpu_time_total)
    averages = [a for a in prof.key_averages() if not a.key.startswith("fastkd/")]
    averages = sorted(averages, key=self_us, reverse=True)[:TOP_OPS]
    return {
        "profiled_ms": wall_ms,
        **{f"{name}_ms": value for name, value in phases.items()},
        "fused_ops_share": fused_us / 1e3 / wall_ms,
        "fused_ops_called": sorted(called),
        "top_ops": [{"op": a.key, "self_ms": self_us(a) / 1e3, "calls": a.count} for a in averages],
    }


def targets_for(model: str, method: str) -> dict:
    """The targets of ``TARGETS`` that apply to ``method`` at ``model``."""
    out = {}
    for (m_model, m_method), target in TARGETS.items():
        if m_model in ("*", model) and m_method in ("*", method):
            out.update(target)
    return out


def describe_target(target: dict) -> str:
    parts = [f"{key} >= {value}x" for key, value in target.items() if key.startswith("vs_")]
    if "memory_ratio" in target:
        parts.append(f"memory <= {target['memory_ratio']}x plain_eager")
    return ", ".join(parts)


def bench_method(name: str, config: dict, recipe_overrides: dict, *, model: str, batch_size: int, device: str,
                 repeats: int, rounds: int, variants: tuple[str, ...], compile_backend: str,
                 workdir: Path) -> list[dict]:
    """Every variant of method ``name`` built from ``config``: one record each."""
    steps, methods, compile_s, recipe, views = {}, {}, {}, None, None
    for variant in variants:
        torch.manual_seed(0)
        method = build_method(name, config).to(device).train()
        recipe = method.recipe
        batch = synthetic_batch(recipe, recipe_overrides, batch_size, device)
        views = [v.shape[-1] for v in batch.views]
        if variant.startswith("fastkd"):
            steps[variant] = fastkd_step(method, batch, device=device, workdir=workdir / name / variant,
                                         compile_backend=compile_backend if variant == "fastkd_compiled" else None)
        else:
            steps[variant] = plain_step(method, batch, device=device,
                                        compile_backend=compile_backend if variant == "plain_compiled" else None)
        methods[variant] = method
        start = time.perf_counter()
        steps[variant]()  # warm-up; compiles the compiled variant
        compile_s[variant] = time.perf_counter() - start
    timings = time_alternating(steps, rounds=rounds, repeats=repeats, device=device)
    peaks = {variant: peak_memory_bytes(step, device=device) for variant, step in steps.items()}
    eager = [v for v in variants if not v.endswith("compiled")]  # FlopCounterMode cannot run compiled code
    flops = step_flops(steps[eager[0]]) if eager else None
    profiles = {variant: profile_step(step, methods[variant], device, split_teachers=variant != "plain_compiled")
                for variant, step in steps.items()}
    peak = gpu_peak() if device == "cuda" else None
    records = []
    for variant in variants:
        t = timings[variant]
        record = {
            "method": name, "variant": variant, "model": model, "recipe": recipe, "views": views,
            "batch": batch_size, "img_size": views[0], "device": device,
            "dtype": "bf16 autocast" if device == "cuda" else "fp32",
            "teacher_dtype": (getattr(steps[variant], "teacher_precision", "bf16" if device == "cuda" else "fp32")
                              if getattr(methods[variant], "frozen_teachers", ()) else "no frozen teacher"),
            "median_ms": t["median_ms"], "p10_ms": t["p10_ms"], "p90_ms": t["p90_ms"], "repeats": t["repeats"],
            "steps_per_s": 1e3 / t["median_ms"], "images_per_s": batch_size * 1e3 / t["median_ms"],
            "peak_MiB": peaks[variant] / 2**20,
            "warmup_s": compile_s[variant],
            **({"compile_backend": compile_backend} if variant.endswith("compiled") else {}),
            **profiles[variant],
        }
        record.update(speed_ratios({v: timings[v]["median_ms"] for v in timings}, variant))
        if BASELINE in peaks and peaks[BASELINE]:
            record["memory_ratio"] = peaks[variant] / peaks[BASELINE]
        if flops:
            record["gflop_per_step"] = flops / 1e9
            record["achieved_GFLOPs"] = flops / (t["median_ms"] / 1e3) / 1e9
            record["vs_peak_bf16"] = fraction_of_peak(record["achieved_GFLOPs"] / 1e3,
                                                      peak and peak["peak_bf16_TFLOPs"], device)
        judge(record)
        records.append(record)
    return records


def one_run_per_method(runs: list[list[dict]]) -> list[dict]:
    """The published rows of ``runs`` (each a list of records, an error record ``{"method", "error"}``
    for a method that failed): per method, all its rows from one run, the one (of the runs where it
    did not fail) whose ``fastkd`` row (else the first row with a ``vs_plain_eager``) has the lowest
    ``vs_plain_eager``; each row gets ``run`` (1-based) and ``<ratio>_runs``, that ratio in every run
    where the row exists. A method that failed in every run keeps run 1's error record."""
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
    """``vs_plain_eager`` / ``vs_plain_compiled`` of ``variant``: that baseline's median step time over
    ``variant``'s, both from ``medians`` (variant -> ms, one run's)."""
    return {f"vs_{other}": medians[other] / medians[variant] for other in ("plain_eager", "plain_compiled")
            if other in medians}


def judge(record: dict) -> None:
    """Set ``target`` and ``meets_target`` of a fastkd record from its ratios and :data:`TARGETS`."""
    if not record["variant"].startswith("fastkd"):
        return
    target = {k: v for k, v in targets_for(record["model"], record["method"]).items() if k in record}
    record["target"] = describe_target(target)
    record["meets_target"] = all(record[key] <= value if key == "memory_ratio" else record[key] >= value
                                 for key, value in target.items())


def phase_table(records: list[dict]) -> str:
    """Markdown: per method and variant, the profiled step's milliseconds per phase."""
    rows = [{"method": r["method"], "variant": r["variant"], "step_ms": r["profiled_ms"],
             **{name: r[f"{name}_ms"] for name in PHASE_COLUMNS}} for r in records]
    return markdown_table(rows, ["method", "variant", "step_ms", *PHASE_COLUMNS])


def where_time_goes(records: list[dict]) -> str:
    """Markdown: for each method whose fastkd variant misses a target, the phase that differs most
    from the baseline it misses and the top ops of both."""
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
    parser = bench_parser(__doc__, "batch 8, demo shapes, one timed round of 3 steps, compiled on aot_eager",
                          rounds_help="alternating timing rounds (default 5, --quick 1)",
                          runs_help="measure everything this many times; each method's rows come from the run "
                                    "with its fastkd row's lowest vs_plain_eager (default 1)")
    parser.add_argument("--methods", nargs="+", choices=demo_methods(), default=None,
                        help="default: every method (vits224 / vitb224: moma and hybrid_distill, the targets)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default: the model's)")
    parser.add_argument("--model", choices=MODELS, default="demo",
                        help="demo: each method exactly as configs/demo/ trains it in make demo (default); "
                             "vit64 / vits224 / vitb224: ViT students and teachers of that size")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of plain_compiled (default inductor, --quick aot_eager)")
    args = parse_bench_args(parser, argv)
    load, (cpu, isa) = load_average(), cpu_info()
    default_batch = 64 if args.model == "demo" else VIT_MODELS[args.model][3]
    batch_size = args.batch if args.batch is not None else (8 if args.quick else default_batch)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    compile_backend = args.compile_backend or ("aot_eager" if args.quick else "inductor")
    methods = args.methods or (list(METHODS) if args.model in ("demo", "vit64") else ["moma", "hybrid_distill"])
    variants = tuple(v for v in VARIANTS if v in args.variants)
    if batch_size < 2:
        raise SystemExit(f"--batch must be >= 2 (batch-norm projectors), got {batch_size}")
    model = "demo" if args.quick else args.model
    runs: list[list[dict]] = []
    for run in range(args.runs):
        records: list[dict] = []
        with tempfile.TemporaryDirectory(prefix="fastkd-bench-e2e-") as tmp:
            arch, teacher_kwargs = (VIT, DEMO_TEACHER) if model == "demo" else VIT_MODELS[model][:2]
            teachers = write_teachers(Path(tmp), arch, teacher_kwargs)
            for name in methods:
                try:
                    config, recipe_overrides = method_config(name, teachers, model, batch_size)
                    records += bench_method(name, config, recipe_overrides, model=model, batch_size=batch_size,
                                            device=args.device, repeats=3, rounds=rounds, variants=variants,
                                            compile_backend=compile_backend, workdir=Path(tmp) / str(run))
                except Exception as error:  # noqa: BLE001 - one broken method is reported, the others still run
                    traceback.print_exc()
                    records.append({"method": name, "error": f"{type(error).__name__}: {error}"})
        runs.append(records)
    records = one_run_per_method(runs)
    ok = [r for r in records if "error" not in r]
    columns = ["method", "variant", "run", "teacher_dtype", "images_per_s", "median_ms", "p10_ms", "p90_ms", "peak_MiB", "vs_plain_eager",
               "vs_plain_compiled", "memory_ratio", "warmup_s", "achieved_GFLOPs", "vs_peak_bf16", "fused_ops_share",
               "target", "meets_target", "error"] + (["vs_plain_eager_runs", "vs_plain_compiled_runs"] if args.runs > 1 else [])
    shapes = ("the demo's models (configs/demo/: 32 px, patch 8, 64-96-d x 4 blocks)" if model == "demo"
              else f"{VIT_MODELS[model][0]} students and teachers at {VIT_MODELS[model][2]} px")
    markdown = (
        f"## End-to-end training step ({args.device}, {torch.get_num_threads()} threads, {shapes}, batch {batch_size})"
        f"\n\nMachine load average at the start (1 / 5 / 15 min): {load}. CPU: {cpu} (ISA: {' '.join(isa) or 'unknown'})."
        f" Compiled variant: {compile_backend}."
        + (f" {args.runs} runs: each method's rows all come from one run (the run column), the one in which its "
           "fastkd row's vs_plain_eager is lowest, so every ratio is that run's plain_eager / plain_compiled median "
           "over the row's own median (every run's ratios in the *_runs columns; phases and top ops: that run)."
           if args.runs > 1 else "")
        + f"\n\n{markdown_table(records, columns)}\n\n"
        "vs_X = X's step time / this variant's (higher is faster); memory_ratio = peak / plain_eager's peak; "
        "warmup_s = the first step (compilation included for plain_compiled); vs_peak_bf16 = achieved FLOP rate / "
        "the GPU's dense bf16 peak (a GPU-only figure)."
        f"\n\n## Where a step's time goes (ms, the median of three profiled steps)\n\n{phase_table(ok)}\n\n"
        "teacher_fwd: frozen and EMA teachers' forward; student_fwd: the rest of the forward; optimizer: clipping, "
        "the optimiser and plain_eager's per-step host syncs; after_step: EMA updates and schedules; fused_ops: "
        "time inside fastkd's ops (part of forward and backward). A compiled forward shows no teacher split."
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
