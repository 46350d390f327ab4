"""fastkd benchmarks, installed as ``fastkd.benchmarks`` and run with ``fastkd bench``.

Each benchmark measures fastkd side by side with the alternatives in one run and writes
JSON + Markdown (+ PNG) under ``benchmarks/results/`` (or ``$FASTKD_BENCH_DIR``).
"""
