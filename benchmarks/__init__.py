"""fastkd benchmarks, installed as ``fastkd.benchmarks`` and run with ``fastkd bench NAME``: each
measures fastkd side by side with the alternatives and writes JSON + Markdown (+ PNG) into ``--out
DIR`` (default ``$FASTKD_BENCH_DIR``, else ``./fastkd_bench_results``; ``--publish``: the checkout's
``benchmarks/results/``, see :func:`fastkd.reporting.results_dir`)."""
