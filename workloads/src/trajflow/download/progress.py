"""Progress: a line per interval in pods (JSON logs), a progress bar on a terminal, and the
duration/throughput gauges that are pushed with the other metrics."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from trajflow import log as trajflow_log
from trajflow.resources import human_bytes

log = logging.getLogger(__name__)


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class RateMeter:
    """Bytes per second, smoothed over recent samples so one stall does not zero the ETA."""

    def __init__(self, half_life_s: float = 10.0):
        self.half_life_s = half_life_s
        self.rate: float | None = None
        self._last: tuple[float, int] | None = None

    def sample(self, now: float, total_bytes: int) -> float | None:
        if self._last is not None:
            dt = now - self._last[0]
            if dt > 0:
                current = (total_bytes - self._last[1]) / dt
                weight = 1 - 0.5 ** (dt / self.half_life_s)
                self.rate = current if self.rate is None else self.rate + weight * (current - self.rate)
        self._last = (now, total_bytes)
        return self.rate


def eta_seconds(remaining: int, rate: float | None) -> float | None:
    if remaining <= 0:
        return 0.0
    if not rate or rate <= 0:
        return None
    return remaining / rate


class ProgressReporter:
    """Reports a ShardDownloader's progress until `stop()`."""

    def __init__(self, downloader: Any, interval_s: float, terminal: bool, metrics: Any = None):
        self.downloader, self.interval_s, self.terminal, self.metrics = downloader, interval_s, terminal, metrics
        self.meter = RateMeter()
        # seeded now, so the first report already has a rate
        self.meter.sample(time.monotonic(), downloader.progress()["bytes_received"])
        self._stop = threading.Event()
        self._bar: Any = None
        self._task: Any = None
        if terminal:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

            # on stderr with the log lines: stdout may carry data (`--summary-json /dev/stdout`)
            self._bar = Progress(
                TextColumn("[bold]shard {task.fields[shard]}"), BarColumn(), DownloadColumn(binary_units=True),
                TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[items]}"), transient=False,
                console=trajflow_log.console or Console(stderr=True),
            )
            self._task = self._bar.add_task("download", total=None, shard=downloader.shard, items="")
            self._bar.start()
        self._thread = threading.Thread(target=self._loop, name="download-progress", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        period = 0.5 if self.terminal else self.interval_s
        while not self._stop.wait(period):
            self.report()

    def report(self, final: bool = False) -> dict[str, Any]:
        snap = self.downloader.progress()
        now = time.monotonic()
        rate = self.meter.sample(now, snap["bytes_received"])
        elapsed = snap["elapsed_s"]
        if self.metrics is not None:
            self.metrics.duration.set(elapsed)
            self.metrics.throughput.set(snap["bytes_received"] / elapsed if elapsed > 0 else 0)
        remaining = max(snap["bytes_total"] - snap["bytes_done"], 0)
        eta = eta_seconds(remaining, rate) if snap["sizes_known"] else None
        snap.update(rate=rate, eta_s=eta)
        items = f"{snap['items_done']}/{snap['items_total']} items" + (f", {snap['failed']} failed" if snap["failed"] else "")
        if self._bar is not None:
            self._bar.update(self._task, total=snap["bytes_total"] or None, completed=snap["bytes_done"], items=items)
        elif not final:
            if snap["sizes_known"]:
                pct = 100.0 * snap["bytes_done"] / snap["bytes_total"] if snap["bytes_total"] else 100.0
            else:  # items of unknown size: how many items are done says more than bytes
                pct = 100.0 * snap["items_done"] / snap["items_total"] if snap["items_total"] else 100.0
            log.info(
                "shard %d: %s, %s/%s (%.1f%%), %s/s, ETA %s, %d in flight, %d retries",
                self.downloader.shard, items, human_bytes(snap["bytes_done"]), human_bytes(snap["bytes_total"]), pct,
                human_bytes(rate or 0), human_duration(eta), snap["inflight"], snap["retries"],
                extra={"progress": {k: v for k, v in snap.items() if v is not None}},
            )
        return snap

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.report(final=True)
        if self._bar is not None:
            self._bar.stop()
