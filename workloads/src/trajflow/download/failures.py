"""How a failed request or item is classified, and how long to wait before trying again.

Three kinds decide what happens next:
- TRANSIENT: timeouts (and bodies slower than the low-speed limit), resets, truncated bodies,
  5xx, 408/425/429 (SlowDown), an HTML page instead of the item: retried with
  exponential backoff and full jitter; whatever remains at the end makes the pod exit 4.
- PERMANENT: 401/403/404/410, other 4xx, a checksum that still does not match after every
  attempt, an unusable URL or certificate: never retried within a request; the pod exits 3.
- RESTART: the object changed under us (412 on If-Match, 416, another size), or the server
  ignores ranges or sends no validator so its parts cannot be combined: the item starts over
  from byte 0 (as one stream), which counts as an item attempt.
"""
from __future__ import annotations

import enum
import random
import threading
import time
from email.utils import parsedate_to_datetime

from trajflow.errors import TransientError


class Kind(str, enum.Enum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    RESTART = "restart"


# metric label values of trajflow_download_failures_total{reason}
REASONS = (
    "timeout", "connection", "truncated", "server_error", "throttled", "not_found", "forbidden",
    "client_error", "tls", "checksum", "size", "changed", "no_ranges", "no_validator", "busy", "gzip", "source_io",
    "storage",
)


# an optional source's item that is not there (404/410) or not readable (401/403) is the
# documented outcome "missing" (trajflow_download_items_total{outcome="missing"}), not a failure
MISSING_REASONS = ("not_found", "forbidden")


class FetchError(Exception):
    """One failed request or item, with what to do about it."""

    def __init__(self, message: str, kind: Kind, reason: str, retry_after: float | None = None,
                 status: int | None = None):
        super().__init__(message)
        assert reason in REASONS, reason
        self.kind, self.reason, self.retry_after, self.status = kind, reason, retry_after, status

    @property
    def transient(self) -> bool:
        return self.kind is Kind.TRANSIENT


def is_missing(kind: "Kind | str", reason: str, required: bool) -> bool:
    """Whether a permanent error is an optional source's missing item rather than a failure."""
    return not required and kind == Kind.PERMANENT and reason in MISSING_REASONS


def counts_as_failure(exc: FetchError, required: bool) -> bool:
    """Whether `exc` counts in trajflow_download_failures_total (failed attempts): every error but
    an optional source's missing item, which counts once as items_total{outcome="missing"}."""
    return not is_missing(exc.kind, exc.reason, required)


class StorageFailure(Exception):
    """Writing to the run root failed (disk full, permission, S3 error): stop the shard."""


def classify_status(status: int) -> tuple[Kind, str] | None:
    """None for success statuses; else the kind and reason of an HTTP error status."""
    if 200 <= status < 300:
        return None
    if status in (408, 425):
        return Kind.TRANSIENT, "timeout"
    if status in (429, 503):  # 503 is also S3's SlowDown
        return Kind.TRANSIENT, "throttled"
    if status >= 500:
        return Kind.TRANSIENT, "server_error"
    if status in (412, 416):
        return Kind.RESTART, "changed"
    if status in (401, 403):
        return Kind.PERMANENT, "forbidden"
    if status in (404, 410):
        return Kind.PERMANENT, "not_found"
    return Kind.PERMANENT, "client_error"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class Backoff:
    """Exponential backoff with full jitter: the n-th retry sleeps uniform(0, min(cap, base*2^(n-1)))
    so a fleet of pods hitting the same throttled endpoint spreads out; a server's Retry-After
    is a floor (capped)."""

    def __init__(self, base_s: float, cap_s: float, rng: random.Random | None = None):
        self.base_s, self.cap_s = base_s, cap_s
        self._rng = rng or random.Random()

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** max(retry - 1, 0))
        delay = self._rng.uniform(0, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cap_s))
        return delay


# Set when the process is told to stop (SIGTERM): planning's requests are no longer tried or
# retried, so a pod stops within its grace period instead of sleeping out every backoff
# (the HEADs of many URLs, each up to `attempts` times).
STOPPING = threading.Event()


def call_with_retries(fn, attempts: int, backoff: Backoff):  # type: ignore[no-untyped-def]
    """`fn()` until it succeeds, a non-transient FetchError, or `attempts` tries."""
    for attempt in range(1, attempts + 1):
        if STOPPING.is_set():
            raise TransientError("stopped before planning ended")
        try:
            return fn()
        except FetchError as exc:
            if not exc.transient or attempt >= attempts:
                raise
            STOPPING.wait(backoff.delay(attempt, exc.retry_after))
    raise AssertionError("unreachable")
