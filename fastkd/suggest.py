"""The "did you mean" hint of every error about an unknown name (config keys, methods, fields)."""

from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(name: object, valid: Iterable[str], *, prefix: str = "") -> str:
    """``"; did you mean '<prefix><nearest>'?"`` for the valid name closest to ``name``, or ``""``."""
    near = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{near[0]}'?" if near else ""
