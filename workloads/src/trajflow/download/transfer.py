"""Moving one item's bytes from a source to the run root, verified, resumable, atomic.

An item is fetched as one stream, or — when it is larger than `multipartThresholdMib` and
the source serves ranges — as parallel ranged parts, all pinned to one version of the
object with `If-Match` (or `If-Unmodified-Since`; a source with neither validator is fetched
as one stream unless a declared checksum covers the file). A broken stream continues from
its last byte only when it is pinned that way and the source serves ranges; otherwise it
starts over from byte 0. The digests are computed in byte order while the bytes arrive:
the worker whose bytes sit at the hashing frontier hashes them as they come; bytes that
arrive ahead of the frontier are hashed when it reaches them (read back from the temporary
file, or from memory for object-store roots). The first request pins the version planning
saw; where a source refuses that pin although its metadata shows the object unchanged (a
store whose listing and GET disagree on the ETag), the item is pinned once by another
validator instead (`SourceRuntime.confirm_planned`).

Where the bytes go (the sink):
- filesystem root: a hidden temporary next to the final path, `.trajflow-tmp-dl-<name>`
  (the storage's temporary prefix, which listings skip; a digest of the name in place of a
  name too long to take the prefix), with a journal
  `.trajflow-tmp-dlj-<name>`: the object's size and version, then the byte extents
  written (a line per MiB or so), with a `sync` line after each fdatasync (every 64 MiB or
  10 s) and a `boot <id>` line from each process that appends. A rerun resumes every part
  from the journaled extents, after checking with `If-Match` that the object is the same
  version (a journal naming no validator is trusted only when a declared checksum will
  verify the file). Extents after the last `sync` are trusted only on the machine that wrote them
  since its last boot: a killed process leaves its writes in the page cache, a crashed
  node may not. The journal is flock()ed, so two processes never write one temporary.
  Items under 16 MiB (or the multipart threshold) use a throw-away temporary instead.
  Before the final rename the temporary is fsynced, so a name never points at bytes a
  crash could lose; with gunzip it is decompressed into the storage's atomic writer.
- object-store root: the storage's atomic writer (multipart upload completed only at the
  end), fed in byte order; parts that arrive early wait in memory, at most `concurrency`
  parts ahead of an item's frontier, and no part ahead of a frontier starts while the
  shard's items hold `concurrency` parts' worth of early bytes together (where the store
  takes bytes slower than the source serves them, memory would otherwise grow with every
  item in flight). A failed verification aborts the upload: nothing appears.
  There is no byte-level resume across pod restarts on this path.

Nothing unverified ever has the final name, so any file there was verified when it got it.
"""
from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from trajflow import log as trajflow_log
from trajflow.storage.local import fsync_dir
from trajflow.download.failures import Backoff, FetchError, Kind, StorageFailure, counts_as_failure
from trajflow.download.http import LOW_SPEED_BYTES, Body, Validator, redact
from trajflow.download.verify import (
    Digests,
    Expected,
    Record,
    declared_checksums,
    gunzips,
    item_fingerprint,
    recorded_checks,
    write_record,
)
from trajflow.plan import Item
from trajflow.storage import Storage
from trajflow.storage.local import TMP_PREFIX, LocalStorage, temp_name

if TYPE_CHECKING:
    from trajflow.download.sources import SourceRuntime

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
# Journal lines (no fsync) at least this often per stream: what a killed process can lose.
NOTE_BYTES = 1 << 20
NOTE_SECONDS = 0.5
# fdatasync + `sync` line this often per file: what a crashed node can lose.
SYNC_BYTES = 64 << 20
SYNC_SECONDS = 10.0


def _writeback_starter() -> Callable[[int, int, int], None]:
    """Linux sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range to disk without
    waiting, so the fdatasync before the final rename finds little left to do. A no-op
    elsewhere."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        call = libc.sync_file_range
        call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    except (OSError, AttributeError):
        return lambda fd, offset, length: None

    def start(fd: int, offset: int, length: int) -> None:
        call(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE; a failure only means a longer fdatasync

    return start


start_writeback = _writeback_starter()


def boot_id() -> str:
    """This kernel's boot: page-cache contents survive a process, not a reboot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return f"unknown-{uuid.uuid4().hex}"  # never matches: only synced extents are trusted
RESUMABLE_MIN_BYTES = 16 << 20
SINK_TAG = "dl"  # download temporaries: `.trajflow-tmp-dl-<name>` (resumable), `.trajflow-tmp-dl<hex>-<name>`
# Their journals, `.trajflow-tmp-dlj-<name>`: a tag, not a suffix, so that no item's
# temporary is another's journal (`x.journal` next to `x`); 'j' is no hex digit.
JOURNAL_TAG = f"{SINK_TAG}j"
DOWNLOAD_TMP_PREFIX = f"{TMP_PREFIX}{SINK_TAG}"
GUNZIP_OUT_CHUNK = 8 << 20
# A name this root cannot hold (too long; a file where a directory is needed, or the
# reverse): fetching again cannot help, and the run root itself is fine.
NAME_ERRNOS = (errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EEXIST)


@dataclass(frozen=True)
class TransferSettings:
    concurrency: int = 8
    part_size: int = 16 << 20
    threshold: int = 64 << 20
    attempts: int = 6
    backoff: Backoff = field(default_factory=lambda: Backoff(1.0, 60.0))
    gunzip: bool = False


class Stats:
    """Counters shared by every transfer of a shard; mirrored into Prometheus metrics."""

    def __init__(self, metrics: Any = None):
        self.metrics = metrics
        self._lock = threading.Lock()
        self.bytes_received = 0
        self.inflight = 0
        self.retries = 0
        self.failures: dict[str, int] = {}
        self.retry_log = trajflow_log.Capped(log)

    def received(self, n: int) -> None:
        with self._lock:
            self.bytes_received += n
        if self.metrics is not None:
            self.metrics.bytes.inc(n)

    def request(self, delta: int) -> None:
        with self._lock:
            self.inflight += delta
        if self.metrics is not None:
            self.metrics.inflight.inc(delta)

    def failure(self, reason: str) -> None:
        with self._lock:
            self.failures[reason] = self.failures.get(reason, 0) + 1
        if self.metrics is not None:
            self.metrics.failures.labels(reason=reason).inc()

    def retry(self, level: int, kind: str, msg: str, *args: Any) -> None:
        """Count a retry and log why (the first few of each kind in a shard in full: `trajflow_log.Capped`)."""
        self.retry_log.log(level, kind, msg, *args)
        with self._lock:
            self.retries += 1
        if self.metrics is not None:
            self.metrics.retries.inc()


# ---- gunzip ---------------------------------------------------------------------------


class Gunzip:
    """Streaming gzip decompression, multi-member aware, with bounded output per call."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=31)
        self._mid_member = False
        self._members = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            if self._members and not self._mid_member:
                # NUL padding after a member (block-aligned exports): gzip(1) and CPython skip it
                data = data.lstrip(b"\0")
                if not data:
                    break
            try:
                out = self._d.decompress(data, GUNZIP_OUT_CHUNK)
            except zlib.error as exc:
                raise ValueError(f"not valid gzip data: {exc}") from None
            self._mid_member = True
            if out:
                yield out
            if self._d.eof:
                data = self._d.unused_data
                self._d = zlib.decompressobj(wbits=31)
                self._mid_member = False
                self._members += 1
            else:
                data = self._d.unconsumed_tail

    def finish(self) -> None:
        if self._mid_member:
            raise ValueError("gzip data ends in the middle of a member (truncated)")


# ---- sinks ----------------------------------------------------------------------------


class FileSink:
    """A hidden temporary next to the final path on a filesystem root."""

    buffered = False

    def __init__(self, root: LocalStorage, dest_key: str, resumable: bool, gunzip: bool):
        self.root, self.dest_key, self.resumable, self.gunzip = root, dest_key, resumable, gunzip
        self.final = root.local_path(dest_key)
        # a resumable temporary has a fixed name so the next run finds it
        tag = SINK_TAG if resumable else f"{SINK_TAG}{uuid.uuid4().hex[:12]}"
        # reserve: the journal's name is a byte longer, and both take a digest or neither
        self.tmp = self.final.with_name(temp_name(tag, self.final.name, reserve=len(JOURNAL_TAG) - len(SINK_TAG)))
        self.journal = self.final.with_name(temp_name(JOURNAL_TAG, self.final.name))
        self._fd: int | None = None
        self._jfd: int | None = None
        self._header_written = False
        self._jlock = threading.Lock()
        self._unsynced = 0
        self._synced_at = time.monotonic()

    def open(self) -> tuple[dict[str, Any] | None, list[tuple[int, int]]]:
        """Open (and lock) the temporary; returns the journal header and the extents it can trust."""
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            header, extents = None, []
            if self.resumable:
                self._retire_legacy_journal()
                try:
                    self._jfd = _open_locked(self.journal, os.O_RDWR | os.O_APPEND)
                except BlockingIOError:
                    raise FetchError(f"{self.tmp}: another process is downloading this item", Kind.TRANSIENT, "busy") from None
                header, extents = self._read_journal()
                self._header_written = header is not None
                if self._header_written:
                    self._append(f"{self._line_break()}boot {boot_id()}\n")
                self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT, 0o644)  # under the journal's lock
            else:
                self._fd = _open_locked(self.tmp, os.O_RDWR)  # the lock tells sweepers it is alive
            if extents and os.fstat(self._fd).st_size < max(end for _, end in extents):
                # the journal vouches for bytes the temporary does not hold (removed, cut short): start over
                os.ftruncate(self._jfd, 0)
                header, extents, self._header_written = None, [], False
            if header is None:
                # bytes no journal ties to a version (a kill before the header, an older
                # version's journal): a shorter object written over them would keep their tail
                os.ftruncate(self._fd, 0)
            return header, extents
        except OSError as exc:
            raise self._failure(self.tmp, exc) from None

    def _retire_legacy_journal(self) -> None:
        """Versions before the `dlj` tag kept the journal at `<temporary>.journal`. One that a
        live process of such a version holds (a Job not yet replaced) makes this item busy;
        an abandoned one is removed (its bytes are then fetched again, not resumed)."""
        legacy = self.tmp.with_name(self.tmp.name + ".journal")
        other_journal = self.final.with_name(temp_name(JOURNAL_TAG, f"{self.final.name}.journal"))
        if other_journal.exists():
            return  # that name is the temporary of an item `<name>.journal`, whose journal is there
        try:
            fd = os.open(legacy, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            # again: an item `<name>.journal` starting meanwhile made its journal before its
            # temporary (and removes it only after), so a temporary of its never goes unseen
            if other_journal.exists():
                return
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            legacy.unlink(missing_ok=True)
        except BlockingIOError:
            raise FetchError(f"{self.tmp}: another process (an older trajflow) is downloading this item", Kind.TRANSIENT,
                             "busy") from None
        finally:
            os.close(fd)

    def _failure(self, path: Path, exc: OSError) -> FetchError | StorageFailure:
        if exc.errno in NAME_ERRNOS:
            return FetchError(
                f"{self.final}: cannot be stored under this name ({exc.strerror}): it is too long, or another item "
                f"needs a path component as a file and a directory at once; exclude one of them", Kind.PERMANENT, "storage",
            )
        return StorageFailure(f"{path}: {exc.strerror or exc}")

    def _read_journal(self) -> tuple[dict[str, Any] | None, list[tuple[int, int]]]:
        assert self._jfd is not None
        with open(self.journal, "rb") as fh:
            lines = fh.read().split(b"\n")
        lines.pop()  # after the last newline: empty, or a line cut short by a kill
        if not lines or not lines[0].strip():
            return None, []
        try:
            header = json.loads(lines[0])
        except ValueError:
            return None, []
        me = boot_id()
        trusted: list[tuple[int, int]] = []
        pending: list[tuple[int, int]] = []
        writer = ""
        for line in lines[1:]:
            parts = line.split()
            if len(parts) == 2 and parts[0] == b"boot":
                if writer == me:
                    trusted += pending
                pending, writer = [], parts[1].decode()
            elif parts == [b"sync"]:
                trusted += pending
                pending = []
            elif len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit() and int(parts[0]) < int(parts[1]):
                pending.append((int(parts[0]), int(parts[1])))
        if writer == me:
            trusted += pending
        return header, trusted

    def _line_break(self) -> str:
        """A newline when the journal ends in a line a kill cut short, so ours starts clean."""
        size = os.fstat(self._jfd).st_size  # type: ignore[arg-type]
        return "\n" if size and os.pread(self._jfd, 1, size - 1) != b"\n" else ""  # type: ignore[arg-type]

    def _append(self, line: str) -> None:
        assert self._jfd is not None
        try:
            os.write(self._jfd, line.encode())
        except OSError as exc:
            raise StorageFailure(f"{self.journal}: {exc.strerror or exc}") from None

    def reset(self) -> None:
        """Forget any earlier bytes: the temporary starts empty."""
        try:
            if self._fd is not None:
                os.ftruncate(self._fd, 0)
            if self._jfd is not None:
                os.ftruncate(self._jfd, 0)
            self._header_written = False
            self._unsynced = 0
        except OSError as exc:
            raise StorageFailure(f"{self.tmp}: {exc.strerror or exc}") from None

    def start(self, total: int | None, validator: Validator, source: str) -> None:
        """Record which object version the bytes belong to (once per attempt)."""
        if self._jfd is None or self._header_written:
            return
        header = {"v": 1, "size": total, "etag": validator.etag, "last_modified": validator.last_modified, "source": source}
        with self._jlock:
            self._append(json.dumps(header) + "\n")
            self._append(f"boot {boot_id()}\n")
        self._header_written = True

    def write(self, offset: int, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self._fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            raise StorageFailure(f"{self.tmp}: {exc.strerror or exc}") from None

    def note(self, start: int, end: int) -> None:
        """Journal that [start, end) is written (in the page cache); sync now and then."""
        if self._jfd is None or end <= start:
            return
        start_writeback(self._fd, start, end - start)  # type: ignore[arg-type]
        with self._jlock:
            self._append(f"{start} {end}\n")
            self._unsynced += end - start
            if self._unsynced >= SYNC_BYTES or time.monotonic() - self._synced_at >= SYNC_SECONDS:
                self._sync_locked()

    def _sync_locked(self) -> None:
        """fdatasync, then a `sync` line vouching for every extent journaled before it.
        Called with the journal lock held, so no extent is journaled in between."""
        try:
            os.fdatasync(self._fd)  # type: ignore[arg-type]
        except OSError as exc:
            raise StorageFailure(f"{self.tmp}: {exc.strerror or exc}") from None
        self._append("sync\n")
        self._unsynced = 0
        self._synced_at = time.monotonic()

    def read(self, start: int, end: int) -> Iterator[bytes]:
        assert self._fd is not None
        pos = start
        while pos < end:
            try:
                block = os.pread(self._fd, min(READ_CHUNK, end - pos), pos)
            except OSError as exc:
                raise StorageFailure(f"{self.tmp}: {exc.strerror or exc}") from None
            if not block:
                raise StorageFailure(f"{self.tmp}: shorter than the bytes written to it (at {pos})")
            yield block
            pos += len(block)

    def consume(self, data: bytes) -> None:
        """Bytes in order: a file sink has them on disk already."""

    def commit(self, digests: Digests) -> tuple[int, str]:
        """Give the verified bytes their final name; returns the stored size and sha256."""
        assert self._fd is not None
        try:
            os.fdatasync(self._fd)  # the final name must never point at bytes a crash could lose
            if self.gunzip:
                size, sha = self._gunzip_into_place()
            else:
                # no directory fsync: a rename a crash forgets only means fetching the item again
                os.replace(self.tmp, self.final)
                size, sha = digests.size, digests.sha256
        except OSError as exc:
            raise self._failure(self.final, exc) from None
        self._cleanup()
        return size, sha

    def _gunzip_into_place(self) -> tuple[int, str]:
        out = Digests()
        decompressor = Gunzip()
        assert self._fd is not None
        total = os.fstat(self._fd).st_size
        try:
            with self.root.writer(self.dest_key) as fh:
                for block in self.read(0, total):
                    for piece in decompressor.feed(block):
                        out.update(piece)
                        fh.write(piece)
                decompressor.finish()
        except ValueError as exc:
            raise FetchError(f"{self.dest_key}: {exc}", Kind.RESTART, "gzip") from None
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()
        return out.size, out.sha256

    def _close(self) -> None:
        for attr in ("_fd", "_jfd"):
            fd = getattr(self, attr)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, None)

    def _cleanup(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.journal.unlink()
        self._close()

    def discard(self) -> None:
        """Remove the temporary and its journal."""
        for path in (self.tmp, self.journal):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._close()

    def close(self) -> None:
        """Stop, keeping a resumable temporary for the next run."""
        if not self.resumable:
            self.discard()
        else:
            self._close()


def _still_named(path: Path, fd: int) -> bool:
    """Whether `path` names the file open at `fd` (not unlinked, or replaced, since)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev)


def _open_locked(path: Path, flags: int) -> int:
    """Open (creating) and lock the file `path` names once locked: a sweeper may unlink the
    name between the open and the lock, and a lock on a file no name leads to tells no one.
    BlockingIOError when another process holds it."""
    while True:
        fd = os.open(path, flags | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _still_named(path, fd):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def sweep_abandoned_temporaries(directory: Path) -> int:
    """Remove download temporaries under `directory` that no live process holds (their
    writers lock them: the journal for resumable ones, the file itself otherwise). Only a
    lock holder unlinks, and only a name that still leads to the file it locked: a writer
    that started again meanwhile has made new files under the same names."""
    removed = 0
    if not directory.is_dir():
        return 0
    for path in sorted(directory.rglob(f"{DOWNLOAD_TMP_PREFIX}*")):
        if not path.is_file():
            continue
        resumable = path.name.startswith(f"{DOWNLOAD_TMP_PREFIX}-")
        # a throw-away temporary and a journal are locked themselves, a resumable temporary by its journal
        lock_path = path.with_name(f"{TMP_PREFIX}{JOURNAL_TAG}-" + path.name[len(DOWNLOAD_TMP_PREFIX) + 1:]) if resumable else path
        try:
            # a resumable temporary whose journal is gone gets one, locked here, so that a
            # writer starting now is told the item is busy instead of losing its new temporary
            fd = os.open(lock_path, os.O_RDONLY | (os.O_CREAT if resumable else 0), 0o644)
        except OSError:
            continue  # gone meanwhile (committed, discarded, swept)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use
            if not _still_named(lock_path, fd):
                continue  # unlinked since it was opened: the name may be a live writer's by now
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
            if resumable:
                with contextlib.suppress(FileNotFoundError):
                    lock_path.unlink()  # held here and still named: no use without its temporary
        finally:
            os.close(fd)
    return removed


class StreamSink:
    """The storage's atomic writer (object-store roots), fed in byte order."""

    buffered = True
    resumable = False

    def __init__(self, root: Storage, dest_key: str, gunzip: bool):
        self.root, self.dest_key, self.gunzip = root, dest_key, gunzip
        self._cm: Any = None
        self._fh: Any = None
        self._gz: Gunzip | None = None
        self._out = Digests()

    def open(self) -> tuple[dict[str, Any] | None, list[tuple[int, int]]]:
        return None, []

    def reset(self) -> None:
        self.discard()

    def start(self, total: int | None, validator: Validator, source: str) -> None:
        pass

    def write(self, offset: int, data: bytes) -> None:
        pass

    def note(self, start: int, end: int) -> None:
        pass

    def read(self, start: int, end: int) -> Iterator[bytes]:  # pragma: no cover - buffered sinks never read back
        raise AssertionError("a stream sink keeps early bytes in memory")

    def _ensure_open(self) -> None:
        if self._cm is None:
            self._cm = self.root.writer(self.dest_key)
            try:
                self._fh = self._cm.__enter__()
            except Exception as exc:
                self._cm = None
                raise StorageFailure(f"{self.root.uri}/{self.dest_key}: {exc}") from None
            self._gz = Gunzip() if self.gunzip else None
            self._out = Digests()

    def _emit(self, data: bytes) -> None:
        self._out.update(data)
        try:
            self._fh.write(data)
        except Exception as exc:
            raise StorageFailure(f"{self.root.uri}/{self.dest_key}: {exc}") from None

    def consume(self, data: bytes) -> None:
        self._ensure_open()
        if self._gz is None:
            self._emit(data)
            return
        try:
            for piece in self._gz.feed(data):
                self._emit(piece)
        except ValueError as exc:
            raise FetchError(f"{self.dest_key}: {exc}", Kind.RESTART, "gzip") from None

    def commit(self, digests: Digests) -> tuple[int, str]:
        self._ensure_open()  # an empty object is still written
        if self._gz is not None:
            try:
                self._gz.finish()
            except ValueError as exc:
                raise FetchError(f"{self.dest_key}: {exc}", Kind.RESTART, "gzip") from None
        cm, self._cm = self._cm, None
        try:
            cm.__exit__(None, None, None)
        except Exception as exc:
            raise StorageFailure(f"{self.root.uri}/{self.dest_key}: {exc}") from None
        return self._out.size, self._out.sha256

    def discard(self) -> None:
        cm, self._cm = self._cm, None
        if cm is not None:
            abort = RuntimeError("download abandoned")
            with contextlib.suppress(Exception):
                cm.__exit__(RuntimeError, abort, None)  # the writer aborts the upload

    def close(self) -> None:
        self.discard()


def make_sink(root: Storage, dest_key: str, size_hint: int | None, gunzip: bool,
              multipart_threshold: int = RESUMABLE_MIN_BYTES) -> FileSink | StreamSink:
    if isinstance(root, LocalStorage):
        # items fetched in parts always resume; smaller ones only when large enough to matter
        resumable = size_hint is None or size_hint >= min(RESUMABLE_MIN_BYTES, multipart_threshold)
        return FileSink(root, dest_key, resumable, gunzip)
    return StreamSink(root, dest_key, gunzip)


# ---- one item -------------------------------------------------------------------------


@dataclass
class Part:
    index: int
    start: int
    end: int | None  # None: to the end of an object of unknown size
    received: int  # next byte to fetch; [start, received) is present
    noted: int  # [start, noted) is in the journal
    state: str = "todo"  # todo | running | done
    noted_at: float = 0.0  # monotonic time of the last journal line
    buffer: deque = field(default_factory=deque)  # type: ignore[type-arg]

    def complete(self) -> bool:
        return self.end is not None and self.received >= self.end


class _Cancelled(Exception):
    pass


@dataclass
class ItemResult:
    item: Item
    dest_key: str
    outcome: str  # fetched | skipped | reused | adopted | missing | failed
    record: Record | None = None
    error: str = ""
    kind: str = ""  # transient | permanent (failures)
    reason: str = ""
    bytes_received: int = 0

    @property
    def verified(self) -> bool:
        return self.record is not None


def _checks_whole_file(expected: Expected) -> bool:
    return bool(expected.sha256 or expected.md5)


def _contiguous(extents: list[tuple[int, int]], start: int, end: int | None) -> int:
    """How far from `start` the journaled extents cover without a gap (capped at `end`)."""
    pos = start
    for a, b in sorted(extents):
        if a <= pos < b:
            pos = b
    return pos if end is None else min(pos, end)


class ItemTransfer:
    """Fetch one item (as one stream or as parts), verify it and put it in place."""

    def __init__(self, item: Item, source: "SourceRuntime", root: Storage, dest_key: str,
                 settings: TransferSettings, stats: Stats, on_done: Callable[[ItemResult], None],
                 requeue: Callable[["ItemTransfer"], None], wake: Callable[[], None]):
        self.item, self.source, self.root, self.dest_key = item, source, root, dest_key
        self.settings, self.stats = settings, stats
        self._on_done, self._requeue, self._wake = on_done, requeue, wake
        self.gunzip = gunzips(item.key, settings.gunzip)
        self.lock = threading.Lock()
        self.attempt = 1
        self.single_stream = False  # no parts: the server ignores ranges, or versions keep changing
        self.ranges_ignored = False  # a 200 answered a range request: a broken stream starts over
        self.last_error: FetchError | None = None  # the last network failure, for the final message
        self.changes = 0
        self.fallbacks: set[str] = set()  # reasons this item already fell back to one stream for
        self.planned_refused = False  # the source refused (or contradicted) the planned validator
        self.repinned: Validator | None = None  # the planned version under another validator
        self.received_total = 0
        self.buffered = 0  # bytes waiting in memory ahead of the frontier (buffered sinks)
        self.sink: FileSink | StreamSink | None = None
        self.parts: list[Part] = []
        self._starts: list[int] = []

    # -- setup --------------------------------------------------------------------------

    @property
    def planned_size(self) -> int | None:
        return self.item.size if self.item.meta.get("size_known", True) else None

    def begin(self) -> None:
        """Set up an attempt: open the sink, resume what the journal vouches for, cut parts."""
        total = self.planned_size
        self.sink = make_sink(self.root, self.dest_key, total, self.gunzip, self.settings.threshold)
        header, extents = self.sink.open()
        # the version planning saw: sent with the first request, and checked in its response
        self.planned = self.repinned or self.source.planned_validator(self.item)
        self.validator: Validator | None = None
        resumable = header is not None and header.get("size") == total and header.get("source") == self.item.source
        if resumable:
            assert header is not None
            tag = Validator(str(header.get("etag") or ""), str(header.get("last_modified") or ""))
            if self.planned is not None and not self.planned.same_version(tag):
                resumable = False  # bytes of a version other than the planned one
            elif not tag.headers() and not _checks_whole_file(declared_checksums(self.item)):
                resumable = False  # nothing proves the bytes on disk are of the version served now
            else:
                self.validator = tag if tag.tag else None
        if not resumable and (header is not None or extents):
            self.sink.reset()
            extents = []
        if header is None:
            extents = []  # bytes without a header cannot be tied to a version
        self.total = total
        self.sized = total is not None  # a size was declared (plan or response): the record's "size" check
        self.expected: Expected | None = None
        self.digests: Digests | None = None
        self.hashed = 0
        self.hashing = False
        self.cancelled = False
        self.error: FetchError | StorageFailure | None = None
        self.running = 0
        parallel = (
            total is not None and total > self.settings.threshold and not self.single_stream
            and not self.ranges_ignored and self.source.supports_ranges(self.item) is not False
        )
        if parallel:
            assert total is not None
            size = self.settings.part_size
            bounds = [(s, min(s + size, total)) for s in range(0, total, size)]
        else:
            bounds = [(0, total)]
        self.parts = []
        self.buffered = 0
        for i, (start, end) in enumerate(bounds):
            present = _contiguous(extents, start, end)
            self.parts.append(Part(i, start, end, present, present, "done" if end is not None and present >= end else "todo"))
        self._starts = [p.start for p in self.parts]

    def launch(self) -> None:
        """Hand the parts to the scheduler, or conclude at once when nothing is left to fetch."""
        if self.has_todo():
            self._requeue(self)
        else:
            self._conclude()

    @property
    def multipart(self) -> bool:
        return len(self.parts) > 1

    def present_bytes(self) -> int:
        return sum(p.received - p.start for p in self.parts)

    def take_part(self, memory_left: bool = True) -> Part | None:
        """The next part to fetch, or None (none left, or the memory window is full).
        `memory_left`: whether the shard's early bytes leave room for another part ahead
        of a frontier; the frontier's own part is always taken, so every item progresses."""
        with self.lock:
            if self.cancelled:
                return None
            frontier = self._part_index(self.hashed)
            for part in self.parts:
                if part.state != "todo":
                    continue
                if self.sink is not None and self.sink.buffered and part.index > frontier and (
                        not memory_left or part.index > frontier + self.settings.concurrency):
                    return None
                part.state = "running"
                self.running += 1
                return part
        return None

    def has_todo(self) -> bool:
        with self.lock:
            return not self.cancelled and any(p.state == "todo" for p in self.parts)

    def _part_index(self, offset: int) -> int:
        return max(0, bisect.bisect_right(self._starts, offset) - 1)

    # -- fetching -----------------------------------------------------------------------

    def run_part(self, part: Part) -> None:
        try:
            self._fetch(part)
        except _Cancelled:
            pass
        except (FetchError, StorageFailure) as exc:
            self._fail(exc)
        except Exception as exc:  # a bug must fail the item loudly, not hang the shard
            log.exception("unexpected error fetching %s", self.item.key)
            self._fail(StorageFailure(f"{self.item.key}: unexpected {type(exc).__name__}: {exc}"))
        with self.lock:
            self.running -= 1
            if part.complete() and self.error is None:
                part.state = "done"
            elif part.state == "running":
                part.state = "todo"
            last = self.running == 0 and (self.cancelled or all(p.state == "done" for p in self.parts))
        self._wake()
        if last:
            try:
                self._conclude()
            except Exception as exc:  # as in _fetch: a bug fails the item, it must not vanish from the shard
                log.exception("unexpected error finishing %s", self.item.key)
                self._on_done(self._failed(StorageFailure(f"{self.item.key}: unexpected {type(exc).__name__}: {exc}"),
                                           "storage", "error"))

    def _fail(self, exc: FetchError | StorageFailure) -> None:
        with self.lock:
            if self.error is None or isinstance(exc, StorageFailure):
                self.error = exc
            self.cancelled = True

    def _fetch(self, part: Part) -> None:
        try:
            self._fetch_part(part)
        finally:
            # whatever happened, the bytes on disk count for the next attempt or run
            with contextlib.suppress(StorageFailure):
                self._note(part)

    def _fetch_part(self, part: Part) -> None:
        attempts, backoff = self.settings.attempts, self.settings.backoff
        part.noted_at = time.monotonic()
        failures = 0
        furthest = part.received  # a retry counts as progress only past this
        while not part.complete():
            if self.cancelled:
                raise _Cancelled
            if part.received > part.start and len(self.parts) == 1 and not self._can_resume():
                self._start_over(part)
            progressed = False
            body: Body | None = None
            asked_from = part.received
            self.stats.request(+1)
            try:
                # a single stream asks for "the rest" (no end): from byte 0 that is a plain GET,
                # whose whole-body checksum headers (Content-MD5) then apply
                end = None if len(self.parts) == 1 else part.end
                body = self.source.open(self.item, part.received, end, self.validator or self.planned)
                self._accept(part, body)
                expected_end = None if body.length is None else part.received + body.length
                # a body of unknown length (chunked) is read one byte past the part at most:
                # more than planned is an error then, not a disk filled by an endless body
                limit = expected_end if expected_end is not None else None if part.end is None else part.end + 1
                while True:
                    if self.cancelled:
                        raise _Cancelled
                    want = READ_CHUNK if limit is None else min(READ_CHUNK, limit - part.received)
                    if want <= 0:
                        break
                    data = body.read(want)
                    if not data:
                        break
                    if part.end is not None and part.received + len(data) > part.end:
                        overrun = self._overrun(part)
                        if overrun.transient:  # the only stream: its bytes are not the planned item
                            self._start_over(part)
                            progressed = False
                        raise overrun
                    self._deliver(part, data)
                    # a try counts as progress with a low-speed window's worth of new bytes: a
                    # server trickling a few bytes a window would otherwise be retried for ever
                    progressed = part.received >= furthest + LOW_SPEED_BYTES
                if expected_end is not None and part.received < expected_end:
                    raise FetchError(
                        f"{redact(self.item.source)}: body ended at byte {part.received} of {expected_end}", Kind.TRANSIENT, "truncated"
                    )
                if part.end is None:  # an object of unknown size, read to its end
                    with self.lock:
                        part.end = self.total = part.received
                elif part.received < part.end:
                    raise FetchError(
                        f"{redact(self.item.source)}: body ended at byte {part.received} of {part.end}", Kind.TRANSIENT, "truncated"
                    )
                body.close(reusable=True)
                body = None
            except FetchError as exc:
                if counts_as_failure(exc, self.source.required):
                    self.stats.failure(exc.reason)
                if exc.reason == "changed" and self.validator is None and self.planned is not None:
                    self.planned_refused = True
                if exc.reason == "no_ranges":
                    self.ranges_ignored = self.single_stream = True
                    if len(self.parts) == 1 and asked_from > part.start:
                        continue  # the next request starts over from byte 0, without a Range: free, once
                    # else: asking from byte 0 again gets the same answer; an item attempt (bounded)
                if not exc.transient:
                    raise
                self.last_error = exc
                failures = 0 if progressed else failures
                furthest = max(furthest, part.received)
                failures += 1
                if failures >= attempts:
                    raise
                self._note(part)
                self.stats.retry(logging.INFO, "part retries", "retrying %s from byte %d after %s (%d/%d)", self.item.key,
                                 part.received, exc, failures, attempts)
                time.sleep(backoff.delay(failures, exc.retry_after))
            finally:
                self.stats.request(-1)
                if body is not None:
                    body.close()

    def _pinned(self, expected: Expected | None) -> bool:
        """Whether bytes from separate requests provably belong to one version: a validator
        for If-Match / If-Unmodified-Since, or a checksum of the whole file that would catch
        two versions spliced together."""
        validator = self.validator or self.planned
        if validator is not None and validator.headers():
            return True
        return _checks_whole_file(expected if expected is not None else declared_checksums(self.item))

    def _can_resume(self) -> bool:
        """Whether the only stream may continue from the bytes it has (else it starts over)."""
        if self.ranges_ignored or self.source.supports_ranges(self.item) is False:
            return False
        return self._pinned(self.expected)

    def _start_over(self, part: Part) -> None:
        """Drop the only stream's bytes and digests: the next request fetches from byte 0."""
        assert self.sink is not None
        self.sink.reset()
        with self.lock:
            part.received = part.noted = part.start
            self.buffered -= sum(map(len, part.buffer))
            part.buffer.clear()
            self.hashed = 0
            if self.planned_size is None:
                # no plan to hold it to: the size an earlier response gave goes with its bytes,
                # or a source that changed meanwhile would overrun it on every try
                part.end = self.total = None
                self.sized = False
            # a fresh start may take whichever version is served now (planning's still applies)
            self.validator = None
            self.digests = self.expected = None  # set again by the next response

    def _note(self, part: Part) -> None:
        if self.sink is not None and not self.sink.buffered and part.received > part.noted:
            self.sink.note(part.noted, part.received)
            part.noted = part.received
        part.noted_at = time.monotonic()

    def _accept(self, part: Part | None, body: Body) -> None:
        """Check a response against the version being fetched; the first one fixes it."""
        where = redact(self.item.source)
        with self.lock:
            if body.total is not None and self.total is not None and body.total != self.total:
                if self.planned_size is not None:
                    raise self._not_planned_size(body.total)
                # the size the first response fixed changed: another version
                raise FetchError(f"{where}: size is now {body.total}, expected {self.total}", Kind.RESTART, "changed")
            if not body.ranged and self.multipart:
                self.single_stream = self.ranges_ignored = True
                raise FetchError(f"{where}: the server ignores byte ranges", Kind.RESTART, "no_ranges")
            if self.validator is None:
                if self.planned is not None and not self.planned.same_version(body.validator):
                    raise FetchError(f"{where}: not the version planning saw", Kind.RESTART, "changed")
                if body.validator.tag:
                    self.validator = body.validator
            elif body.validator.tag and body.validator.tag != self.validator.tag:
                raise FetchError(f"{where}: changed while being fetched", Kind.RESTART, "changed")
            first = self.expected is None
            expected = self.source.expected(self.item, body) if first else self.expected
            if first and self.multipart and not self._pinned(expected):
                # parts fetched apart could come from two versions, and nothing would notice
                self.single_stream = True
                raise FetchError(f"{where}: sends neither ETag nor Last-Modified to tie its parts to one version",
                                 Kind.RESTART, "no_validator")
            if body.total is not None:
                self.sized = True
            if self.total is None and body.total is not None:
                self.total = body.total
                if part is not None and part.end is None:
                    part.end = body.total
            assert self.sink is not None
            # the journal names the planned size, which is what a rerun compares it with
            self.sink.start(self.planned_size, self.validator or body.validator, self.item.source)
            if first:
                self.expected = expected
                self.digests = Digests(md5=self.expected.needs_md5)
                kick = not self.hashing and self._available() is not None
                if kick:
                    self.hashing = True
        if first and kick:
            self._hash_loop(None)

    def _overrun(self, part: Part) -> FetchError:
        """A body (of no declared length) that runs past the end of its part."""
        if len(self.parts) == 1 and self.planned_size is not None:
            return self._not_planned_size(f"more than {self.planned_size}")
        where = redact(self.item.source)
        if len(self.parts) == 1:
            # the only stream, longer than an earlier response of this attempt said: another
            # version (an item attempt, bounded), not ranges ignored (free, so endless)
            return FetchError(f"{where}: the body runs past byte {part.end - 1}, the size an earlier response gave",
                              Kind.RESTART, "changed")
        return FetchError(f"{where}: the body for bytes {part.start}-{part.end - 1} runs past byte {part.end - 1}",
                          Kind.RESTART, "no_ranges")

    def _not_planned_size(self, got: int | str) -> FetchError:
        """The planned size is authoritative: bytes of another size are never stored under
        this plan entry (its record would make every rerun skip them). A size from the
        configuration cannot change by waiting; one that planning learnt may be a passing
        error page, or a source that changed since planning."""
        where = redact(self.item.source)
        if self.item.meta.get("size_origin") == "config":
            return FetchError(f"{where}: the source serves {got} bytes, but the configured size is {self.planned_size}; "
                              f"correct or remove `size`", Kind.PERMANENT, "size")
        return FetchError(f"{where}: the source serves {got} bytes, but planning found {self.planned_size}; if the "
                          f"source changed since planning, bump planGeneration to plan again", Kind.TRANSIENT, "size")

    def _deliver(self, part: Part, data: bytes) -> None:
        assert self.sink is not None
        offset = part.received
        if not self.sink.buffered:
            self.sink.write(offset, data)
        inline = kick = False
        with self.lock:
            part.received += len(data)
            self.received_total += len(data)
            if self.digests is not None and not self.hashing and self.hashed == offset:
                inline = self.hashing = True
            else:
                if self.sink.buffered:
                    part.buffer.append(data)
                    self.buffered += len(data)
                if self.digests is not None and not self.hashing and self._available() is not None:
                    kick = self.hashing = True
        self.stats.received(len(data))
        if inline:
            self._hash_loop(data)
        elif kick:
            self._hash_loop(None)
        if not self.sink.buffered and self.sink.resumable:
            pending = part.received - part.noted
            if pending >= NOTE_BYTES or (pending and time.monotonic() - part.noted_at >= NOTE_SECONDS):
                self._note(part)

    # -- hashing in byte order ----------------------------------------------------------

    def _available(self) -> tuple[Part, int, int] | None:
        """(part, start, end) of bytes present at the frontier and not yet hashed."""
        if not self.parts:
            return None
        part = self.parts[self._part_index(self.hashed)]
        if part.end is not None and self.hashed >= part.end:
            return None  # the frontier is at the very end
        if part.received > self.hashed:
            return part, self.hashed, part.received
        return None

    def _hash_loop(self, first: bytes | None) -> None:
        """Hash (and, for stream sinks, emit) bytes at the frontier while there are any.
        Only one thread runs this per item at a time (the `hashing` flag)."""
        assert self.digests is not None and self.sink is not None
        crossed = False
        try:
            if first is not None:
                self.digests.update(first)
                self.sink.consume(first)
                with self.lock:
                    self.hashed += len(first)
            while True:
                with self.lock:
                    seg = self._available()
                    if seg is None:
                        self.hashing = False
                        break
                part, start, end = seg
                for block in self._segment(part, start, end):
                    self.digests.update(block)
                    self.sink.consume(block)
                with self.lock:
                    self.hashed = end
                    crossed = crossed or (part.end is not None and end >= part.end)
        except BaseException as exc:
            with self.lock:
                self.hashing = False
            if isinstance(exc, (FetchError, StorageFailure)):
                self._fail(exc)
                raise _Cancelled from None
            raise
        if crossed:
            self._wake()  # a part boundary passed: the memory window moved

    def _segment(self, part: Part, start: int, end: int) -> Iterator[bytes]:
        assert self.sink is not None
        if not self.sink.buffered:
            yield from self.sink.read(start, end)
            return
        need = end - start
        while need > 0:
            block = part.buffer.popleft()
            with self.lock:
                self.buffered -= len(block)
            need -= len(block)
            yield block

    # -- the end of an attempt ----------------------------------------------------------

    def _conclude(self) -> None:
        error = self.error
        if error is None and self.cancelled:
            # stopped with the shard (another item failed it): nothing is wrong with this item,
            # and its bytes stay resumable for the next run
            if self.sink is not None:
                self.sink.close()
            stopped = Exception("stopped with the shard before it was complete; a rerun takes it up again")
            self._on_done(self._failed(stopped, "stopped", "transient"))  # no failure reason: nothing failed
            return
        result: ItemResult | None = None
        if error is None:
            try:
                result = self._finalize()
            except (FetchError, StorageFailure) as exc:
                if isinstance(exc, FetchError) and counts_as_failure(exc, self.source.required):
                    self.stats.failure(exc.reason)
                error = exc
            except _Cancelled:
                error = self.error
        if result is not None:
            self._on_done(result)
            return
        assert error is not None and self.sink is not None
        if isinstance(error, StorageFailure):
            self.sink.close()
            self._on_done(self._failed(error, "storage", "error"))
            return
        # falling back from parts to one stream is a change of method, not a failed try: free, once per reason
        fallback = error.reason in ("no_ranges", "no_validator") and error.reason not in self.fallbacks
        if error.reason == "changed" and self.planned_refused and "repin" not in self.fallbacks:
            # the planned version under another validator is a change of method, once
            self.repinned = self.source.confirm_planned(self.item)
            if self.repinned is not None:
                self.fallbacks.add("repin")
                fallback = True
        self.planned_refused = False
        if error.kind is Kind.RESTART and (fallback or self.attempt < self.settings.attempts):
            if fallback:
                self.fallbacks.add(error.reason)
            else:
                self.attempt += 1
            if error.reason == "changed":
                self.changes += 1
                if self.changes >= 2:
                    # e.g. a CDN whose nodes disagree on the ETag: one response is one version
                    self.single_stream = True
            if error.reason in ("changed", "checksum", "size", "gzip", "no_ranges", "no_validator"):
                self.sink.discard()  # those bytes are wrong or of another version
            else:
                self.sink.close()
            self.stats.retry(logging.WARNING, "items fetched again", "fetching %s again (attempt %d/%d): %s", self.item.key,
                             self.attempt, self.settings.attempts, error)
            if not fallback:
                time.sleep(self.settings.backoff.delay(self.attempt - 1))
            try:
                self.begin()
            except (FetchError, StorageFailure) as exc:
                kind = "permanent" if getattr(exc, "kind", None) is Kind.PERMANENT else "transient"
                self._on_done(self._failed(exc, getattr(exc, "reason", "storage"), kind))
                return
            self.launch()
            return
        if error.kind is Kind.RESTART:
            # a mismatch that survives every attempt is the source's problem, not the network's;
            # a fallback to one stream is not a mismatch: what failed after it was the network
            kind = "transient" if error.reason in ("changed", "no_ranges", "no_validator") else "permanent"
            if error.reason in ("no_ranges", "no_validator") and self.last_error is not None:
                # falling back to one stream only costs a fresh start; what failed is the network
                error = FetchError(f"{self.last_error} (then: {error})", Kind.TRANSIENT, self.last_error.reason)
            elif error.reason == "changed":
                error = FetchError(f"{error} (it is not the version planned; if the source was replaced, bump "
                                   f"planGeneration to plan again)", error.kind, error.reason)
            self.sink.discard()
        else:
            kind = error.kind.value
            if kind == "permanent":
                self.sink.discard()
            else:
                self.sink.close()  # keep a resumable temporary for the next run
        self._on_done(self._failed(error, error.reason, kind))

    def _failed(self, error: Exception, reason: str, kind: str) -> ItemResult:
        return ItemResult(self.item, self.dest_key, "failed", error=str(error), kind=kind, reason=reason,
                          bytes_received=self.received_total)

    def _finalize(self) -> ItemResult:
        assert self.sink is not None
        if self.digests is None:
            self._revalidate()
        with self.lock:
            hashing_needed = not self.hashing and self._available() is not None
            if hashing_needed:
                self.hashing = True
        if hashing_needed:
            self._hash_loop(None)
        assert self.digests is not None and self.expected is not None
        where = redact(self.item.source)
        if self.total is not None and (self.hashed != self.total or self.digests.size != self.total):
            raise FetchError(f"{where}: got {self.digests.size} bytes, expected {self.total}", Kind.RESTART, "size")
        sums = self.expected.check(self.digests, where)
        checks = recorded_checks(self.sized, sums)
        try:
            size, sha256 = self.sink.commit(self.digests)
        except FetchError as exc:
            if exc.reason == "gzip" and sums:
                # the bytes are exactly what the source declares: fetching again cannot help
                raise FetchError(str(exc), Kind.PERMANENT, "gzip") from None
            raise
        record = Record(
            item=self.item.key, fingerprint=item_fingerprint(self.item, self.settings.gunzip), location=self.dest_key,
            size=size, sha256=sha256, source_size=self.digests.size, source_sha256=self.digests.sha256,
            source_md5=self.digests.md5, checks=checks,
        )
        try:
            write_record(self.root, record)
        except Exception as exc:
            raise StorageFailure(f"writing the verification record of {self.item.key}: {exc}") from None
        return ItemResult(self.item, self.dest_key, "fetched", record=record, bytes_received=self.received_total)

    def _revalidate(self) -> None:
        """Every byte came from the journal (or there are none): ask the source which version
        it serves now and what checksums it declares — one byte — before trusting them."""
        total = self.total or 0
        start, end = (total - 1, total) if total > 0 else (0, None)
        self.stats.request(+1)
        try:
            body = self.source.open(self.item, start, end, self.validator or self.planned)
            try:
                self._accept(None, body)
            finally:
                body.close()
        finally:
            self.stats.request(-1)


def relocate(root: Storage, src_key: str, dest_key: str, record: Record) -> None:
    """Move the verified object at `src_key` to `dest_key` without downloading it: a rename
    on a filesystem, a server-side copy and delete on S3. Moving (not copying) keeps each
    item in exactly one shard directory after a re-shard, and costs no space."""
    if isinstance(root, LocalStorage):
        src, dest = root.local_path(src_key), root.local_path(dest_key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(src, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_verified(root, src_key, dest_key, record)  # another mount below the root
            src.unlink()
        fsync_dir(dest.parent)
        return
    from trajflow.storage.s3 import S3Storage

    if isinstance(root, S3Storage):
        def full(key: str) -> str:
            return f"{root.prefix}/{key}" if root.prefix else key

        root.client.copy({"Bucket": root.bucket, "Key": full(src_key)}, root.bucket, full(dest_key))
        info = root.stat(dest_key)
        if info is None or info.size != record.size:
            root.delete(dest_key)  # not the verified bytes: nothing unverified keeps the name
            raise ValueError(f"server-side copy of {src_key} to {dest_key} did not produce {record.size} bytes")
    else:
        _copy_verified(root, src_key, dest_key, record)
    root.delete(src_key)


def _copy_verified(root: Storage, src_key: str, dest_key: str, record: Record) -> None:
    digests = Digests()
    with root.open_read(src_key) as fin, root.writer(dest_key) as fout:
        while block := fin.read(READ_CHUNK):
            digests.update(block)
            fout.write(block)
        if digests.sha256 != record.sha256:
            raise ValueError(f"{src_key} no longer matches its verification record")
