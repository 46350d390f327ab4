"""Data pipeline throughput: images/s per recipe, DALI pipeline vs the PyTorch DataLoader + PIL
baseline at equal worker/thread counts, side by side in one run.

Data: scikit-image's sample photos, randomly cropped, flipped and re-encoded as ~500x375 JPEGs
(quality 90, ImageNet-like). One epoch per recipe and backend is timed after a warm-up epoch;
``ratio`` = DALI images/s / DataLoader images/s. ``--device cuda``: DALI's GPU pipeline (``mixed``
decoding) against a DataLoader whose batches are copied to the GPU; on CPU its CPU-only pipeline.

    fastkd bench data [--quick] [--device cpu|cuda] [--workers 2]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import lowest_of_runs, time_fn
from fastkd.data import build_loader
from fastkd.reporting import load_average, markdown_table, write_results

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "camera", "brick", "grass", "gravel", "moon", "coins")
RECIPES = ("mocov3", "dino_multicrop", "mae", "eval")


def write_photo_dataset(root: Path, images: int, seed: int = 0) -> Path:
    """``images`` JPEGs in ``root/<photo name>/``: random 70-100 % crops of the scikit-image photos,
    randomly flipped, resized to 500x375 (every fourth one 375x500)."""
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS}
    for index in range(images):
        name = PHOTOS[index % len(PHOTOS)]
        photo = photos[name]
        scale = rng.uniform(0.7, 1.0)
        w, h = int(photo.width * scale), int(photo.height * scale)
        x, y = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        image = photo.crop((x, y, x + w, y + h)).resize((375, 500) if index % 4 == 3 else (500, 375), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        (root / name).mkdir(parents=True, exist_ok=True)
        image.save(root / name / f"{index:05d}.jpg", quality=90)
    return root


def images_per_second(root: Path, recipe: str, backend: str, *, batch_size: int, workers: int, device: str,
                      repeats: int) -> tuple[float, dict]:
    """``(images/s, timing)`` of whole epochs of ``build_loader(root, recipe, backend=backend)``."""
    loader = build_loader(root, recipe, batch_size=batch_size, backend=backend, device=device, num_workers=workers)
    images = len(loader) * batch_size

    def epoch():
        for batch in loader:
            batch.views[-1].sum().item()  # wait for the batch on the device

    timing = time_fn(epoch, repeats=repeats, warmup=1)
    return images / (timing["median_ms"] / 1e3), timing


def main(argv=None) -> None:
    parser = bench_parser(__doc__.splitlines()[0], "fewer images and one repeat",
                          runs_help="measure every recipe this many times and keep its lowest ratio (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = DALI threads")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    args = parse_bench_args(parser, argv)
    load = load_average()
    images, batch_size, repeats = (64, 16, 1) if args.quick else (256, 32, 2)
    dali_backend = "dali" if args.device == "cuda" else "dali_cpu"
    common = dict(batch_size=batch_size, workers=args.workers, device=args.device, repeats=repeats)
    runs = []
    with tempfile.TemporaryDirectory(prefix="fastkd-bench-data-") as tmp:
        root = write_photo_dataset(Path(tmp), images)
        for _ in range(args.runs):
            runs.append([])
            for recipe in args.recipes:
                torch_rate, torch_timing = images_per_second(root, recipe, "torch", **common)
                dali_rate, dali_timing = images_per_second(root, recipe, dali_backend, **common)
                runs[-1].append({"recipe": recipe, "images": images, "batch_size": batch_size, "workers": args.workers,
                                 "device": args.device, "torch_img_s": torch_rate, "dali_img_s": dali_rate,
                                 "ratio": dali_rate / torch_rate, "torch_timing": torch_timing,
                                 "dali_timing": dali_timing})
    records = lowest_of_runs(runs, ("recipe",), "ratio")  # the ratio that survives a re-run
    columns = ["recipe", "workers", "torch_img_s", "dali_img_s", "ratio"] + (["ratio_runs"] if args.runs > 1 else [])
    runs_text = "" if args.runs == 1 else f" The lowest ratio of {args.runs} runs per recipe (all in `ratio_runs`)."
    markdown = (
        f"## Data pipeline throughput ({args.device}, ~500x375 JPEG photos, batch {batch_size})\n\n"
        + f"Machine load average at the start (1 / 5 / 15 min): {load or 'unknown'}.{runs_text}\n\n"
        + markdown_table(records, columns)
        + "\n\nratio = DALI / DataLoader images per second (target >= 1.2 for mocov3)."
    )
    write_results("bench_data", records, markdown, out_dir=args.out)
    print(markdown)


if __name__ == "__main__":
    main()
