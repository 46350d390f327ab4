"""The end-to-end demo on the built-in sample data: ``make demo`` / ``python -m fastkd.demo``.

It writes the sample dataset (``<out>/data/train``: ``--images`` images, seed 0; the held-out ``<out>/data/val``:
``--val-images`` other images of the same 12 classes, seed 1), pre-trains tiny ``resmoco`` and ``mae`` teachers, distils
random students from both with ``moma`` and ``hybrid_distill``, scores weighted k-NN (k=20, T=0.07; train split = memory
bank) of each teacher, student and student's random initialisation (built with the run's seed, before any step), and
writes a table to ``demo.md``, ``demo.json`` and ``demo.png`` in ``<out>``.

Every run is a YAML of ``configs/demo/`` (package data of ``fastkd.configs``) with the demo's paths
as overrides, trained by ``fastkd.runner.train_from_config`` as ``fastkd pretrain`` / ``distill``
do; a new demo run replaces the last one's folders. ``--quick`` is a smoke run (tens of images, two
steps per run); a full run exits 1 when a student misses ``MIN_MARGIN_POINTS``.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastkd.checks import check_bool, check_number
from fastkd.configs import demo_config_dir

DEFAULT_CONFIG_DIR = demo_config_dir()  # configs/demo/ of the checkout, installed as package data
VAL_SEED = 1
QUICK_IMAGES = 72
QUICK_VAL_IMAGES = 36
QUICK_OVERRIDES = ("train.max_steps=2", "data.batch_size=16", "data.num_workers=0", "train.progress=false",
                   "train.tensorboard=false")


@dataclass(frozen=True)
class Stage:
    """One training run: ``configs/demo/<method>.yaml`` into ``<out>/<name>``; ``teachers`` maps a
    teacher of the method (``method.teachers.<role>``) to the stage whose ``student.pt`` it loads."""

    name: str
    method: str
    label: str
    short: str
    role: str
    teachers: dict = field(default_factory=dict)


STAGES = (
    Stage("resmoco_teacher", "resmoco", "resmoco teacher", "resmoco", "teacher"),
    Stage("mae_teacher", "mae", "MAE teacher", "MAE", "teacher"),
    Stage("moma_both", "moma", "MOMA student (both teachers)", "MOMA", "student",
          {"mocov3": "resmoco_teacher", "mae": "mae_teacher"}),
    Stage("hybrid_distill", "hybrid_distill", "Hybrid Distill student", "Hybrid Distill", "student",
          {"feature": "resmoco_teacher", "relation": "mae_teacher"}),
)
# The margin the demo promises: every distilled student's k-NN top-1 at least this many points
# above its random initialisation's. With 600 held-out images the standard error of one accuracy
# near 30-70% is about 2 points, so 10 points is over 3 standard errors of the difference.
MIN_MARGIN_POINTS = 10.0
COLUMNS = ["model", "method", "k-NN top-1 (%)", "k-NN top-5 (%)", "vs random init", "train steps", "train time (s)"]


class _Clock:
    """Wall time and CPU time (user + system of this process and its finished children, e.g.
    data-loader workers) since construction."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), self._cpu()

    @staticmethod
    def _cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def elapsed(self) -> dict:
        return {"wall_s": time.perf_counter() - self.wall, "cpu_s": self._cpu() - self.cpu}


def write_splits(data_dir: Path, images: int, val_images: int) -> tuple[Path, Path]:
    """Fresh ``data_dir/train`` (seed 0) and ``data_dir/val`` (seed ``VAL_SEED``) sample splits."""
    from fastkd.data import write_sample_dataset

    for split in ("train", "val"):
        shutil.rmtree(data_dir / split, ignore_errors=True)  # a smaller --images than last time must not keep old files
    return (write_sample_dataset(data_dir / "train", images=images, seed=0),
            write_sample_dataset(data_dir / "val", images=val_images, seed=VAL_SEED))


def stage_config(stage: Stage, config_dir: Path, out: Path, train_dir: Path, extra: tuple[str, ...] = ()):
    """The validated run config of ``stage`` with the demo's paths (and ``extra`` overrides)."""
    from fastkd.config import load_config

    overrides = [f"data.source={train_dir}", f"train.output_dir={out / stage.name}"]
    overrides += [f"method.teachers.{role}.path={out / teacher / 'student.pt'}"
                  for role, teacher in stage.teachers.items()]
    return load_config(config_dir / f"{stage.method}.yaml", overrides + list(extra))


def random_init_student(config) -> torch.nn.Module:
    """The student of ``config``'s method as the runner builds it (same seed), before any step."""
    from fastkd.methods import build_method
    from fastkd.train.rng import seed_everything

    seed_everything(config.train.seed)
    return build_method(config.method_name, config.method_config).student


def knn_row(model: torch.nn.Module, config, train_dir: Path, val_dir: Path) -> dict:
    """k-NN top-1 / top-5 of ``model`` at the image size ``config`` trains with."""
    from fastkd.eval import evaluate_knn

    size = config.data.recipe_options.get("size")
    if not isinstance(size, int):
        raise ValueError(f"the demo config of {config.train.output_dir} must set data.recipe_options.size (an int), "
                         f"got {size!r}")
    result = evaluate_knn(model, train_dir, val_dir, image_size=size, batch_size=config.data.batch_size,
                          num_workers=config.data.num_workers)
    return {"k-NN top-1 (%)": result.top1, "k-NN top-5 (%)": result.top5}


def plot_accuracies(rows: list[dict], path: Path) -> Path:
    """Horizontal bars of every row's k-NN top-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"random init": "#9e9e9e", "teacher": "#1f77b4", "student": "#ff7f0e"}
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.2))
    positions = range(len(rows))[::-1]
    values = [row["k-NN top-1 (%)"] for row in rows]
    ax.barh(list(positions), values, color=[colours[row["role"]] for row in rows])
    for y, value in zip(positions, values):
        ax.text(value + 0.5, y, f"{value:.1f}", va="center", fontsize=9)
    ax.set_yticks(list(positions), [row["model"] for row in rows])
    ax.set(xlim=(0, 100), xlabel="weighted k-NN top-1 on the held-out split (%)",
           title="fastkd demo: sample dataset, 12 classes")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_demo(out: str | Path = "demo_out", *, images: int = 2000, val_images: int = 600, quick: bool = False,
             config_dir: str | Path = DEFAULT_CONFIG_DIR) -> dict:
    """Run the whole demo; returns the summary written to ``<out>/demo.json``."""
    from fastkd.eval import load_eval_model
    from fastkd.reporting import machine_info, markdown_table, write_report
    from fastkd.runner import STUDENT_FILE, train_from_config

    check_number("images", images, low=12, integer=True)  # one image per class at least
    check_number("val_images", val_images, low=12, integer=True)
    check_bool("quick", quick)
    out, config_dir = Path(out), Path(config_dir)
    missing = [f"{stage.method}.yaml" for stage in STAGES if not (config_dir / f"{stage.method}.yaml").is_file()]
    if missing:
        raise ValueError(f"config_dir {str(config_dir)!r} lacks the demo configs {', '.join(missing)}")
    extra = QUICK_OVERRIDES if quick else ()
    total, timings = _Clock(), {}

    clock = _Clock()
    train_dir, val_dir = write_splits(out / "data", images, val_images)
    timings["data"] = clock.elapsed()
    print(f"[demo] sample dataset: {images} train images in {train_dir}, {val_images} held-out in {val_dir}",
          flush=True)

    configs, results = {}, {}
    for stage in STAGES:
        shutil.rmtree(out / stage.name, ignore_errors=True)  # the demo starts every run afresh
        config = configs[stage.name] = stage_config(stage, config_dir, out, train_dir, extra)
        print(f"[demo] training {stage.label} ({config.method_name}, {config_dir / (stage.method + '.yaml')})",
              flush=True)
        clock = _Clock()
        results[stage.name] = train_from_config(config)
        timings[stage.name] = clock.elapsed()
        if results[stage.name].preempted:
            raise RuntimeError(f"the {stage.label} run was interrupted; run the demo again")

    clock = _Clock()
    rows, margins = [], {}
    for stage in STAGES:
        config, result = configs[stage.name], results[stage.name]
        if stage.role == "student":
            baseline = {"model": f"random init ({stage.short} student)", "method": "-", "role": "random init",
                        "train steps": 0, "train time (s)": 0.0,
                        **knn_row(random_init_student(config).eval(), config, train_dir, val_dir)}
            rows.append(baseline)
        row = {"model": stage.label, "method": config.method_name, "role": stage.role, "train steps": result.step,
               "train time (s)": timings[stage.name]["wall_s"],
               **knn_row(load_eval_model(out / stage.name / STUDENT_FILE), config, train_dir, val_dir)}
        if stage.role == "student":
            margins[stage.short] = row["k-NN top-1 (%)"] - baseline["k-NN top-1 (%)"]
            row["vs random init"] = f"{margins[stage.short]:+.1f}"
        rows.append(row)
    timings["knn_eval"] = clock.elapsed()
    timings["total"] = total.elapsed()

    table = markdown_table(rows, COLUMNS)
    margin_met = all(margin >= MIN_MARGIN_POINTS for margin in margins.values())
    verdict = (f"Margin over random init: {', '.join(f'{name} {m:+.1f}' for name, m in margins.items())} points "
               f"(promised >= +{MIN_MARGIN_POINTS:.0f}): {'met' if margin_met else 'NOT met'}"
               + (" (--quick: two steps per run, accuracies not meaningful)." if quick else "."))
    footer = (f"{images} train / {val_images} held-out images, 12 classes (chance 8.3%); k-NN k=20, T=0.07. "
              f"Total {timings['total']['wall_s']:.0f} s wall, {timings['total']['cpu_s']:.0f} s CPU "
              f"on {torch.get_num_threads()} torch threads.\n\n{verdict}")
    summary = {"quick": quick, "margin": {"points": margins, "min_points": MIN_MARGIN_POINTS, "met": margin_met},
               "images": {"train": images, "val": val_images}, "rows": rows, "timings": timings,
               "machine": machine_info(), "configs": {n: c.to_dict() for n, c in configs.items()}}
    write_report(out, "demo", summary, table + "\n\n" + footer)
    plot_accuracies(rows, out / "demo.png")
    print("\n" + table + "\n\n" + footer, flush=True)
    print(f"[demo] wrote {out / 'demo.md'}, {out / 'demo.json'}, {out / 'demo.png'}", flush=True)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastkd.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    parser.add_argument("--images", type=int, help="training images (default 2000; --quick: %d)" % QUICK_IMAGES)
    parser.add_argument("--val-images", type=int, help="held-out images (default 600; --quick: %d)" % QUICK_VAL_IMAGES)
    parser.add_argument("--quick", action="store_true", help="smoke run: few images, two steps per training run")
    parser.add_argument("--configs", default=str(DEFAULT_CONFIG_DIR), help="folder of the demo YAMLs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    images = args.images if args.images is not None else (QUICK_IMAGES if args.quick else 2000)
    val_images = args.val_images if args.val_images is not None else (QUICK_VAL_IMAGES if args.quick else 600)
    summary = run_demo(args.out, images=images, val_images=val_images, quick=args.quick, config_dir=args.configs)
    if not args.quick and not summary["margin"]["met"]:
        print(f"[demo] a distilled student beat its random init by less than {MIN_MARGIN_POINTS:.0f} points; "
              "see the table above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
