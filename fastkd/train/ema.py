"""Deprecated alias of :mod:`fastkd.models.ema_teacher` (``EMATeacher``, ``momentum_schedule``):
import them from :mod:`fastkd.models`."""

from fastkd.deprecation import moved_module

__getattr__ = moved_module(__name__, "fastkd.models.ema_teacher")
