"""One download shard from start to end: plan, skip or reuse, fetch, summarise, manifest.

1. The plan (`plan/download-<shards>-<generation>/`, first writer wins) assigns every
   listed item to one shard, byte-balanced; the generation (`DownloadConfig.generation_id`)
   is a hash of the sources, gunzip and `planGeneration`, so changing the sources makes a
   new plan and a rerun reuses the old.
2. This shard's items are read from its own part of the plan, by JOB_COMPLETION_INDEX. A
   manifest of this shard written for the same plan means the shard is done (its files are
   checked to be there); a manifest written for another plan is removed first, so nothing
   downstream mistakes it for this plan's.
3. Per item, the verification record decides: skip (verified here), reuse (verified under
   another shard's directory, from an earlier shard count: moved by a rename or a
   server-side copy, never downloaded, so after a re-shard every item lies in exactly one
   shard directory), adopt (a file at the final name without a current record: a kill
   between the rename and the record; re-hashed once), or fetch. Shard 0 also removes
   manifests of shard numbers beyond the new count that belong to another plan.
4. A bounded pool of `concurrency` workers runs item preparation and ranged parts, largest
   items first; parts of items already started go first, so few temporaries are open.
5. Exit: 0 when every required item is verified (then, and only then, the manifest is
   written); PERMANENT (3) when any item failed permanently (403/404, checksums that never
   match); otherwise TRANSIENT (4) when retryable failures remain; ERROR (1) when the run root
   itself failed; CONFIG (2) when the run root refuses the credentials. An item a filesystem
   root cannot hold under its name (too long; `x` next to `x/y`) fails alone, permanently.
   Optional sources' missing items are listed in the manifest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trajflow import log as trajflow_log
from trajflow.config.download import DownloadConfig
from trajflow.download.failures import STOPPING, Backoff, FetchError, Kind, StorageFailure, counts_as_failure, is_missing
from trajflow.download.http import redact
from trajflow.download.sources import HttpClients, SourceRuntime, build_sources, list_all
from trajflow.download.transfer import (
    DOWNLOAD_TMP_PREFIX,
    ItemResult,
    ItemTransfer,
    Stats,
    TransferSettings,
    relocate,
    sweep_abandoned_temporaries,
)
from trajflow.download.verify import (
    RECORD_PREFIX,
    RECORD_SUFFIX,
    Record,
    declared_checksums,
    gunzips,
    item_fingerprint,
    modified_since,
    read_record,
    recorded_checks,
    rehash,
    write_record,
)
from trajflow.errors import ConfigError, PermanentError, TrajflowError, TransientError
from trajflow.metrics import DOWNLOAD_OUTCOMES
from trajflow.plan import Item, keep_plan_in_use, load_or_create_plan, shard_items
from trajflow.resources import human_bytes, memory_limit
from trajflow.storage import (
    LocalStorage,
    Storage,
    read_manifest,
    remove_foreign_manifests,
    shard_name,
    write_manifest,
)
from trajflow.storage.base import STALE_UPLOAD_S
from trajflow.storage.local import NAME_MAX
from trajflow.storage.manifest import manifest_key
from trajflow.storage.s3 import PART_SIZE, UPLOAD_CONCURRENCY
from trajflow.storage.wait import fatal_storage_error

log = logging.getLogger(__name__)

STAGE = "download"
RAW = "raw"
BUSY_POLL_MAX_S = 15.0  # how often, at most, an item another process holds is looked at again
STOP_WAIT_S = 10.0  # how long a stopped shard waits for its workers to close their items
# how long a pod starting with a download the release does not name waits for the kubelet to
# bring the mounted ConfigMap up to date (it syncs every minute) before taking itself for replaced
RELEASE_PATIENCE_S = 120.0
UPLOAD_BYTES_PER_ITEM = (UPLOAD_CONCURRENCY + 1) * PART_SIZE  # an S3 writer's parts, buffered and in flight


def final_path(item_key: str, gunzip: bool) -> str:
    """Where an item lands below its shard directory."""
    return item_key[:-3] if gunzips(item_key, gunzip) else item_key


def dest_key(shard: int, item_key: str, gunzip: bool) -> str:
    return f"{RAW}/{shard_name(shard)}/{final_path(item_key, gunzip)}"


def check_destinations(items: list[Item], gunzip: bool) -> None:
    """Two items must never share a final path (`a.gz` gunzipped next to `a`)."""
    seen: dict[str, str] = {}
    for item in items:
        final = final_path(item.key, gunzip)
        if final in seen:
            raise ConfigError(f"{redact(seen[final])} and {redact(item.source)} would both be stored as {final!r} (gunzip strips .gz)")
        seen[final] = item.source


def unstorable_on_a_filesystem(items: list[Item], gunzip: bool) -> dict[str, str]:
    """Items a filesystem root cannot hold, with why: an object `x` next to `x/y` (S3 has
    both; a filesystem needs `x` as a file and a directory), or a name longer than
    NAME_MAX less the `.json` its verification record adds. Computed over the whole listing
    when planning (the plan records it), so the same item fails whichever shard it is in;
    each fails alone (exit 3)."""
    finals = {final_path(item.key, gunzip): item.key for item in items}
    below = _directories(finals)  # a directory -> an item under it
    # the verification records mirror the item keys, each with RECORD_SUFFIX: `a` and `a.json/b` clash there
    below_records = _directories({item.key: item.key for item in items})
    problems = {}
    for final, key in finals.items():
        longest = max(len(p.encode()) for p in key.split("/")[:-1] + [key.rsplit("/", 1)[-1] + RECORD_SUFFIX])
        if final in below:
            problems[key] = (f"{key} cannot be stored next to {below[final]}: a filesystem cannot hold {final!r} as a "
                             f"file and a directory at once; exclude one of them")
        elif key + RECORD_SUFFIX in below_records:
            problems[key] = (f"{key} cannot be stored next to {below_records[key + RECORD_SUFFIX]}: the verification "
                             f"record {key + RECORD_SUFFIX!r} would be a file where that item needs a directory; "
                             "exclude one of them")
        elif longest > NAME_MAX:
            problems[key] = (f"{key} cannot be stored: a file name has at most {NAME_MAX - len(RECORD_SUFFIX)} bytes "
                             f"here (its verification record adds {RECORD_SUFFIX!r}), a directory name {NAME_MAX}")
    return problems


# bytes a temporary's name may add to a final or record path (`.trajflow-tmp-<tag>-`)
_TEMP_EXTRA = 48


def too_deep_for(root_dir: Path, items: list[Item], gunzip: bool) -> dict[str, str]:
    """Items whose paths under `root_dir` (in its shard directory, or their verification
    record) would exceed the filesystem's PATH_MAX, with why. Checked by each pod against
    the root as it is mounted there, not in the plan: the same volume may be mounted
    elsewhere by another pod."""
    path_max = os.pathconf(root_dir, "PC_PATH_MAX") - 1 if root_dir.is_dir() else 4095
    deepest = len(str(root_dir).encode()) + _TEMP_EXTRA + max(len(f"/{RAW}/{shard_name(0)}/"), len(f"/{RECORD_PREFIX}"))
    return {
        item.key: (f"{item.key} cannot be stored: its path under {root_dir} would exceed the {path_max + 1}-byte "
                   f"PATH_MAX of the filesystem; shorten global.storage.filesystem.path or exclude it")
        for item in items
        if deepest + max(len((item.key + RECORD_SUFFIX).encode()), len(final_path(item.key, gunzip).encode())) > path_max
    }


def too_large_for(root: Storage, items: list[Item]) -> dict[str, str]:
    """Items whose declared size exceeds what one object of the run root can hold (the
    volume's capacity, or one multipart upload), with why: refused before a byte is fetched
    rather than after filling the volume, and never cut into parts beyond counting."""
    limit = root.largest_object()
    if limit is None:
        return {}
    return {
        item.key: (f"{item.key} cannot be stored: its source declares {item.size:,} bytes, more than one object "
                   f"of {root.uri} can hold ({limit:,} bytes)")
        for item in items
        if item.meta.get("size_known", True) and item.size > limit
    }


def _directories(paths: dict[str, str]) -> dict[str, str]:
    """Every directory the paths need -> the item of one path below it."""
    below: dict[str, str] = {}
    for path, key in paths.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            below.setdefault("/".join(parts[:i]), key)
    return below


class Scheduler:
    """`workers` threads taking units: parts of started items first, then new items."""

    def __init__(self, workers: int, items: list[Item], prepare: Callable[[Item], None], memory_bytes: int):
        self.workers = workers
        self.memory_bytes = memory_bytes  # early bytes all items together may hold in memory
        self._cond = threading.Condition()
        self._queue: deque[Item] = deque(items)
        self._active: list[ItemTransfer] = []  # with parts left to take
        self._unfinished: dict[str, ItemTransfer] = {}  # item key -> transfer, until its item's outcome
        self._busy = 0
        self._live = 0  # workers not yet returned
        self._stopped = False
        self._prepare = prepare

    def add(self, transfer: ItemTransfer) -> None:
        with self._cond:
            if transfer not in self._active:
                self._active.append(transfer)
            self._unfinished[transfer.item.key] = transfer
            self._cond.notify_all()

    def finished(self, key: str) -> None:
        """The item has its outcome: its transfer no longer counts as in progress."""
        with self._cond:
            self._unfinished.pop(key, None)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def pause(self, seconds: float) -> bool:
        """Sleep up to `seconds`, less when the shard stops; returns whether it stopped."""
        with self._cond:
            return self._cond.wait_for(lambda: self._stopped, seconds)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            for transfer in self._unfinished.values():
                transfer.cancelled = True
            self._cond.notify_all()

    def in_progress(self) -> list[ItemTransfer]:
        """Transfers started and not finished, also those whose last parts are all taken."""
        with self._cond:
            return list(self._unfinished.values())

    def _next(self) -> tuple[str, Any, Any] | None:
        with self._cond:
            while True:
                if self._stopped:
                    return None
                memory_left = sum(t.buffered for t in self._unfinished.values()) < self.memory_bytes
                for transfer in list(self._active):
                    part = transfer.take_part(memory_left)
                    if part is not None:
                        self._busy += 1
                        return "part", transfer, part
                    if not transfer.has_todo():
                        self._active.remove(transfer)
                if self._queue:
                    self._busy += 1
                    return "prepare", self._queue.popleft(), None
                if self._busy == 0 and not self._active:
                    return None
                self._cond.wait(timeout=1.0)

    def _worker(self) -> None:
        try:
            self._work()
        finally:
            with self._cond:
                self._live -= 1
                self._cond.notify_all()

    def _work(self) -> None:
        while True:
            unit = self._next()
            if unit is None:
                return
            kind, a, b = unit
            try:
                if kind == "part":
                    a.run_part(b)
                else:
                    self._prepare(a)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def run(self) -> None:
        threads = [threading.Thread(target=self._worker, name=f"download-{i}", daemon=True) for i in range(self.workers)]
        try:
            for t in threads:
                with self._cond:
                    self._live += 1
                t.start()
            for t in threads:
                t.join()
        except BaseException:
            # stopped (a SIGTERM raises here): the workers end their items, which closes their
            # files for the next run and aborts their uploads, rather than die with the process.
            # Counted, not joined: a join interrupted by a signal leaves its thread looking
            # stopped (CPython 3.11), and joining it again returns at once.
            self.stop()
            with self._cond:
                self._cond.wait_for(lambda: self._live == 0, STOP_WAIT_S)
            raise


def raise_if_stopping() -> None:
    """Stop where a stop signal was noted but its exception swallowed on the way (a broad
    `except Exception`, such as the metrics' own, which never fail the data work)."""
    if STOPPING.is_set():
        raise TransientError("stopped by a signal; a rerun resumes where this one stopped")


@dataclass
class ShardSummary:
    shard: int
    shards: int
    results: list[ItemResult] = field(default_factory=list)
    planned_items: int = 0
    planned_bytes: int = 0
    bytes_received: int = 0
    retries: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    already_done: bool = False
    manifest_written: bool = False

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def failed(self) -> list[ItemResult]:
        return [r for r in self.results if r.outcome == "failed"]

    @property
    def exit_code(self) -> int:
        from trajflow.errors import ExitCode

        failed = self.failed
        if any(r.kind == "error" for r in failed):
            return int(ExitCode.ERROR)
        if any(r.kind == "permanent" for r in failed):
            return int(ExitCode.PERMANENT)
        if failed:
            return int(ExitCode.TRANSIENT)
        return int(ExitCode.OK)

    def as_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "shards": self.shards,
            "items_planned": self.planned_items,
            "bytes_planned": self.planned_bytes,
            **{outcome: self.count(outcome) for outcome in DOWNLOAD_OUTCOMES},
            "bytes_received": self.bytes_received,
            "retries": self.retries,
            "failures_by_reason": dict(sorted(self.failures_by_reason.items())),
            "elapsed_s": round(self.elapsed_s, 3),
            "throughput_bytes_per_s": round(self.bytes_received / self.elapsed_s) if self.elapsed_s > 0 else 0,
            "exit_code": self.exit_code,
            "already_done": self.already_done,
        }


class Superseded(ConfigError):
    """The release names another download than this pod's Job: its pods would move the new
    download's files back into their own shards (exit 2, which fails the old Job)."""


def check_release(wanted: tuple[int, str] | None, shards: int, generation: str) -> bool:
    """Raise `Superseded` when the release names (`wanted`: its shard count and generation)
    another download than `shards` of `generation` (an upgrade changed downloader.shards or
    the sources, and this pod's Job is the old one); whether the release is known to name it."""
    if wanted is not None and wanted != (shards, generation):
        raise Superseded(
            f"the release now downloads {wanted[0]} shards of generation {wanted[1]!r} (downloader.shards or "
            f"downloader.config changed), and this pod's Job {shards} of {generation!r}: it stops, writing nothing "
            "more, and the new Job downloads (delete this one, as a sync with pruning does)")
    return wanted is not None


def wait_for_release(wanted: Callable[[], tuple[int, str] | None], shards: int, generation: str,
                     pause: Callable[[float], bool] = STOPPING.wait) -> None:
    """At a pod's start: raise `Superseded` when the release still names another download
    after RELEASE_PATIENCE_S (a new pod may have mounted the ConfigMap before the kubelet saw
    it change); `pause` returns True to stop waiting (a SIGTERM)."""
    deadline = time.monotonic() + RELEASE_PATIENCE_S
    while True:
        try:
            check_release(wanted(), shards, generation)
            return
        except Superseded:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            if left > RELEASE_PATIENCE_S - 1:  # the first look
                log.warning("the release's dataset config names another download than this pod's (%d shards of %r): "
                            "looking again for %.0f s in case it is not up to date yet", shards, generation, left)
            if pause(min(10.0, left)):
                raise


class ShardDownloader:
    def __init__(self, root: Storage, config: DownloadConfig, shard: int, shards: int, metrics: Any = None,
                 progress: Callable[["ShardDownloader"], Any] | None = None,
                 wanted: Callable[[], tuple[int, str] | None] | None = None):
        config.require_sources()
        self.root, self.config, self.shard, self.shards = root, config, shard, shards
        # the shard count and generation the release names now (`wanted_download`); None: unknown
        self.wanted = wanted or (lambda: None)
        self.superseded: Superseded | None = None
        self.metrics = metrics
        self.stats = Stats(metrics)
        self.item_log = trajflow_log.Capped(log)  # failed and missing items: the first few of each in full
        self.settings = TransferSettings(
            concurrency=config.concurrency,
            part_size=config.part_size_mib << 20,
            threshold=config.multipart_threshold_mib << 20,
            attempts=config.retries.attempts,
            backoff=Backoff(config.retries.backoff_seconds, config.retries.max_backoff_seconds),
            gunzip=config.gunzip,
        )
        self.clients = HttpClients(config.timeout_seconds, config.concurrency + 4)
        self.sources: dict[str, SourceRuntime] = build_sources(config, self.clients)
        self.generation = config.generation_id()
        self._progress_factory = progress
        self._lock = threading.Lock()
        self.results: list[ItemResult] = []
        self.items: list[Item] = []
        self.unstorable: dict[str, str] = {}  # item key -> why a filesystem root cannot hold it
        self.scheduler: Scheduler | None = None
        self.completed_bytes = 0
        self.started = time.monotonic()

    # -- plan ---------------------------------------------------------------------------

    def plan(self) -> tuple[dict[str, Any], list[Item]]:
        """The plan in use (its header) and this shard's items in it."""
        def list_items() -> list[Item]:
            items = list_all(self.sources, self.settings.attempts, self.settings.backoff, self.config.concurrency)
            check_destinations(items, self.config.gunzip)
            return items

        def unstorable(items: list[Item]) -> dict[str, str]:
            return unstorable_on_a_filesystem(items, self.config.gunzip)

        def pause(seconds: float) -> None:  # while another pod plans
            if STOPPING.wait(seconds):
                raise TransientError("stopped while waiting for another pod's plan")

        try:
            plan = load_or_create_plan(self.root, self.shards, self.generation, list_items,
                                       unstorable=unstorable if isinstance(self.root, LocalStorage) else None, pause=pause)
            return plan, shard_items(self.root, plan, self.shard)
        except TrajflowError:
            raise
        except ValueError as exc:  # a corrupt stored plan or duplicate keys
            raise PermanentError(str(exc)) from None
        except Exception as exc:
            raise self._root_error(exc, f"cannot read or write the plan in {self.root.uri}/plan/") from None

    def _warn_if_memory_short(self) -> None:
        """On an object-store run root early parts and uploads wait in memory (see
        partSizeMib): settings that may need more than the pod may use are said at the start,
        not left to an OOM kill that logs nothing."""
        limit = memory_limit()
        if isinstance(self.root, LocalStorage) or limit is None:
            return
        need = self.settings.concurrency * (2 * self.settings.part_size + UPLOAD_BYTES_PER_ITEM)
        if need > limit:
            log.warning("downloader.config.concurrency %d and partSizeMib %d may hold %s or more in memory on an "
                        "object-store run root, more than the %s this pod may use: lower them, or raise "
                        "downloader.resources.limits.memory", self.settings.concurrency,
                        self.settings.part_size >> 20, human_bytes(need), human_bytes(limit))

    def _root_error(self, exc: Exception, doing: str = "") -> Exception:
        """Credentials the run root refuses (or none) are a configuration error (exit 2:
        the Job fails), as in `trajflow wait`, not an unexpected crash retried in vain."""
        fatal = fatal_storage_error(exc, self.root.uri)
        if fatal is not None:
            return fatal
        if isinstance(exc, TransientError):  # the store failing again and again: retryable, as it says
            return TransientError(f"{doing}: {exc}") if doing else exc
        return TrajflowError(f"{doing}: {exc}") if doing else exc

    # -- the run ------------------------------------------------------------------------

    def run(self) -> ShardSummary:
        self.started = time.monotonic()
        self.check_release()
        raise_if_stopping()
        plan, self.items = self.plan()
        self.check_release()  # planning takes a while; what follows may delete another plan's manifests
        raise_if_stopping()
        self.unstorable = {**too_large_for(self.root, self.items), **(plan.get("unstorable") or {})}
        if isinstance(self.root, LocalStorage):
            self.unstorable = {**too_deep_for(self.root.root, self.items, self.config.gunzip), **self.unstorable}
        summary = ShardSummary(self.shard, self.shards, planned_items=len(self.items),
                               planned_bytes=sum(i.size for i in self.items))
        if self.metrics is not None:
            self.metrics.items_planned.set(summary.planned_items)
            self.metrics.bytes_planned.set(summary.planned_bytes)
        log.info("shard %d/%d: %d item(s), %d bytes planned (plan %s, generation %s)", self.shard, self.shards,
                 summary.planned_items, summary.planned_bytes, plan["fingerprint"][:12], self.generation)
        try:
            if self._already_done(plan, summary):
                return summary
            if self.shard == 0:  # manifests of a larger shard count must not describe files that have since moved
                remove_foreign_manifests(self.root, STAGE, self.shards)
            self.listing = {info.key: info for info in self.root.list(f"{RAW}/{shard_name(self.shard)}/")}
        except TrajflowError:
            raise
        except Exception as exc:
            raise self._root_error(exc, f"cannot read {self.root.uri}/{RAW}/") from None
        self._warn_if_memory_short()
        # largest first: a big item started last would finish long after everything else
        order = sorted(self.items, key=lambda i: (-i.size, i.key))
        self.scheduler = Scheduler(self.settings.concurrency, order, self._prepare,
                                   memory_bytes=self.settings.concurrency * self.settings.part_size)
        reporter = self._progress_factory(self) if self._progress_factory else None
        try:
            self.scheduler.run()
        finally:
            if reporter is not None:
                reporter.stop()
        if self.superseded is not None:
            raise self.superseded
        if not any(r.outcome == "failed" for r in self.results):
            # the manifest vouches for the whole shard: an item without an outcome is a failure
            concluded = {r.item.key for r in self.results}
            for item in self.items:
                if item.key not in concluded:
                    self._fail_internally(item, f"{item.key}: no outcome")
        summary.results = sorted(self.results, key=lambda r: r.item.key)
        summary.bytes_received = self.stats.bytes_received
        summary.retries = self.stats.retries
        summary.failures_by_reason = dict(self.stats.failures)
        summary.elapsed_s = time.monotonic() - self.started
        if summary.exit_code == 0:
            try:
                if self.check_release():
                    keep_plan_in_use(self.root, plan)  # a stopped pod of a replaced Job may have taken it
                self._write_manifest(plan, summary)
            except TrajflowError:
                raise
            except Exception as exc:  # every item is in place: a rerun skips them and writes it
                raise self._root_error(exc, f"cannot write the manifest of shard {self.shard}") from None
        return summary

    def _already_done(self, plan: dict[str, Any], summary: ShardSummary) -> bool:
        try:
            doc = read_manifest(self.root, STAGE, self.shard)
        except ValueError as exc:
            log.warning("%s; it is replaced", exc)
            doc = None
            self.root.delete(manifest_key(STAGE, self.shard))
        if doc is None:
            return False
        same_plan = (
            doc.get("shards") == self.shards and doc.get("plan_fingerprint") == plan["fingerprint"]
            and doc.get("generation") == self.generation
        )
        if same_plan:
            present = {info.key: info.size for info in self.root.list(f"{RAW}/{shard_name(self.shard)}/")}
            missing = [e["key"] for e in doc.get("items", []) if present.get(e["key"]) != e.get("size")]
            if not missing:
                log.info("shard %d is already done for this plan (%s); nothing to do", self.shard, manifest_key(STAGE, self.shard))
                summary.already_done = True
                summary.results = [
                    ItemResult(Item(e["item"], int(e.get("source_size", e["size"])), e.get("source", "")), e["key"], "skipped")
                    for e in doc.get("items", [])
                ]
                summary.elapsed_s = time.monotonic() - self.started
                if self.metrics is not None:
                    self.metrics.items.labels(outcome="skipped").inc(len(summary.results))
                    self.metrics.bytes_completed.set(summary.planned_bytes)
                return True
            log.warning("shard %d's manifest lists %d file(s) that are gone (e.g. %s); checking every item again",
                        self.shard, len(missing), missing[0])
        else:
            log.info("removing shard %d's manifest of another plan (%s shards, plan %s)", self.shard, doc.get("shards"),
                     str(doc.get("plan_fingerprint", ""))[:12])
        self.root.delete(manifest_key(STAGE, self.shard))
        return False

    # -- per item -----------------------------------------------------------------------

    def _prepare(self, item: Item) -> None:
        try:
            self._prepare_item(item)
        except Exception as exc:  # a bug fails the item loudly: an item without a result would pass unnoticed
            log.exception("unexpected error preparing %s", item.key)
            self._fail_internally(item, f"{item.key}: unexpected {type(exc).__name__}: {exc}")

    def _fail_internally(self, item: Item, error: str) -> None:
        """A failure of the downloader itself (a bug): the item fails and stops the shard."""
        self._done(ItemResult(item, dest_key(self.shard, item.key, self.config.gunzip), "failed", error=error,
                              kind="error", reason="storage"))

    def _prepare_item(self, item: Item) -> None:
        """Start the item; while another process (a duplicate pod of this shard, another run
        on this run root) is fetching it, wait for that one to let go, then take its result
        or the item up."""
        dest = dest_key(self.shard, item.key, self.config.gunzip)
        delay = 0.5
        assert self.scheduler is not None
        while (busy := self._start_item(item, dest)) is not None:
            if delay == 0.5:
                log.info("%s; waiting for it to finish", busy)
            if self.scheduler.pause(delay):
                self._done(ItemResult(item, dest, "failed", error=f"{busy}; stopped with the shard while waiting",
                                      kind="transient", reason="stopped"))
                return
            delay = min(delay * 2, BUSY_POLL_MAX_S)
            here = self.root.stat(dest)  # the other process may have finished it
            if here is not None:
                self.listing[dest] = here

    def _start_item(self, item: Item, dest: str) -> str | None:
        """Skip, fail or start fetching the item; the reason when another process holds it."""
        if self._is_superseded():
            self._done(ItemResult(item, dest, "failed", error=str(self.superseded), kind="transient", reason="stopped"))
            return None
        if item.key in self.unstorable:
            self.stats.failure("storage")
            self._done(ItemResult(item, dest, "failed", error=self.unstorable[item.key], kind="permanent", reason="storage"))
            return None
        try:
            result = self._without_download(item, dest)
        except Exception as exc:
            result = ItemResult(item, dest, "failed", error=f"checking {dest}: {exc}", kind="error", reason="storage")
        if result is not None:
            self._done(result)
            return None
        source = self.sources.get(item.key.split("/", 1)[0])
        if source is None:  # the plan came from this generation's sources, so this is a bug
            self._fail_internally(item, f"no source for {item.key}")
            return None
        assert self.scheduler is not None
        transfer = ItemTransfer(item, source, self.root, dest, self.settings, self.stats, self._done,
                                self.scheduler.add, self.scheduler.wake)
        try:
            transfer.begin()
        except FetchError as exc:
            if exc.reason == "busy":
                return str(exc)
            if counts_as_failure(exc, source.required):
                self.stats.failure(exc.reason)
            kind = "permanent" if exc.kind is Kind.PERMANENT else "transient"
            self._done(ItemResult(item, dest, "failed", error=str(exc), kind=kind, reason=exc.reason))
            return None
        except StorageFailure as exc:
            self._done(ItemResult(item, dest, "failed", error=str(exc), kind="error", reason="storage"))
            return None
        transfer.launch()
        return None

    def _without_download(self, item: Item, dest: str) -> ItemResult | None:
        """Skip, reuse or adopt when a verified copy exists; None when the item must be fetched."""
        fingerprint = item_fingerprint(item, self.config.gunzip)
        record = read_record(self.root, item.key)
        if record is not None and record.fingerprint == fingerprint:
            here = self.listing.get(dest)
            if record.location == dest:
                if here is not None and here.size == record.size:
                    if modified_since(record, here):
                        return self._adopt(item, dest, fingerprint, record, why="modified since it was verified")
                    if not record.modified_ns and here.modified_ns:
                        write_record(self.root, record)  # written before records noted times: from now on it does
                    return ItemResult(item, dest, "skipped", record=record)
                return None
            there = self.root.stat(record.location)
            if there is not None and there.size == record.size:
                if modified_since(record, there) and rehash(self.root, record.location).sha256 != record.sha256:
                    self.item_log.log(logging.WARNING, "items changed since verified",
                                      "%s changed since it was verified: removed, and %s is fetched again",
                                      record.location, item.key)
                    self.root.delete(record.location)
                    return None
                try:
                    relocate(self.root, record.location, dest, record)
                except Exception as exc:
                    log.warning("cannot move %s to %s (%s); fetching it", record.location, dest, exc)
                    return None
                moved = dataclasses.replace(record, location=dest, verified_at="")
                write_record(self.root, moved)
                return ItemResult(item, dest, "reused", record=moved)
            if here is not None and here.size == record.size:
                # moved here by a run killed before it updated the record
                return self._adopt(item, dest, fingerprint, record)
            return None
        if record is None and dest in self.listing:
            return self._adopt(item, dest, fingerprint)
        return None

    def check_release(self) -> bool:
        """Raise `Superseded` when the release names another download than this pod's;
        whether the release is known to name this one."""
        return check_release(self.wanted(), self.shards, self.generation)

    def _is_superseded(self) -> bool:
        """Whether the release names another download now, looked at before each item (a
        stat of the mounted file while it is unchanged): then the shard stops, rather than
        move the new download's files into its own shard."""
        if self.superseded is None:
            try:
                self.check_release()
            except Superseded as exc:
                self.superseded = exc
        if self.superseded is None:
            return False
        assert self.scheduler is not None
        self.scheduler.stop()
        return True

    def _adopt(self, item: Item, dest: str, fingerprint: str, record: Record | None = None,
               why: str = "in place without a record") -> ItemResult | None:
        """A file has the final name but no (current) record: it was verified when it got the
        name (a kill came before the record); or it was modified since its record was
        written. Re-hash it once, check what is known of it:
        the item's own record when there is one; else its size and declared checksums.
        A decompressed file has no planned size or checksum to check, and `x` and `x.gz`
        share a final name: without this item's record nothing ties the file to it."""
        gunzipped = gunzips(item.key, self.config.gunzip)
        if record is None and (gunzipped or self._stored_by_sibling(item, dest)):
            return None
        info = self.listing[dest]
        if not gunzipped and item.meta.get("size_known", True) and info.size != item.size:
            return None
        declared = declared_checksums(item)
        digests = rehash(self.root, dest, md5=declared.needs_md5 and not gunzipped)
        if record is not None and digests.sha256 != record.sha256:
            return None
        if gunzipped:
            assert record is not None
            checks, source_size, source_sha256 = list(record.checks), record.source_size, record.source_sha256
        else:
            try:
                checks = recorded_checks(item.meta.get("size_known", True), declared.check(digests, dest))
            except FetchError:
                return None
            source_size, source_sha256 = digests.size, digests.sha256
        record = Record(
            item=item.key, fingerprint=fingerprint, location=dest, size=digests.size, sha256=digests.sha256,
            source_size=source_size, source_sha256=source_sha256, source_md5=digests.md5, checks=checks,
        )
        write_record(self.root, record)
        # one line an item would be 10^6 lines after a copy of the volume that lost the times
        self.item_log.log(logging.INFO, "adopted items", "adopted %s (%s; re-hashed)", dest, why)
        return ItemResult(item, dest, "adopted", record=record)

    def _stored_by_sibling(self, item: Item, dest: str) -> bool:
        """Whether the file at `dest` is `x` fetched for `x.gz` (gunzipped), or the reverse."""
        sibling = item.key[:-3] if item.key.endswith(".gz") else f"{item.key}.gz"
        other = read_record(self.root, sibling)
        return other is not None and other.location == dest

    def _done(self, result: ItemResult) -> None:
        source = self.sources.get(result.item.key.split("/", 1)[0])
        if self.scheduler is not None:
            self.scheduler.finished(result.item.key)
        if (result.outcome == "failed" and source is not None
                and is_missing(result.kind, result.reason, source.required)):
            result = dataclasses.replace(result, outcome="missing")
        if result.outcome == "failed" and result.kind == "error":
            self.stats.failure(result.reason)  # the run root failing, counted with the source failures
        with self._lock:
            self.results.append(result)
            if result.verified:  # an item of unknown size counts the bytes it turned out to have
                known = result.item.meta.get("size_known", True)
                self.completed_bytes += result.item.size if known or result.record is None else result.record.source_size
        if result.outcome == "failed":
            self.item_log.log(logging.WARNING, "failed items", "%s failed (%s, %s): %s", result.item.key,
                              result.kind, result.reason, result.error)
        elif result.outcome == "missing":
            self.item_log.log(logging.INFO, "missing optional items", "%s is missing at the source (optional): %s",
                              result.item.key, result.error)
        else:
            log.debug("%s %s", result.item.key, result.outcome)
        if self.metrics is not None:
            self.metrics.items.labels(outcome=result.outcome).inc()
            self.metrics.last_progress.set(time.time())
            self.metrics.bytes_completed.set(self.completed_bytes)
        if result.kind == "error" and self.scheduler is not None:
            log.error("stopping shard %d after an error: %s", self.shard, result.error)
            self.scheduler.stop()

    # -- progress -----------------------------------------------------------------------

    def progress(self) -> dict[str, Any]:
        """A snapshot for progress lines: items and bytes done, in flight, failures."""
        active = self.scheduler.in_progress() if self.scheduler else []
        with self._lock:
            done = len(self.results)
            failed = sum(1 for r in self.results if r.outcome == "failed")
            completed = self.completed_bytes
        partial = sum(t.present_bytes() for t in active)
        return {
            "items_done": done,
            "items_total": len(self.items),
            "failed": failed,
            "bytes_done": completed + partial,
            "bytes_total": sum(i.size for i in self.items),  # an item of unknown size counts 0
            "sizes_known": all(i.meta.get("size_known", True) for i in self.items),
            "bytes_received": self.stats.bytes_received,
            "inflight": self.stats.inflight,
            "retries": self.stats.retries,
            "elapsed_s": time.monotonic() - self.started,
        }

    # -- the manifest -------------------------------------------------------------------

    def _write_manifest(self, plan: dict[str, Any], summary: ShardSummary) -> None:
        entries, missing = [], []
        for result in summary.results:
            if result.record is not None:
                rec = result.record
                entries.append({
                    "key": result.dest_key,
                    "path": result.dest_key[len(f"{RAW}/{shard_name(self.shard)}/"):],
                    "item": result.item.key,
                    "size": rec.size,
                    "sha256": rec.sha256,
                    "source": result.item.source,
                    "source_size": rec.source_size,
                    "source_sha256": rec.source_sha256,
                    "checks": rec.checks,
                })
            elif result.outcome == "missing":
                missing.append({"item": result.item.key, "source": result.item.source, "reason": result.reason})
        write_manifest(
            self.root, STAGE, self.shard, self.shards, entries,
            plan_fingerprint=plan["fingerprint"], generation=self.generation, missing=missing,
            bytes=sum(e["size"] for e in entries),
        )
        summary.manifest_written = True
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """Temporaries left in this shard's directory by killed runs: download temporaries
        nobody holds a lock on, and other writers' temporaries older than an hour. Shard 0
        also sweeps the directories of shard numbers this count does not have: a partial
        download there, from a run with more shards, is resumed by no one."""
        self._abort_stale_uploads()
        if not isinstance(self.root, LocalStorage):
            return
        directories = [f"{RAW}/{shard_name(self.shard)}"]
        if self.shard == 0:
            raw = self.root.local_path(RAW)
            with contextlib.suppress(OSError):
                directories += sorted(f"{RAW}/{d.name}" for d in raw.iterdir()
                                      if d.name.isdigit() and int(d.name) >= self.shards and d.is_dir())
        removed = 0
        try:
            for directory in directories:
                removed += sweep_abandoned_temporaries(self.root.local_path(directory))
                # a download temporary of a live process may be older (a stalled stream): by its lock only
                removed += self.root.remove_stale_temporaries(directory, keep=DOWNLOAD_TMP_PREFIX)
        except OSError as exc:
            log.warning("could not clean temporaries: %s", exc)
            return
        if removed:
            log.info("removed %d abandoned temporary file(s)", removed)

    def _abort_stale_uploads(self) -> None:
        """The object-store counterpart: uploads that killed runs began in this shard's
        directory (shard 0: also in those of shard numbers this count does not have) over an
        hour ago. Never fails the shard."""
        mine = f"{RAW}/{shard_name(self.shard)}/"

        def stale(key: str) -> bool:
            shard = key[len(RAW) + 1:].split("/", 1)[0]
            return key.startswith(mine) or (self.shard == 0 and shard.isdigit() and int(shard) >= self.shards)

        self.root.abort_stale_uploads(f"{RAW}/" if self.shard == 0 else mine, STALE_UPLOAD_S, stale)


def raise_for(summary: ShardSummary) -> None:
    """Turn a failed summary into the error (and exit code) the chart's podFailurePolicy expects."""
    code = summary.exit_code
    if code == 0:
        return
    failed = sorted(summary.failed, key=lambda r: r.reason == "stopped")  # what stopped the shard, first
    sample = "; ".join(f"{r.item.key}: {r.error}" for r in failed[:3])
    more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
    if code == int(PermanentError.exit_code):
        permanent = sum(1 for r in failed if r.kind == "permanent")
        raise PermanentError(f"{permanent} item(s) failed permanently, {len(failed) - permanent} transiently: {sample}{more}")
    if code == int(TransientError.exit_code):
        raise TransientError(f"{len(failed)} item(s) still failing after retries (rerun resumes them): {sample}{more}")
    raise TrajflowError(f"the run root failed: {sample}{more}")
