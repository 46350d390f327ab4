"""``build_loader``: one entry point for every recipe, backend and device."""

from __future__ import annotations

import importlib.util
import os
from typing import Iterable

import torch

from fastkd.checks import check_bool, check_choice, check_number

from .datasets import load_images
from .recipes import build_recipe
from .sharding import EpochShard

BACKENDS = ("auto", "dali", "dali_cpu", "torch")  # the one list of data backends: fastkd.config and the CLI use it


def check_loader_options(prefix: str = "", *, backend, batch_size, num_workers, skip_bad_images) -> None:
    """Check the loader options a run config (``prefix="data."``) and :func:`build_loader` share."""
    check_choice(f"{prefix}backend", backend, BACKENDS)
    check_number(f"{prefix}batch_size", batch_size, low=1, integer=True)
    check_number(f"{prefix}num_workers", num_workers, low=0, integer=True)
    check_bool(f"{prefix}skip_bad_images", skip_bad_images)
    if skip_bad_images and backend in ("dali", "dali_cpu"):
        raise ValueError(f"{prefix}skip_bad_images needs {prefix}backend 'torch' (or 'auto'), got {backend!r}: DALI "
                         "cannot drop an undecodable image from its batch; set data.backend=torch, or run "
                         "`fastkd data scan` and pass its exclusion list as data.exclude=")


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported."""
    return importlib.util.find_spec("nvidia.dali") is not None


def build_loader(source, recipe, *, batch_size: int, backend: str = "auto", device: str | torch.device = "cpu",
                 rank: int = 0, world_size: int = 1, seed: int = 0, drop_last: bool = True, num_workers: int = 2,
                 exclude: str | os.PathLike | Iterable[str] | None = None, shuffle: bool | None = None,
                 skip_bad_images: bool = False, **recipe_overrides):
    """Iterable of :class:`fastkd.data.Batch` on ``device`` over ``rank``'s shard (``sharding.py``) of ``source``
    minus ``exclude``, with ``len()``, ``set_epoch(epoch)`` and ``close()`` (stops workers until the next iteration).
    ``recipe``: a name (``recipe_overrides``: its parameters) or a ``Recipe``. ``backend``: ``dali`` (``mixed``
    decoding on a CUDA ``device``), ``dali_cpu``, ``torch`` (DataLoader + PIL), ``auto`` (``dali`` when installed);
    ``num_workers``: workers or DALI threads. ``skip_bad_images`` (torch only): drop undecodable images."""
    check_loader_options(backend=backend, batch_size=batch_size, num_workers=num_workers,
                         skip_bad_images=skip_bad_images)
    check_number("world_size", world_size, low=1, integer=True)
    check_number(f"rank (world_size={world_size})", rank, low=0, high=world_size - 1, integer=True)
    check_number("seed", seed, low=0, integer=True)
    device = torch.device(device)
    check_choice("device type", device.type, ("cpu", "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available")
    recipe = build_recipe(recipe, **recipe_overrides)
    images = load_images(source, exclude)
    shard = EpochShard(len(images), batch_size, rank=rank, world_size=world_size, seed=seed, drop_last=drop_last,
                       shuffle=recipe.shuffle if shuffle is None else shuffle)
    if backend == "auto":
        backend = "dali" if dali_available() and not skip_bad_images else "torch"
    if backend == "torch":
        from .torch_pipeline import TorchViewLoader

        return TorchViewLoader(images, recipe, shard, device=device, num_workers=num_workers,
                               skip_bad_images=skip_bad_images)
    if not dali_available():
        raise ValueError(f"backend={backend!r} needs NVIDIA DALI: pip install 'fastkd[dali]'")
    from .dali_loader import DaliViewLoader

    device_id = None  # the CPU-only pipeline
    if backend == "dali" and device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    return DaliViewLoader(images, recipe, shard, device=device, device_id=device_id, num_threads=max(1, num_workers))
