"""The PyTorch view pipeline: a ``DataLoader`` decoding with PIL and applying torchvision transforms of the same
:class:`ViewSpec` s as DALI. Augmentations are a pure function of ``(seed, epoch, index)``, whatever the workers.

An undecodable image raises :class:`BadImageError`; with ``skip_bad_images`` it is dropped from its batch (an empty
batch is not yielded), counted in ``skipped_images`` and warned about once per file.
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # registers its exit hook now, so that fastkd's (below) runs before it
import signal
import sys
import weakref
from typing import NamedTuple

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from .batch import Batch
from .datasets import BadImageError, ImageList
from .recipes import IMAGENET_MEAN, IMAGENET_STD, Recipe, ViewSpec
from .sharding import EpochShard

_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


class GaussianBlurPIL:
    """PIL ``GaussianBlur(radius=sigma)`` with ``sigma ~ U(sigma_min, sigma_max)`` (MoCo v3's blur)."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        low, high = self.sigma
        return image.filter(ImageFilter.GaussianBlur(radius=low + (high - low) * torch.rand(()).item()))


def view_transform(spec: ViewSpec) -> T.Compose:
    """torchvision transform equal to ``spec`` (PIL RGB image -> normalised float ``[3, H, W]``)."""
    interpolation = _INTERPOLATION[spec.interpolation]
    if spec.scale is None:
        steps = [T.Resize(spec.resize, interpolation=interpolation), T.CenterCrop(spec.size)]
    else:
        steps = [T.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, interpolation=interpolation)]
    if spec.jitter is not None and spec.jitter.p > 0:
        j = spec.jitter
        steps.append(T.RandomApply([T.ColorJitter(j.brightness, j.contrast, j.saturation, j.hue)], p=j.p))
    if spec.grayscale_p > 0:
        steps.append(T.RandomGrayscale(p=spec.grayscale_p))
    if spec.blur_p > 0:
        steps.append(T.RandomApply([GaussianBlurPIL(spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        steps.append(T.RandomSolarize(128, p=spec.solarize_p))
    if spec.flip_p > 0:
        steps.append(T.RandomHorizontalFlip(p=spec.flip_p))
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


class BadImage(NamedTuple):
    """What :class:`ViewDataset` returns for an undecodable image when it skips bad images."""

    path: str
    reason: str


class ViewDataset(torch.utils.data.Dataset):
    """Item ``(epoch, i)`` -> ``(views, label, i)``, or a :class:`BadImage` when skipping bad images."""

    def __init__(self, images: ImageList, recipe: Recipe, seed: int, skip_bad_images: bool = False):
        self.images, self.seed, self.skip_bad_images = images, seed, skip_bad_images
        self.transforms = [view_transform(spec) for spec in recipe.views]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        path = self.images.files[index]
        try:
            with Image.open(path) as file:
                image = file.convert("RGB")
        except Exception as error:  # noqa: BLE001 - any decoder failure is reported with its file
            if self.skip_bad_images:
                return BadImage(path, f"{type(error).__name__}: {error}")
            raise BadImageError(f"cannot decode image {path!r} ({type(error).__name__}: {error}); run `fastkd data "
                                f"scan {self.images.root}` and pass its exclusion list as data.exclude=") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 2_147_483_647 + index) % 2**63)  # this sample's
            views = [transform(image) for transform in self.transforms]
        return views, self.images.labels[index], index


class _EpochBatches:
    """Batch sampler: the shard's batches of the current epoch as ``(epoch, index)`` items."""

    def __init__(self, shard: EpochShard):
        self.shard = shard

    def __iter__(self):
        for batch in self.shard.batches():
            yield [(self.shard.epoch, i) for i in batch]

    def __len__(self) -> int:
        return len(self.shard)


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers ignore SIGTERM / SIGINT sent to the whole process group (docker, Slurm, Kubernetes): the parent
    decides how to stop, and :func:`_stop_workers_at_exit` kills them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_WORKERS: "weakref.WeakSet[multiprocessing.Process]" = weakref.WeakSet()  # ignore SIGTERM


def _kill(processes) -> None:
    """SIGKILL (which they cannot ignore) and reap the live ones of ``processes``."""
    for process in list(processes):
        if process.is_alive():
            process.kill()
            process.join()


@atexit.register  # exit hooks run last-registered first: this one before multiprocessing's
def _stop_workers_at_exit() -> None:
    """An unclosed loader's workers may outlive every reference to it until interpreter exit."""
    _kill(_WORKERS)


class _Collated(NamedTuple):
    """The decodable items (``None`` if none) and the dropped :class:`BadImage` s (a NamedTuple: it gets pinned)."""

    batch: Batch | None
    bad: list[BadImage]


def _collate(items) -> _Collated:
    good = [item for item in items if not isinstance(item, BadImage)]
    bad = [item for item in items if isinstance(item, BadImage)]
    if not good:
        return _Collated(None, bad)
    views = [torch.stack([item[0][v] for item in good]) for v in range(len(good[0][0]))]
    labels = torch.tensor([item[1] for item in good], dtype=torch.int64)
    return _Collated(Batch(views, labels, torch.tensor([item[2] for item in good], dtype=torch.int64)), bad)


class TorchViewLoader:
    """Iterable of :class:`Batch` over ``rank``'s shard, on ``device`` (see ``build_loader``)."""

    def __init__(self, images: ImageList, recipe: Recipe, shard: EpochShard, *, device: torch.device,
                 num_workers: int, skip_bad_images: bool = False):
        self.device, self.skip_bad_images = device, skip_bad_images  # the trainer reports skipped_images if set
        self.skipped_images = 0  # images skipped so far (an image skipped in two epochs counts twice)
        self.bad_images: set[str] = set()  # the distinct files skipped (each is warned about once)
        self._batches = _EpochBatches(shard)
        self._loader = torch.utils.data.DataLoader(
            ViewDataset(images, recipe, shard.options["seed"], skip_bad_images), batch_sampler=self._batches,
            num_workers=num_workers, collate_fn=_collate, pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0, worker_init_fn=_ignore_stop_signals if num_workers > 0 else None)

    def close(self) -> None:
        """Stop the workers now (they restart on the next iteration), killing any that outlive the shutdown."""
        iterator, self._loader._iterator = self._loader._iterator, None  # set only with persistent workers
        if iterator is None:
            return
        workers = list(iterator._workers)
        iterator._shutdown_workers()
        _kill(workers)

    def set_epoch(self, epoch: int) -> None:
        self._batches.shard.epoch = epoch

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        batches = iter(self._loader)
        _WORKERS.update(getattr(batches, "_workers", ()))
        try:
            for batch, bad in batches:
                self._warn(bad)
                if batch is not None:
                    yield batch.to(self.device)
        except BadImageError as error:  # from a worker the message carries its traceback: keep the last line
            raise BadImageError(str(error).strip().splitlines()[-1].removeprefix("BadImageError: ")) from None

    def _warn(self, bad: list[BadImage]) -> None:
        for image in bad:
            self.skipped_images += 1
            if image.path not in self.bad_images:
                self.bad_images.add(image.path)
                print(f"warning: skipping undecodable image {image.path!r} ({image.reason}) because "
                      f"data.skip_bad_images is set; `fastkd data scan` lists every such file for data.exclude=",
                      file=sys.stderr, flush=True)
