"""Logging: JSON lines when stderr is not a terminal (pods), readable lines and progress
bars on a terminal.

    log.setup()                                   # once, in main
    logger = logging.getLogger(__name__)
    logger.info("fetched %s", key, extra={"shard": 3, "bytes": n})   # extras become JSON fields
    with log.progress("download", total=n_items, unit="items") as bar:
        bar.advance()

TRAJFLOW_LOG_FORMAT=json|text overrides the terminal detection; TRAJFLOW_LOG_LEVEL sets the level.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from collections import Counter
from typing import Any

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_NOISY = ("botocore", "boto3", "urllib3", "s3transfer", "filelock", "fsspec", "torch._subclasses.fake_tensor")

# the console the log handler and progress bars share on a terminal, so bars stay below the log lines
console: Any = None


# what every JSON line of this process carries (run, stage, shard or rank): the logs of
# many pods, gathered in one place, are filtered by them
_context: dict[str, Any] = {}


def set_context(**fields: Any) -> None:
    """The fields every JSON line carries from now on, after any `extra=` ones, in place of
    the earlier ones (None leaves one out; no fields: none)."""
    global _context
    # one swap: a formatter in another thread never sees a half-made dict
    _context = {key: value for key, value in fields.items() if value is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then any `extra=` fields and the
    process's context (`set_context`)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_") and key not in doc:
                doc[key] = _jsonable(value)
        for key, value in _context.items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def _jsonable(value: Any) -> Any:
    """`value` as strict JSON takes it: NaN and infinities (a diverged loss) as their names,
    mapping keys as strings; json.dumps would write bare NaN or drop the whole record."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def is_terminal() -> bool:
    forced = os.environ.get("TRAJFLOW_LOG_FORMAT", "").lower()
    if forced in ("json", "text"):
        return forced == "text"
    return sys.stderr.isatty()


def stdout_to_devnull() -> None:
    """Point stdout at /dev/null once its reader has gone (`trajflow ... | head`): what is
    still buffered, and what is printed later, then goes nowhere instead of failing."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def setup(level: str | None = None, json_when_piped: bool = True) -> None:
    """Configure the root logger (again, replacing earlier handlers). Off a terminal, lines
    are JSON for log pipelines, or plain for a person's command (``json_when_piped`` off:
    `trajflow run | tee run.log`) unless TRAJFLOW_LOG_FORMAT says otherwise."""
    global console
    level = (level or os.environ.get("TRAJFLOW_LOG_LEVEL") or "INFO").upper()
    root = logging.getLogger()
    root.handlers.clear()
    if is_terminal():
        from rich.console import Console
        from rich.logging import RichHandler

        console = Console(stderr=True)
        handler: logging.Handler = RichHandler(
            console=console, show_path=False, rich_tracebacks=True, markup=False, log_time_format="%H:%M:%S"
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        console = None
        handler = logging.StreamHandler(sys.stderr)
        if json_when_piped or os.environ.get("TRAJFLOW_LOG_FORMAT", "").lower() == "json":
            handler.setFormatter(JsonFormatter())
        else:
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    try:
        root.setLevel(level)
    except ValueError:
        root.setLevel(logging.INFO)
        logging.getLogger(__name__).warning("unknown log level %r; using INFO", level)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)


class Capped:
    """Logs the first `limit` messages of each kind in full, then says once that the rest go
    to DEBUG: 5% of two million items failing must not write 100,000 lines. The shard's
    summary, report and metrics count them all."""

    def __init__(self, logger: logging.Logger, limit: int = 20):
        self.logger, self.limit = logger, limit
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def log(self, level: int, kind: str, msg: str, *args: Any) -> None:
        with self._lock:  # logged under it too: the notice comes after the lines it counts
            self._counts[kind] += 1
            n = self._counts[kind]
            if n <= self.limit:
                self.logger.log(level, msg, *args)
                return
            if n == self.limit + 1:
                self.logger.log(level, "%d %s logged; further ones are logged at DEBUG level (the shard's summary "
                                "counts them all)", self.limit, kind)
        self.logger.debug(msg, *args)


class Progress:
    """Progress of one piece of work: a bar on a terminal, a log line every `interval_s`
    elsewhere (JSON fields `progress_done`, `progress_total`, `progress_rate`), also while
    nothing advances (a large file being read), and a final line either way."""

    def __init__(self, description: str, total: float | None = None, unit: str = "items",
                 interval_s: float = 10.0, logger: logging.Logger | None = None):
        self.description, self.total, self.unit, self.interval_s = description, total, unit, interval_s
        self.logger = logger or logging.getLogger("trajflow.progress")
        self.done = 0.0
        self._started = self._last_log = time.monotonic()
        self._bar: Any = None
        self._task: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> "Progress":
        if console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn(self.unit), TimeRemainingColumn(), console=console, transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        elif self.interval_s > 0:
            self._heartbeat = threading.Thread(target=self._beat, name="progress", daemon=True)
            self._heartbeat.start()
        return self

    def advance(self, amount: float = 1) -> None:
        self.done += amount
        if self._bar is not None:
            self._bar.update(self._task, advance=amount)
            return
        self._log_if_due()

    def _beat(self) -> None:
        while True:
            with self._lock:
                due = self._last_log + self.interval_s  # an interval after the last line, whoever logged it
            if self._stop.wait(max(due - time.monotonic(), 0.0)):
                return
            self._log_if_due()

    def _log_if_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_log < self.interval_s:
                return
            self._last_log = now
        self._log(now)

    def _log(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        of_total = f"/{self.total:g}" if self.total is not None else ""
        self.logger.info(
            "%s: %g%s %s (%.1f %s/s)%s", self.description, self.done, of_total, self.unit, rate, self.unit,
            ", done" if final else "",
            extra={"progress_done": self.done, "progress_total": self.total, "progress_rate": round(rate, 3)},
        )

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif exc[0] is None:
            self._log(time.monotonic(), final=True)


def progress(description: str, total: float | None = None, unit: str = "items", interval_s: float = 10.0,
             logger: logging.Logger | None = None) -> Progress:
    return Progress(description, total, unit, interval_s, logger)
