"""The `trajflow` command.

Each subcommand lives in its own module with `configure(parser)` and `run(args) -> int`;
a stage's heavy imports (torch) happen inside `run`, so the downloader image never needs them.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
from typing import Callable

from trajflow import __version__, log
from trajflow.errors import ExitCode, Terminated, TrajflowError
from trajflow.resources import raise_open_files_limit

# Libraries of the `ml` extra: the downloader image does not carry them.
OPTIONAL_DEPENDENCIES = {
    "torch", "triton", "numpy", "pyarrow", "h5py", "safetensors", "matplotlib",
}

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("trajflow.download.cli", "fetch this shard's items of the dataset to the run root"),
    "preprocess": ("trajflow.preprocess.cli", "resample this shard's raw trajectories to a uniform rate"),
    "train": ("trajflow.train.cli", "train a model on the resampled shards (DDP; --nproc-per-node launches the workers)"),
    "wait": ("trajflow.storage.wait", "wait until upstream shard manifests exist"),
    "run": ("trajflow.local.cli", "run the enabled stages on this machine from values files"),
    "schema": ("trajflow.config.cli", "print the JSON Schema of the values' config blocks"),
    "bench": ("trajflow.bench.cli", "run benchmarks and write results with the machine named"),
    "demo-data": ("trajflow.local.demo_data", "generate a synthetic multi-rate robot dataset"),
}


# the commands the charts run in pods; the others are for people (`trajflow run` in CI too)
POD_COMMANDS = {"download", "preprocess", "train", "wait"}


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: `preprocess --shard 0` would be read as --shards 0 (shard lists and
    # counts differ by one letter between commands)
    parser = argparse.ArgumentParser(prog="trajflow", description="Download, resample and train on trajectories, on Kubernetes or one machine.",
                                     allow_abbrev=False)
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
        sp = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        module.configure(sp)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log.setup(args.log_level, json_when_piped=args.command in POD_COMMANDS)
    raise_open_files_limit()
    try:
        return int(args._run(args) or 0)
    except TrajflowError as exc:
        return _last_word(args.command, f"error: {exc}", int(exc.exit_code))
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in OPTIONAL_DEPENDENCIES:
            logging.getLogger("trajflow").exception("trajflow %s failed unexpectedly", args.command)
            return int(ExitCode.ERROR)
        # an image without the ml extra: retrying the pod cannot help
        return _last_word(
            args.command,
            f"error: this install lacks {missing!r}, which `{args.command}` needs (install the ml extra: "
            "pip install 'trajflow[ml]')",
            int(ExitCode.CONFIG),
        )
    except Terminated as exc:
        return _last_word(args.command, f"{exc}; a rerun redoes what was not finished", 128 + exc.signum, logging.WARNING)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_reader_gone():  # a socket or a child's pipe: an error like any other
            logging.getLogger("trajflow").exception("trajflow %s failed unexpectedly", args.command)
            return int(ExitCode.ERROR)
        # the reader went away (`trajflow schema | head`): nothing more to say, as `cat` does;
        # the interpreter's final flush must not fail too
        log.stdout_to_devnull()
        return 128 + signal.SIGPIPE
    except Exception as exc:  # logged (as JSON in pods) so the failure is searchable; the pod is retried
        from trajflow.storage.wait import s3_refusal_error

        refusal = s3_refusal_error(exc)
        if refusal is not None:  # bad credentials or a missing bucket: retrying cannot help
            return _last_word(args.command, f"error: {refusal}", int(refusal.exit_code))
        logging.getLogger("trajflow").exception("trajflow %s failed unexpectedly", args.command)
        return int(ExitCode.ERROR)


def _last_word(command: str, text: str, exit_code: int, level: int = logging.ERROR) -> int:
    """Say why the command stops and return its exit code: a plain line, or for the stages
    that run in pods a log record where logs are JSON, so that log pipelines and
    `"level": "error"` searches find the decisive line too."""
    line = f"trajflow {command}: {text}"
    if command not in POD_COMMANDS or log.is_terminal():
        print(line, file=sys.stderr)
    else:  # to the handlers whatever the log level: a pod quietened to ERROR still says why it stopped
        record = logging.getLogger("trajflow").makeRecord("trajflow", level, __file__, 0, "%s", (line,), None,
                                                          extra={"exit_code": exit_code})
        for handler in logging.getLogger().handlers:
            handler.handle(record)
    return exit_code


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (its write end polls as an error)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        return bool(poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real stdout (closed, replaced by a test)
        return False


# A native call can hold the interpreter's lock for good (a library looping inside a corrupt
# file): no signal handler, metrics push or log line runs again, and the pod hangs silently
# through SIGTERM until SIGKILL. faulthandler's watchdog is a C thread: re-armed from Python,
# it fires only when no Python code could run for this long, prints every thread's stack (a
# raw file is parsed in a frame named after it) and exits 1, which the pod failure policies retry.
WEDGED_AFTER_S = 600.0


def watch_for_a_wedged_interpreter(after_s: float = WEDGED_AFTER_S) -> Callable[[], None]:
    """End the process, with every thread's stack, once no Python code has run for ``after_s``;
    returns what stops the watch (before the interpreter's shutdown, in which it cannot re-arm)."""
    import faulthandler
    import threading

    stopped = threading.Event()

    def rearm() -> None:
        while not stopped.is_set():
            faulthandler.dump_traceback_later(after_s, exit=True)
            stopped.wait(after_s / 10)
        faulthandler.cancel_dump_traceback_later()

    thread = threading.Thread(target=rearm, name="wedge-watchdog", daemon=True)
    thread.start()

    def stop() -> None:
        stopped.set()
        thread.join(timeout=5)
        faulthandler.cancel_dump_traceback_later()

    return stop


def entry() -> None:
    """The `trajflow` command: `main`, then the process's exit. Calls that an error or a stop
    left running on pool threads (reads stalled in h5py or Arrow) would deadlock or crash
    the interpreter's shutdown, so with some still running the process ends at once, its
    last words flushed: everything it had to do (the final metrics push) is done."""
    from trajflow.threads import calls_running

    # in the chart's pods only (TRAJFLOW_RELEASE): a process stopped with Ctrl-Z that long, on a
    # workstation or in a dev pod, would end as soon as it resumed
    unwatch = watch_for_a_wedged_interpreter() if os.environ.get("TRAJFLOW_RELEASE") else (lambda: None)
    code = main()
    unwatch()
    if calls_running():
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
