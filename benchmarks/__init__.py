"""fastkd benchmarks, installed as ``fastkd.benchmarks`` and run with ``fastkd bench``.

Each benchmark measures fastkd side by side with the alternatives in one run and writes
JSON + Markdown (+ PNG) into ``--out DIR`` (default ``$FASTKD_BENCH_DIR``, else
``./fastkd_bench_results``); ``--publish``, run from the root of a source checkout, writes the
published ``benchmarks/results/`` (see :func:`fastkd.reporting.results_dir`). ``bench_compile``
is the ahead-of-time Triton compile check.
"""
