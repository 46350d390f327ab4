"""Deprecated alias of :mod:`fastkd.methods.backbones` (which builds students and loads teachers)."""

from fastkd.deprecation import moved_module

__getattr__ = moved_module(__name__, "fastkd.methods.backbones")
