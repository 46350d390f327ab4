"""The YAML run configs shipped with fastkd, installed as the package ``fastkd.configs`` (package
data): ``*.yaml`` the full-size runs, ``demo/*.yaml`` the runs of ``python -m fastkd.demo``."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def config_dir() -> Path:
    """The installed folder of the configs (``*.yaml``; ``demo/`` inside it)."""
    root = files(__name__)
    if not isinstance(root, Path):
        raise RuntimeError(f"fastkd.configs is not installed as plain files ({root!r}); reinstall fastkd with pip")
    return root


def demo_config_dir() -> Path:
    """The installed folder of the demo's run configs."""
    return config_dir() / "demo"
