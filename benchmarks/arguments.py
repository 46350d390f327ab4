"""The command line every benchmark shares."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastkd.reporting import DEFAULT_RESULTS_DIR, PUBLISHED_RESULTS_DIR, RESULTS_ENV, results_dir


def bench_parser(description: str, quick_help: str, *, rounds_help: str | None = None,
                 device_help: str | None = None, runs_help: str | None = None,
                 devices: tuple[str, ...] = ("cpu", "cuda")) -> argparse.ArgumentParser:
    """``--quick``, ``--device`` (one of ``devices``), ``--out`` / ``--publish``, and ``--rounds`` /
    ``--runs`` (default 1) when given their help text."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--device", choices=devices, default="cpu", help=device_help)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None,
                       help=f"folder for the results (default ${RESULTS_ENV}, else ./{DEFAULT_RESULTS_DIR})")
    where.add_argument("--publish", action="store_true",
                       help=f"write into the published results {PUBLISHED_RESULTS_DIR}/ of the fastkd checkout "
                            "that is the current directory")
    if rounds_help is not None:
        parser.add_argument("--rounds", type=int, default=None, help=rounds_help)
    if runs_help is not None:
        parser.add_argument("--runs", type=int, default=1, help=runs_help)
    return parser


def resolve_out(parser: argparse.ArgumentParser, args: argparse.Namespace, *,
                in_checkout: str | None = None) -> Path:
    """Set ``args.out`` to :func:`results_dir` of ``--out`` / ``--publish`` (a usage error outside a
    checkout) and return it."""
    try:
        args.out = results_dir(args.out, publish=args.publish, in_checkout=in_checkout)
    except ValueError as error:
        parser.error(str(error))
    return args.out


def parse_bench_args(parser: argparse.ArgumentParser, argv: list[str] | None, *,
                     min_batch: int = 1) -> argparse.Namespace:
    """Parse ``argv``, ``args.out`` resolved; a usage error for ``--device cuda`` without CUDA,
    ``--rounds`` / ``--runs`` < 1 or ``--batch`` < ``min_batch``."""
    import torch

    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but no CUDA device is available")
    for name, least in (("rounds", 1), ("runs", 1), ("batch", min_batch)):
        if getattr(args, name, None) is not None and getattr(args, name) < least:
            parser.error(f"--{name} must be >= {least}, got {getattr(args, name)}")
    resolve_out(parser, args)
    return args
