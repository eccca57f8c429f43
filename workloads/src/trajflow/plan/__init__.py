"""Deterministic, byte-balanced partitioning of (key, size) items over N shards.

The plan is stored as a versioned header written with write-if-absent plus one part per
shard (see `load_or_create_plan`): the first pod to write the header wins and every pod
then reads the same plan, so all shards agree even if the source listing changes while
they start.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from trajflow.storage.base import Storage
from trajflow.storage.manifest import PLAN_KEY, read_top_level_fields

log = logging.getLogger(__name__)

PLAN_VERSION = 2
INFO_FILE_SUFFIX = "/meta/info.json"


@dataclass(frozen=True)
class Item:
    key: str  # destination path under the shard (e.g. "<source>/<relative path>")
    size: int
    source: str = ""  # where to fetch it (URL or URI)
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)  # checksums, etag...

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"key": self.key, "size": self.size, "source": self.source}
        if self.meta:
            doc["meta"] = self.meta
        return doc

    @staticmethod
    def from_json(doc: dict[str, Any]) -> "Item":
        return Item(doc["key"], int(doc["size"]), doc.get("source", ""), dict(doc.get("meta") or {}))


def planning_weight(items: list[Item]) -> Callable[[Item], int]:
    """Bytes to balance: the size, or for an item whose size is unknown (planned as 0, e.g.
    a presigned URL that refuses HEAD) the median known size (1 when none is known), so
    that unknown items spread over the shards instead of all landing on one."""
    known = sorted(it.size for it in items if it.meta.get("size_known", True))
    guess = max(1, known[len(known) // 2]) if known else 1
    return lambda it: it.size if it.meta.get("size_known", True) else guess


def partition(items: Iterable[Item], shards: int) -> list[list[Item]]:
    """Largest-first greedy (LPT) onto the currently lightest shard.

    Deterministic: items are ordered by (-weight, key) and ties between equally loaded
    shards go to the one with fewer items, then to the lowest shard number, so the same
    items always give the same plan whatever order the listing returned them in. Each
    shard's bytes are within one largest item of the ideal total/N.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shard count must be an integer of at least 1, got {shards!r}")
    listed = list(items)
    weight = planning_weight(listed)
    ordered = sorted(listed, key=lambda it: (-weight(it), it.key))
    seen: set[str] = set()
    for it in ordered:
        if it.size < 0:
            raise ValueError(f"item {it.key!r} has a negative size {it.size}")
        if it.key in seen:
            raise ValueError(f"duplicate item key {it.key!r}: two sources would write the same path")
        seen.add(it.key)
    heap = [(0, 0, s) for s in range(shards)]
    out: list[list[Item]] = [[] for _ in range(shards)]
    for it in ordered:
        load, count, s = heapq.heappop(heap)
        out[s].append(it)
        heapq.heappush(heap, (load + weight(it), count + 1, s))
    for bucket in out:
        bucket.sort(key=lambda it: it.key)
    return out


def fingerprint(items: Iterable[Item]) -> str:
    """Identity of an item set, to tell whether a stored plan covers the same listing."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda i: i.key):
        h.update(f"{it.key}\0{it.size}\0{it.source}\n".encode())
    return h.hexdigest()


def plan_document(items: list[Item], shards: int, generation: str = "",
                  unstorable: dict[str, str] | None = None) -> tuple[dict[str, Any], list[list[dict[str, Any]]]]:
    """The plan's header and each shard's items (as stored)."""
    parts = partition(items, shards)
    header: dict[str, Any] = {
        "version": PLAN_VERSION,
        "shards": shards,
        "generation": generation,
        "fingerprint": fingerprint(items),
        "items": len(items),
        "total_bytes": sum(it.size for it in items),
        # which shard holds each LeRobot dataset's meta/info.json: preprocessing pods find a
        # dataset's rate and robot here instead of reading every part of a large plan
        "info_files": {it.key: s for s, part in enumerate(parts) for it in part if it.key.endswith(INFO_FILE_SUFFIX)},
    }
    if unstorable:
        header["unstorable"] = unstorable
    return header, [[it.to_json() for it in part] for part in parts]


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def load_or_create_plan(
    storage: Storage, shards: int, generation: str, list_items: Callable[[], list[Item]], key: str = PLAN_KEY,
    unstorable: Callable[[list[Item]], dict[str, str]] | None = None, pause: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """The header of the plan every pod of this shard count and source configuration uses.

    The plan lives in `plan/download-<shards>-<generation>/`: `plan.json`, the header,
    created first-writer-wins, so that pods starting while the source listing changes all
    follow the first listing; and each shard's items in `<digest>/<shard>.json`, all
    written before the header. A pod reads the header and its own shard's items
    (`shard_items`), never the whole plan: a million-item plan is hundreds of MB. Only
    when no plan exists does a pod list the sources. A new shard count or new sources
    (another `generation`) make a new plan; the items already verified are reused by the
    downloader, not by the plan. `plan/download.json` is a copy of the header in use.
    `unstorable` names the items the run root cannot hold, once, over the whole listing.
    One pod lists at a time (`_lease_planning_or_wait`): the others wait for its plan,
    `pause`-ing between looks (a pause may raise to stop waiting).
    """
    directory = _plan_directory(shards, generation, key)
    authoritative = f"{directory}/plan.json"
    earlier = storage.exists(authoritative)
    mine: dict[str, Any] = {}
    lease = None if earlier else _lease_planning_or_wait(storage, directory, authoritative, pause)
    if lease is not None:
        with lease:
            items = list_items()
            mine, parts = plan_document(items, shards, generation, unstorable(items) if unstorable else None)
            _write_parts(storage, directory, mine, parts)
            mine["created_at"] = round(time.time(), 3)
            storage.write_if_absent(authoritative, _encode(mine))
    raw = storage.read_bytes(authoritative)
    where = f"{storage.uri}/{authoritative}"
    try:
        stored = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{where}: corrupt plan ({exc}): {_remedy(directory)}") from None
    if not isinstance(stored, dict) or stored.get("version") != PLAN_VERSION:
        version = stored.get("version") if isinstance(stored, dict) else None
        raise ValueError(f"{where}: not a plan of version {PLAN_VERSION} (version {version!r}): {_remedy(directory)}")
    if stored.get("shards") != shards or not isinstance(stored.get("parts"), str) \
            or not isinstance(stored.get("fingerprint"), str):
        raise ValueError(f"{where}: corrupt plan (no {shards}-shard header): {_remedy(directory)}")
    if mine and mine["parts"] != stored["parts"]:
        _delete_parts(storage, mine)  # another pod's plan won: ours is never read
    current = storage.read_bytes(key) if storage.exists(key) else b""
    if current != raw:
        if earlier and current:
            _warn_if_older_listing(stored, current, where)
        storage.write_bytes(key, raw)
    return stored


# One pod lists the sources while the others wait for its plan: hundreds of pods each listing
# a million objects (or sending a HEAD to each of 10^5 URLs) get throttled by the source and
# each hold the whole listing. The planner renews its lease; a lease not renewed for
# _LEASE_STALE_S (its pod died) or released (its listing failed) passes to the next pod.
_LEASE_BEAT_S = 15.0
_LEASE_STALE_S = 120.0
_WAIT_POLL_S = (1.0, 10.0)  # first and longest pause between looks at the plan


class _PlanningLease:
    """A term of the right to plan: `planning/<term>.json`, created once (write-if-absent,
    which on stores without conditional writes cannot create a key twice), renewed by a thread
    while held, and marked released when planning ends, however it ends."""

    def __init__(self, storage: Storage, key: str, holder: str):
        self.storage, self.key, self.holder = storage, key, holder
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._renew, name="plan-lease", daemon=True)

    @staticmethod
    def document(holder: str, released: bool = False) -> bytes:
        return _encode({"holder": holder, "beat": round(time.time(), 3), "released": released})

    def _renew(self) -> None:
        while not self._stop.wait(_LEASE_BEAT_S):
            try:
                self.storage.write_bytes(self.key, self.document(self.holder))
            except Exception as exc:  # noqa: BLE001 - the next beat tries again
                log.warning("cannot renew the planning lease %s: %s", self.key, exc)

    def __enter__(self) -> "_PlanningLease":
        self._beat.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.release()

    def release(self) -> None:
        self._stop.set()
        if self._beat.ident is not None:
            self._beat.join()
        # planned, or failed: a pod that finds no plan (this one failed, or it was deleted)
        # plans at once instead of waiting for the lease to go stale
        try:
            self.storage.write_bytes(self.key, self.document(self.holder, released=True))
        except Exception as exc:  # noqa: BLE001 - it goes stale instead
            log.warning("cannot release the planning lease %s: %s", self.key, exc)


def _lease_planning_or_wait(storage: Storage, directory: str, authoritative: str,
                            pause: Callable[[float], None]) -> _PlanningLease | None:
    """The lease to plan, or None once another pod's plan exists."""
    prefix = f"{directory}/planning/"
    holder = f"{socket.gethostname()} (pid {os.getpid()})"
    delay, waiting_for = _WAIT_POLL_S[0], None
    while not storage.exists(authoritative):
        terms = [int(name) for name in (info.key[len(prefix):-5] for info in storage.list(prefix)
                                        if info.key.endswith(".json")) if name.isdecimal()]
        term = max(terms, default=0)
        lease = _read_lease(storage, f"{prefix}{term}.json") if term else None
        if lease is None or lease["released"] or time.time() - lease["beat"] > _LEASE_STALE_S:
            if lease is not None and not lease["released"]:
                log.warning("%s stopped renewing its lease to plan %s; planning here", lease["holder"], directory)
            key = f"{prefix}{term + 1}.json"
            if storage.write_if_absent(key, _PlanningLease.document(holder)):
                lease = _PlanningLease(storage, key, holder)
                try:
                    planned = storage.exists(authoritative)
                except BaseException:
                    lease.release()  # else the others wait for it to go stale
                    raise
                if not planned:
                    return lease
                # the planner wrote its plan, then released, since this pod looked for it
                lease.release()
                return None
            continue  # another pod took this term: look again
        if waiting_for != lease["holder"]:
            waiting_for = lease["holder"]
            log.info("%s is listing the sources for %s; waiting for its plan", waiting_for, directory)
        pause(delay)
        delay = min(delay * 1.5, _WAIT_POLL_S[1])
    return None


def _read_lease(storage: Storage, key: str) -> dict[str, Any] | None:
    """A lease's holder, last beat and state; None when gone or unreadable (taken over)."""
    try:
        doc = json.loads(storage.read_bytes(key))
        return {"holder": str(doc["holder"]), "beat": float(doc["beat"]), "released": bool(doc["released"])}
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        return None


def keep_plan_in_use(storage: Storage, plan: dict[str, Any]) -> None:
    """Put `plan` back in use where another plan is (a pod of a Job an upgrade replaced may
    have put its own there before it stopped): its Job is the one the release runs now."""
    in_use = read_plan_in_use(storage)
    if in_use is None or in_use.get("parts") != plan["parts"]:
        log.warning("plan/download.json names another plan (%s shards) than this Job's (%s shards): putting this "
                    "Job's back", None if in_use is None else in_use.get("shards"), plan.get("shards"))
        storage.write_bytes(PLAN_KEY, _encode(plan))


def read_plan_in_use(storage: Storage, fields_only: bool = False) -> dict[str, Any] | None:
    """The header of the plan in use (`plan/download.json`); None when there is none yet, it
    is being replaced, or it is unreadable. ``fields_only``: its lists and objects read as
    None, in the memory of a few chunks (a plan written before its parts held every item)."""
    try:
        doc = read_top_level_fields(storage, PLAN_KEY) if fields_only else json.loads(storage.read_bytes(PLAN_KEY))
    except (ValueError, FileNotFoundError):
        return None
    return doc if isinstance(doc, dict) else None


def _plan_directory(shards: int, generation: str, key: str = PLAN_KEY) -> str:
    stem = key.rsplit(".", 1)[0]
    return f"{stem}-{shards}-{generation}" if generation else f"{stem}-{shards}"


def _remedy(directory: str) -> str:
    return f"delete {directory}/ (or change downloader.config.planGeneration) to plan again"


def _part_key(plan: dict[str, Any], shard: int) -> str:
    return f"{plan['parts']}{shard:05d}.json"


def _write_parts(storage: Storage, directory: str, header: dict[str, Any], parts: list[list[dict[str, Any]]]) -> None:
    """Every shard's items, before the header that makes them the plan. Their directory is
    named by their content: pods that partition alike write the same bytes to the same
    keys, pods that do not (a listing that changed between them) never mix their parts."""
    encoded = [_encode({"fingerprint": header["fingerprint"], "shard": shard, "items": part})
               for shard, part in enumerate(parts)]
    digest = hashlib.sha256()
    for data in encoded:
        digest.update(hashlib.sha256(data).digest())
    header["parts"] = f"{directory}/{digest.hexdigest()[:16]}/"

    def write(shard: int) -> None:
        storage.write_bytes(_part_key(header, shard), encoded[shard])

    with ThreadPoolExecutor(max_workers=min(16, len(parts))) as pool:  # thousands of PUTs on S3
        list(pool.map(write, range(len(parts))))


def _delete_parts(storage: Storage, header: dict[str, Any]) -> None:
    for info in storage.list(header["parts"]):
        try:
            storage.delete(info.key)
        except Exception as exc:  # noqa: BLE001 - tidying only: the plan in use is elsewhere
            log.warning("cannot delete the unused plan part %s: %s", info.key, exc)


# a plan younger than this was made by a pod of this run (pods that start together see it
# before plan/download.json is pointed at it): its listing is current
_FRESH_PLAN_S = 300.0


def _warn_if_older_listing(stored: dict[str, Any], current: bytes, where: str) -> None:
    """Going back to a shard count planned before reuses that plan's listing, which may miss
    what the sources gained since (a plan of each count and generation is fixed)."""
    created = stored.get("created_at")
    if isinstance(created, (int, float)) and time.time() - created < _FRESH_PLAN_S:
        return
    try:
        in_use = json.loads(current)
    except ValueError:
        return
    if isinstance(in_use, dict) and in_use.get("fingerprint") != stored.get("fingerprint"):
        log.warning("%s (%s shards) lists other items than the plan in use (%s shards): every pod of this shard "
                    "count follows it as it was made, however old its listing; change "
                    "downloader.config.planGeneration to list the sources again",
                    where, stored.get("shards"), in_use.get("shards"))


def shard_item_docs(storage: Storage, plan: dict[str, Any], shard: int) -> list[dict[str, Any]]:
    """Shard `shard`'s items as the plan stores them (JSON), from its own part of the plan."""
    if not 0 <= shard < plan["shards"]:
        raise ValueError(f"shard {shard} is outside the plan's 0..{plan['shards'] - 1}")
    if "assignments" in plan:  # a version-1 plan, made before the parts: every shard inline
        return plan["assignments"][shard]
    key = _part_key(plan, shard)
    where, remedy = f"{storage.uri}/{key}", _remedy(plan["parts"].rstrip("/").rsplit("/", 1)[0])
    try:
        doc = json.loads(storage.read_bytes(key))
    except FileNotFoundError:
        raise ValueError(f"{where}: part of the plan is missing: {remedy}") from None
    except ValueError as exc:
        raise ValueError(f"{where}: corrupt part of the plan ({exc}): {remedy}") from None
    if not isinstance(doc, dict) or doc.get("fingerprint") != plan["fingerprint"] or doc.get("shard") != shard \
            or not isinstance(doc.get("items"), list):
        raise ValueError(f"{where}: not shard {shard}'s part of plan {plan['fingerprint'][:12]}: {remedy}")
    return doc["items"]


def shard_items(storage: Storage, plan: dict[str, Any], shard: int) -> list[Item]:
    return [Item.from_json(d) for d in shard_item_docs(storage, plan, shard)]
