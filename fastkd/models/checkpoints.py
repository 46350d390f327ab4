"""Deprecated alias of :mod:`fastkd.models.weights` (loading teacher and saving backbone weights)."""

from fastkd.deprecation import moved_module

__getattr__ = moved_module(__name__, "fastkd.models.weights")
