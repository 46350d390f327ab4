"""Deprecated: the compile check moved to the benchmarks, ``fastkd bench compile``
(:mod:`fastkd.benchmarks.compile_check`, :mod:`fastkd.benchmarks.bench_compile`).

The old names resolve lazily with a ``DeprecationWarning`` (``fastkd.kernels`` imports nothing of
the benchmarks), and ``python -m fastkd.kernels.check [ARGS]`` runs ``fastkd bench compile [ARGS]``.
"""

from fastkd.deprecation import moved_module

__getattr__ = moved_module(__name__, "fastkd.benchmarks.compile_check",
                           {"main": "fastkd.benchmarks.bench_compile:main"})

if __name__ == "__main__":
    import runpy
    import sys

    print("python -m fastkd.kernels.check is deprecated; use `fastkd bench compile`", file=sys.stderr)
    sys.argv[1:] = ["--out" if arg == "--out-dir" else arg for arg in sys.argv[1:]]
    runpy.run_module("fastkd.benchmarks.bench_compile", run_name="__main__", alter_sys=True)
