"""``build_loader``: one entry point for every recipe, backend and device."""

from __future__ import annotations

import importlib.util
import os
from typing import Iterable

import torch

from .datasets import load_images
from .recipes import build_recipe

BACKENDS = ("auto", "dali", "dali_cpu", "torch")  # the one list of data backends: fastkd.config and the CLI use it


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported."""
    return importlib.util.find_spec("nvidia.dali") is not None


def build_loader(
    source,
    recipe,
    *,
    batch_size: int,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    drop_last: bool = True,
    num_workers: int = 2,
    exclude: str | os.PathLike | Iterable[str] | None = None,
    shuffle: bool | None = None,
    skip_bad_images: bool = False,
    **recipe_overrides,
):
    """Iterable of :class:`fastkd.data.Batch` (views normalised float ``[B, 3, H, W]`` on ``device``)
    over rank ``rank``'s shard of ``source``, with ``len()``, ``set_epoch(epoch)`` and ``close()``
    (stops worker processes or threads now; the next iteration starts them again).

    ``source``: ImageFolder root, ``<path> <label>`` file list, or ``ImageList``; ``recipe``: a
    registered recipe name (``mocov3``, ``dino_multicrop``, ``mae``, ``eval``; ``recipe_overrides``
    are its keyword parameters) or a ``Recipe``. ``backend``: ``dali`` (GPU pipeline with ``mixed``
    decoding when ``device`` is CUDA, CPU-only pipeline otherwise), ``dali_cpu`` (CPU-only pipeline
    whatever the device), ``torch`` (DataLoader + PIL), ``auto`` (``dali`` when installed, else
    ``torch``). ``num_workers``: DataLoader workers or DALI CPU threads. ``shuffle`` defaults to
    the recipe's (``eval`` keeps file order). Sharding and ``drop_last``: see ``sharding.py``.

    ``skip_bad_images``: an undecodable image is dropped from its batch (counted in the loader's
    ``skipped_images``, a warning names it once) instead of raising ``BadImageError``; a batch
    left empty is not yielded. Torch backend only (``auto`` then means ``torch``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(skip_bad_images, bool):
        raise ValueError(f"skip_bad_images must be true or false, got {skip_bad_images!r}")
    if skip_bad_images and backend in ("dali", "dali_cpu"):
        raise ValueError(f"skip_bad_images (data.skip_bad_images) needs backend 'torch', got backend={backend!r}: "
                         "DALI cannot drop an undecodable image from its batch; set data.backend=torch, or run "
                         "`fastkd data scan` and pass its exclusion list as data.exclude=")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available")
    recipe = build_recipe(recipe, **recipe_overrides)
    images = load_images(source, exclude)
    if shuffle is None:
        shuffle = recipe.shuffle
    common = dict(
        batch_size=batch_size, device=device, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
        drop_last=drop_last,
    )
    if backend == "auto":
        backend = "dali" if dali_available() and not skip_bad_images else "torch"
    if backend == "torch":
        from .torch_pipeline import TorchViewLoader

        return TorchViewLoader(images, recipe, num_workers=num_workers, skip_bad_images=skip_bad_images, **common)
    if not dali_available():
        raise ValueError(f"backend={backend!r} needs NVIDIA DALI: pip install 'fastkd[dali]'")
    from .dali_loader import DaliViewLoader

    if backend == "dali" and device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    else:
        device_id = None
    return DaliViewLoader(images, recipe, device_id=device_id, num_threads=max(1, num_workers), **common)
