"""Integrity: digests computed while streaming, what the source says they should be, and
the per-item verification records that let a rerun skip without re-hashing.

Checks, all of which must pass before an item gets its final name:
- size: the bytes received equal the Content-Length / Content-Range total (or the file size);
- sha256: always computed, recorded, and compared when the source declares one (catalog
  `checksums`, URL list `sha256`, `Repr-Digest`/`Digest: sha-256`, `x-amz-checksum-sha256`);
- md5: computed only when something declares one: an S3 single-part ETag (not for SSE-KMS or
  SSE-C objects, whose ETags are not MD5s; multipart ETags are digests of part digests and
  are not checked), `Content-MD5`/`Content-Digest` of a whole-object response, `Digest: md5`,
  `x-goog-hash: md5`, or an md5 in the configuration.

Verification records. After an item is in place, `raw/.trajflow-verified/<item>.json` is
written (atomically) with its size, sha256, where it lies, and a fingerprint of the plan
entry it satisfies (source URL, size, ETag/Last-Modified, declared checksums, gunzip).
A rerun — or a pod of another shard count — reads the record, checks that the file at
`location` still has the recorded size (and, on a filesystem, modification time), and skips
or reuses it: nothing is re-hashed. A file modified since it was verified is hashed again
and fetched again unless its bytes are still the recorded ones.
Per-item records rather than the shard manifest, because the manifest exists only once a
whole shard is done: an interrupted shard's finished items must be skippable too, and a
re-sharded item must be findable without knowing which old shard held it. The records
live under one hidden prefix (`.trajflow-` segments are excluded from listings), keyed by
the item, not by shard. A record is only ever replaced, after a newer verified copy is in
place, never deleted first; a record whose fingerprint differs from the plan's says the
file at its location is an older version.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from trajflow.download.failures import FetchError, Kind
from trajflow.plan import Item
from trajflow.storage import LocalStorage, ObjectInfo, Storage
from trajflow.storage.local import temp_name

log = logging.getLogger(__name__)

RECORD_PREFIX = "raw/.trajflow-verified/"
RECORD_SUFFIX = ".json"
RECORD_VERSION = 1
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class Digests:
    """sha256 always, md5 when something will be compared with it; fed in byte order."""

    def __init__(self, md5: bool = False):
        self._sha256 = hashlib.sha256()
        self._md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._sha256.update(data)
        if self._md5 is not None:
            self._md5.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    @property
    def md5(self) -> str:
        return self._md5.hexdigest() if self._md5 is not None else ""


@dataclass
class Expected:
    """Checksums the source declares for one item, each with where it came from."""

    sha256: dict[str, str] = field(default_factory=dict)  # origin -> hex
    md5: dict[str, str] = field(default_factory=dict)

    def add(self, algorithm: str, value: str, origin: str) -> None:
        value = value.strip().lower()
        table = self.sha256 if algorithm == "sha256" else self.md5
        pattern = _HEX64 if algorithm == "sha256" else _HEX32
        if pattern.match(value):
            table[origin] = value

    def merge(self, other: "Expected") -> None:
        self.sha256.update(other.sha256)
        self.md5.update(other.md5)

    @property
    def needs_md5(self) -> bool:
        return bool(self.md5)

    def check(self, digests: Digests, where: str) -> list[str]:
        """Compare; returns the checks made ("sha256:catalog"...). A mismatch raises a
        RESTART FetchError: the item is fetched again, and reported once attempts run out."""
        checks = []
        for origin, value in sorted(self.sha256.items()):
            if digests.sha256 != value:
                raise FetchError(
                    f"{where}: sha256 {digests.sha256} does not match {value} declared by {origin}", Kind.RESTART, "checksum"
                )
            checks.append(f"sha256:{origin}")
        for origin, value in sorted(self.md5.items()):
            if digests.md5 != value:
                raise FetchError(
                    f"{where}: md5 {digests.md5} does not match {value} declared by {origin}", Kind.RESTART, "checksum"
                )
            checks.append(f"md5:{origin}")
        return checks


def _b64_hex(value: str) -> str:
    try:
        return base64.b64decode(value.strip().strip(":"), validate=True).hex()
    except (binascii.Error, ValueError):
        return ""


def _pairs(value: str) -> list[tuple[str, str]]:
    """`a=x, b=y` -> [(a, x), (b, y)], names lowercased (base64 may itself contain '=')."""
    out = []
    for piece in value.split(","):
        name, sep, rest = piece.strip().partition("=")
        if sep:
            out.append((name.strip().lower(), rest.strip()))
    return out


def recorded_checks(sized: bool, sums: list[str]) -> list[str]:
    """The checks a verification record lists: the checksums compared, after "size" only when a
    size was known (a body of unknown length ended by a close proves none)."""
    return ["size", *sums] if sized else sums


def header_checksums(headers: Mapping[str, str], whole_body: bool) -> Expected:
    """Checksums of the whole object declared in response headers.

    `Content-MD5` and `Content-Digest` describe the message body, so they count only when the
    body is the whole object (a 200 with identity encoding); representation digests
    (`Repr-Digest`, `Digest`) and object checksums hold for any range of the object.
    """
    found = Expected()
    for name, algo_names in (("Repr-Digest", {"sha-256": "sha256"}), ("Digest", {"sha-256": "sha256", "md5": "md5"})):
        value = headers.get(name)
        if value:
            for algo, encoded in _pairs(value):
                if algo in algo_names:
                    found.add(algo_names[algo], _b64_hex(encoded), f"header:{name}")
    goog = headers.get("x-goog-hash")
    if goog:
        for algo, encoded in _pairs(goog):
            if algo == "md5":
                found.add("md5", _b64_hex(encoded), "header:x-goog-hash")
    amz = headers.get("x-amz-checksum-sha256")
    if amz and "-" not in amz:
        found.add("sha256", _b64_hex(amz), "header:x-amz-checksum-sha256")
    if whole_body:
        if headers.get("Content-MD5"):
            found.add("md5", _b64_hex(headers["Content-MD5"]), "header:Content-MD5")
        content_digest = headers.get("Content-Digest")
        if content_digest:
            for algo, encoded in _pairs(content_digest):
                if algo == "sha-256":
                    found.add("sha256", _b64_hex(encoded), "header:Content-Digest")
    return found


def s3_etag_md5(headers: Mapping[str, str]) -> str:
    """The MD5 an S3 ETag stands for, or "" when the ETag is no MD5 (multipart, SSE-KMS, SSE-C)."""
    etag = headers.get("ETag", "").strip().strip('"').lower()
    if not _HEX32.match(etag):
        return ""
    if headers.get("x-amz-server-side-encryption", "").startswith("aws:kms"):
        return ""
    if headers.get("x-amz-server-side-encryption-customer-algorithm"):
        return ""
    return etag


def declared_checksums(item: Item) -> Expected:
    """Checksums written in the configuration (catalog `checksums`, URL list entries)."""
    found = Expected()
    origin = str(item.meta.get("checksum_origin", "config"))
    if item.meta.get("sha256"):
        found.add("sha256", str(item.meta["sha256"]), origin)
    if item.meta.get("md5"):
        found.add("md5", str(item.meta["md5"]), origin)
    return found


def gunzips(item_key: str, gunzip: bool) -> bool:
    """Whether the item is stored decompressed: a ``.gz`` name, unless stripping it leaves
    no name (``.gz``, ``..gz``, ``...gz``: empty, ``.`` or ``..``)."""
    return gunzip and item_key.endswith(".gz") and item_key[:-3].rsplit("/", 1)[-1] not in ("", ".", "..")


def item_fingerprint(item: Item, gunzip: bool) -> str:
    """Identity of a plan entry: a record made for one fingerprint satisfies exactly the
    plan entries with that fingerprint, whatever shard count planned them."""
    meta = item.meta
    doc = {
        "key": item.key,
        "source": item.source,
        "size": item.size if meta.get("size_known", True) else None,
        "etag": meta.get("etag", ""),
        "last_modified": meta.get("last_modified", ""),
        "sha256": meta.get("sha256", ""),
        "md5": meta.get("md5", ""),
        "gunzip": gunzips(item.key, gunzip),
    }
    if "mtime_ns" in meta:
        # a local file rewritten in place keeps its size: its mtime tells the versions apart
        doc["mtime_ns"] = meta["mtime_ns"]
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Record:
    item: str  # plan item key, "<source>/<path>"
    fingerprint: str
    location: str  # storage key of the verified copy, relative to the run root
    size: int  # bytes at location
    sha256: str  # of the bytes at location
    source_size: int  # bytes fetched (differs from size when gunzipped)
    source_sha256: str
    source_md5: str = ""
    checks: list[str] = field(default_factory=list)
    verified_at: str = ""
    modified_ns: int = 0  # of the file at location when the record was written (filesystem); 0: unknown

    def to_json(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, **asdict(self)}

    @staticmethod
    def from_json(doc: dict[str, Any]) -> "Record":
        if doc.get("version") != RECORD_VERSION:
            raise ValueError(f"unsupported record version {doc.get('version')!r}")
        return Record(
            item=str(doc["item"]), fingerprint=str(doc["fingerprint"]), location=str(doc["location"]),
            size=int(doc["size"]), sha256=str(doc["sha256"]), source_size=int(doc["source_size"]),
            source_sha256=str(doc["source_sha256"]), source_md5=str(doc.get("source_md5", "")),
            checks=list(doc.get("checks") or []), verified_at=str(doc.get("verified_at", "")),
            modified_ns=int(doc.get("modified_ns", 0)),
        )


def record_key(item_key: str) -> str:
    return f"{RECORD_PREFIX}{item_key}{RECORD_SUFFIX}"


def rehash(storage: Storage, key: str, md5: bool = False) -> Digests:
    """The digests of the object at `key`, read whole."""
    digests = Digests(md5=md5)
    with storage.open_read(key) as fh:
        while block := fh.read(8 << 20):
            digests.update(block)
    return digests


def modified_since(record: Record, info: ObjectInfo) -> bool:
    """Whether the file `info` describes was modified after `record` was written (known only
    on a filesystem, and for records that noted the time)."""
    return bool(record.modified_ns and info.modified_ns and info.modified_ns != record.modified_ns)


def read_record(storage: Storage, item_key: str) -> Record | None:
    """The item's record, or None when absent or unreadable (then the item is checked anew)."""
    key = record_key(item_key)
    try:
        raw = storage.read_bytes(key)
    except FileNotFoundError:
        return None
    try:
        return Record.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable verification record %s: %s", key, exc)
        return None


def write_record(storage: Storage, record: Record) -> None:
    """Write atomically. On a filesystem without fsync: a record lost (or emptied) by a
    crash only costs one re-hash of the item (it is then adopted or fetched again), while
    an fsync per item costs milliseconds on every item of every run."""
    if not record.verified_at:
        record.verified_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    stored = storage.stat(record.location) if isinstance(storage, LocalStorage) else None
    record.modified_ns = stored.modified_ns if stored is not None else 0
    data = json.dumps(record.to_json(), sort_keys=True).encode()
    key = record_key(record.item)
    if isinstance(storage, LocalStorage):
        final = storage.local_path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(temp_name(uuid.uuid4().hex[:16], final.name))
        try:
            tmp.write_bytes(data)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return
    storage.write_bytes(key, data)
