"""build_loader on the CPU device, both backends: views, normalisation, frequencies, sharding, bad files."""

import dataclasses
import multiprocessing
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fastkd.data import Batch, build_loader, build_recipe
from fastkd.data.recipes import IMAGENET_MEAN, IMAGENET_STD, Recipe

BACKENDS = ["dali", "torch"]
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _loader(root, recipe, backend, **kwargs):
    kwargs.setdefault("batch_size", 4)
    return build_loader(root, recipe, backend=backend, num_workers=1 if backend == "dali" else 0, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "recipe, overrides, sizes",
    [
        ("mocov3", {}, [224, 224]),
        ("dino_multicrop", {"local_crops": 3}, [224, 224, 96, 96, 96]),
        ("mae", {}, [224]),
        ("eval", {}, [224]),
    ],
)
def test_recipe_views(tiny_folder, backend, recipe, overrides, sizes):
    loader = _loader(tiny_folder, recipe, backend, **overrides)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    batch = batches[0]
    assert isinstance(batch, Batch) and [v.shape[-1] for v in batch.views] == sizes
    for view in batch.views:
        assert view.dtype == torch.float32 and view.device.type == "cpu" and view.shape[:2] == (4, 3)
        pixels = view * STD + MEAN
        assert pixels.min() >= -0.01 and pixels.max() <= 1.01  # normalised from [0, 1]
    assert batch.labels.dtype == batch.indices.dtype == torch.int64
    assert batch.labels.tolist() == [i // 5 for i in batch.indices.tolist()]
    if len(batch.views) > 1:
        assert not torch.allclose(batch.views[0], batch.views[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_normalisation_is_exact(tmp_path, backend):
    root = tmp_path / "solid"
    (root / "a").mkdir(parents=True)
    colour = (200, 100, 50)
    Image.new("RGB", (40, 30), colour).save(root / "a" / "x.png")
    (view,) = next(iter(_loader(root, "eval", backend, batch_size=1, size=16, resize=20))).views
    expected = (torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1) / 255 - MEAN) / STD
    torch.testing.assert_close(view, expected.expand(1, 3, 16, 16), atol=1e-5, rtol=0)


def _frequency_recipe(copies: int) -> Recipe:
    """mocov3's second view with its flip and grayscale probabilities, no other randomness."""
    spec = build_recipe("mocov3").views[1]
    fixed = dataclasses.replace(spec, size=16, scale=None, resize=16, jitter=None, blur_p=0.0, solarize_p=0.0)
    return Recipe("frequency", (fixed,) * copies)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flip_and_grayscale_frequencies(tiny_folder, backend):
    recipe = _frequency_recipe(copies=40)
    plain = dataclasses.replace(recipe.views[0], flip_p=0.0, grayscale_p=0.0)
    batch = next(iter(_loader(tiny_folder, recipe, backend, batch_size=10)))
    reference = next(iter(_loader(tiny_folder, Recipe("plain", (plain,), shuffle=False), backend, batch_size=15)))
    ref = reference.views[0][batch.indices]  # unaugmented view of each image
    views = torch.stack(batch.views)  # [copies, B, 3, H, W]
    pixels = views * STD + MEAN
    gray = (pixels.amax(2) - pixels.amin(2)).amax((-2, -1)) < 3 / 255
    ref_gray = (ref * STD + MEAN).mul(torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    ref_gray = (ref_gray - MEAN) / STD
    target = torch.where(gray[..., None, None, None], ref_gray.expand_as(ref), ref)
    flipped = (views - target.flip(-1)).abs().mean((2, 3, 4)) < (views - target).abs().mean((2, 3, 4))
    n = gray.numel()
    for observed, p in ((gray.float().mean().item(), recipe.views[0].grayscale_p), (flipped.float().mean().item(), 0.5)):
        assert abs(observed - p) < 5 * (p * (1 - p) / n) ** 0.5, (observed, p, n)
    matched = torch.where(flipped[..., None, None, None], target.flip(-1), target)
    assert (views - matched).abs().amax() < 0.1  # every view is the image, possibly flipped and grey


@pytest.mark.parametrize("backend", BACKENDS)
def test_brightness_jitter_range_and_probability(tiny_folder, backend):
    jitter = build_recipe("mocov3").views[0].jitter
    spec = dataclasses.replace(_frequency_recipe(1).views[0], flip_p=0.0, grayscale_p=0.0)
    bright = dataclasses.replace(spec, jitter=dataclasses.replace(jitter, contrast=0.0, saturation=0.0, hue=0.0))
    batch = next(iter(_loader(tiny_folder, Recipe("bright", (bright,) * 20), backend, batch_size=15)))
    plain = next(iter(_loader(tiny_folder, Recipe("plain", (spec,), shuffle=False), backend, batch_size=15)))
    ref = (plain.views[0][batch.indices] * STD + MEAN).mean((1, 2, 3))
    ratio = (torch.stack(batch.views) * STD + MEAN).mean((2, 3, 4)) / ref  # [views, B]
    low, high = 1 - jitter.brightness, 1 + jitter.brightness
    assert ratio.min() > low - 0.02 and ratio.max() < high + 0.02
    changed = (ratio - 1).abs() > 0.005
    p = jitter.p * (1 - 0.01 / (high - low))  # a factor within 0.005 of 1 counts as unchanged
    n = changed.numel()
    assert abs(changed.float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_rank_shards_disjoint_and_complete(tiny_folder, backend):
    seen = []
    for rank in range(2):
        loader = _loader(tiny_folder, "mae", backend, rank=rank, world_size=2, drop_last=False, size=8)
        loader.set_epoch(1)
        indices = torch.cat([b.indices for b in loader]).tolist()
        assert len(loader) == 2
        seen.append(indices)
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(15))


@pytest.mark.parametrize("backend", BACKENDS)
def test_epochs_reshuffle_and_are_reproducible(tiny_folder, backend):
    def epoch_indices(loader, epoch):
        loader.set_epoch(epoch)
        return torch.cat([b.indices for b in loader]).tolist()

    loader = _loader(tiny_folder, "mae", backend, size=8, seed=3)
    first, second = epoch_indices(loader, 0), epoch_indices(loader, 1)
    assert first != second and len(first) == 12
    again = _loader(tiny_folder, "mae", backend, size=8, seed=3)
    views_a = [b.views[0] for b in again]
    views_b = [b.views[0] for b in _loader(tiny_folder, "mae", backend, size=8, seed=3)]
    assert epoch_indices(again, 0) == first
    assert all(torch.equal(a, b) for a, b in zip(views_a, views_b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_abandoned_epoch_restarts_cleanly(tiny_folder, backend):
    loader = _loader(tiny_folder, "mae", backend, size=8)
    next(iter(loader))
    assert len(list(loader)) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_file_is_named(tiny_folder, backend):
    (tiny_folder / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    loader = _loader(tiny_folder, "mae", backend, size=8, batch_size=16)
    with pytest.raises(ValueError, match="broken.jpg"):
        list(loader)
    exclude = ["class1/broken.jpg"]
    assert len(list(_loader(tiny_folder, "mae", backend, size=8, exclude=exclude))) == 3


def test_argument_errors(tiny_folder):
    with pytest.raises(ValueError, match="backend"):
        build_loader(tiny_folder, "mae", batch_size=2, backend="ffcv")
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(tiny_folder, "mae", batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        build_loader(tiny_folder, "mae", batch_size=2, rank=1)
    with pytest.raises(ValueError, match="device"):
        build_loader(tiny_folder, "mae", batch_size=2, device="meta")
    with pytest.raises(TypeError, match="local_crops"):
        build_loader(tiny_folder, "mae", batch_size=2, local_crops=4)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            build_loader(tiny_folder, "mae", batch_size=2, device="cuda")


def test_torch_backend_augmentations_do_not_depend_on_workers(tiny_folder):
    def views(workers):
        loader = build_loader(tiny_folder, "mocov3", batch_size=5, backend="torch", num_workers=workers, size=16)
        loader.set_epoch(2)
        return [torch.cat(b.views) for b in loader]

    assert all(torch.equal(a, b) for a, b in zip(views(0), views(2)))


def test_close_stops_workers_and_iteration_restarts(tiny_folder):
    loader = build_loader(tiny_folder, "eval", batch_size=5, backend="torch", num_workers=2, size=16)
    first = [b.indices for b in loader]
    assert len(multiprocessing.active_children()) >= 2  # persistent workers
    loader.close()
    assert multiprocessing.active_children() == []
    again = [b.indices for b in loader]  # new workers
    assert len(again) == len(first) and all(torch.equal(a, b) for a, b in zip(first, again))
    loader.close()


def test_interpreter_exits_with_workers_left_open(tiny_folder):
    """Workers ignore SIGTERM (a group signal must not kill them before the stop checkpoint), and
    ``multiprocessing`` ends daemonic children at exit with SIGTERM and waits: without fastkd's exit
    hook the interpreter would wait forever for a loader that was never closed."""
    script = (
        "from fastkd.data import build_loader\n"
        f"loader = build_loader({str(tiny_folder)!r}, 'eval', batch_size=5, backend='torch', num_workers=2, size=16)\n"
        "batches = iter(loader)\n"
        "next(batches)\n"
        "print('ready', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ready" in done.stdout, done.stderr
