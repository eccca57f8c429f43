"""`trajflow bench [NAMES...] --out DIR --quick`: run benchmarks and write their results."""
from __future__ import annotations

import argparse

from trajflow.bench import BENCHMARKS


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--out", default="benchmarks/results", help="directory for <name>.json and <name>.md")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run, not figures to quote")


def run(args: argparse.Namespace) -> int:
    from trajflow.bench import run as run_benchmarks

    return run_benchmarks(args.names, args.out, quick=args.quick)
