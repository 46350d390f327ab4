"""Whether fastkd shows a progress bar: the one rule of the evaluation bars and ``fastkd data scan``.

Low level: imports nothing of fastkd. Training's :class:`fastkd.train.logging.TrainLogger` follows its
own rule (plain log lines instead of a bar when stderr is not a terminal).
"""

from __future__ import annotations

import os

__all__ = ["progress_disable", "tqdm_disabled_by_env"]


def tqdm_disabled_by_env() -> bool:
    """Whether the ``TQDM_DISABLE`` environment variable asks for no progress bars (any value but
    empty, 0, false, no)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def progress_disable(progress: bool = True) -> bool | None:
    """tqdm's ``disable`` for a progress bar: ``True`` when ``progress`` is false or
    :func:`tqdm_disabled_by_env`, else ``None`` (tqdm then shows the bar only when its stream,
    stderr, is a terminal)."""
    if not progress or tqdm_disabled_by_env():
        return True
    return None
