"""Deprecated alias of :mod:`fastkd.kernels.compile_configs` (the compile configurations of the Triton
kernels): every name resolves to the one of that module, with a ``DeprecationWarning``."""

from fastkd.deprecation import moved_module

__getattr__ = moved_module(__name__, "fastkd.kernels.compile_configs")
