"""The `trajflow` command.

Each subcommand lives in its own module with `configure(parser)` and `run(args) -> int`;
a stage's heavy imports (torch) happen inside `run`, so the downloader image never needs them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from trajflow import __version__, log
from trajflow.errors import TrajflowError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("trajflow.download.cli", "fetch this shard's items of the dataset to the run root"),
    "preprocess": ("trajflow.preprocess.cli", "resample this shard's raw trajectories to a uniform rate"),
    "train": ("trajflow.train.cli", "train a model on the resampled shards (launched by torchrun)"),
    "wait": ("trajflow.storage.wait", "wait until upstream shard manifests exist"),
    "run": ("trajflow.local.cli", "run the enabled stages on this machine from values files"),
    "schema": ("trajflow.config.cli", "print the JSON Schema of the values' config blocks"),
    "bench": ("trajflow.bench.cli", "run benchmarks and write results with the machine named"),
    "demo-data": ("trajflow.local.demo_data", "generate a synthetic multi-rate robot dataset"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trajflow", description="Download, resample and train on trajectories, on Kubernetes or one machine.")
    parser.add_argument("--version", action="version", version=f"trajflow {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # this install does not carry that stage
            raise
        sp = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(sp)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log.setup(args.log_level)
    try:
        return int(args._run(args) or 0)
    except TrajflowError as exc:
        print(f"trajflow {args.command}: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
