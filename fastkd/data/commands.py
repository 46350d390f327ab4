"""``fastkd data sample DIR --images N --seed S`` and ``fastkd data scan ROOT [--out FILE] [--workers N]``
(``fastkd/cli.py`` calls :func:`register`; each subcommand sets ``func``: ``args -> exit code``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .sample_dataset import write_sample_dataset
from .scan import scan_dataset


def _sample(args: argparse.Namespace) -> int:
    try:
        root = write_sample_dataset(args.dir, images=args.images, seed=args.seed)
    except OSError as error:  # reported by the CLI as a usage error, without a traceback
        raise ValueError(f"cannot write the sample dataset to {args.dir!r}: {error}") from error
    print(f"wrote {args.images} images to {root}")
    return 0


def _scan(args: argparse.Namespace) -> int:
    out = args.out or f"{Path(args.root).resolve().name}-exclude.txt"
    try:
        result = scan_dataset(args.root, args.workers, out=out)
    except OSError as error:  # missing / unreadable root: a usage error, without a traceback
        raise ValueError(str(error)) from error
    for path, reason in result.bad:
        print(f"{path}: {reason}")
    print(f"{len(result.bad)} of {result.checked} files undecodable; exclusion list: {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` command with its ``sample`` and ``scan`` subcommands to ``subparsers``."""
    data = subparsers.add_parser("data", help="sample dataset and dataset checks")
    commands = data.add_subparsers(dest="data_command", required=True)

    sample = commands.add_parser("sample", help="write the built-in procedural sample dataset (ImageFolder of JPEGs)")
    sample.add_argument("dir", help="output folder")
    sample.add_argument("--images", type=int, default=2000, help="number of images (default 2000)")
    sample.add_argument("--seed", type=int, default=0, help="seed; the same seed gives byte-identical files")
    sample.set_defaults(func=_sample)

    scan = commands.add_parser("scan", help="decode every image and write an exclusion list of the undecodable ones")
    scan.add_argument("root", help="ImageFolder root or '<path> <label>' file list")
    scan.add_argument("--out", help="exclusion list to write (default ./<root name>-exclude.txt)")
    scan.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding threads (default: all cores)")
    scan.set_defaults(func=_scan)
    return data
