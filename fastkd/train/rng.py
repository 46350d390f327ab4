"""Capture and restore every random number generator a training step may draw from (torch CPU,
torch CUDA, numpy, Python ``random``), as plain tensors / lists so that checkpoints load with
``torch.load(weights_only=True)``."""

from __future__ import annotations

import random

import numpy as np
import torch

from fastkd.checks import check_number


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and all CUDA devices), numpy and Python ``random`` with ``seed``."""
    check_number("seed", seed, low=0, integer=True)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """The current state of every generator, restorable by :func:`restore_rng_state`."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Put every generator back into ``state`` (from :func:`capture_rng_state`)."""
    if not isinstance(state, dict) or not {"torch", "python", "numpy"} <= state.keys():
        raise ValueError(f"rng state must be a dict with 'torch', 'python', 'numpy', got {state!r:.200}")
    torch.set_rng_state(state["torch"])
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
