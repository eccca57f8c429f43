"""Errors and exit codes shared by every stage.

The exit codes are part of the chart contract: each stage's podFailurePolicy maps
CONFIG, PERMANENT and DIVERGED to FailJob/FailIndex (retrying cannot help) and lets
ERROR, TRANSIENT and TIMEOUT count against the retry budget.
"""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # unexpected failure: retry
    CONFIG = 2  # malformed values/config or usage: fail the Job, retrying cannot help
    PERMANENT = 3  # input that can never succeed (404/403, bad data over threshold): fail the index
    TRANSIENT = 4  # retryable failures remain (timeouts, 5xx, throttling): retry the pod
    DIVERGED = 5  # training loss became NaN/Inf: fail the Job
    TIMEOUT = 6  # waited too long for upstream: retry


# exit codes no retry changes: the chart's podFailurePolicy fails the Job or the index on them
FINAL_EXIT_CODES = frozenset({ExitCode.CONFIG, ExitCode.PERMANENT, ExitCode.DIVERGED})


class TrajflowError(Exception):
    """An error with a one-line message meant for the user, and an exit code."""

    exit_code: ExitCode = ExitCode.ERROR


class ConfigError(TrajflowError):
    exit_code = ExitCode.CONFIG


class InvalidURI(ConfigError, ValueError):
    """A storage or endpoint URI that cannot be used (also a ValueError for callers that
    validate input generically)."""


class PermanentError(TrajflowError):
    exit_code = ExitCode.PERMANENT


class TransientError(TrajflowError):
    exit_code = ExitCode.TRANSIENT


class StorageUnavailable(TransientError):
    """The storage layer's own account of a store that failed it (a read cut short again and
    again): a storage error, as the store's own exceptions are."""


class WaitTimeout(TrajflowError):
    exit_code = ExitCode.TIMEOUT


class Terminated(KeyboardInterrupt):
    """SIGTERM raised as an interrupt: like Ctrl-C it passes `except Exception` (a reader
    must not take it for a broken file) and runs every finally block on its way out."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)
