"""The storage interface every stage uses: one run root, keys relative to it."""
from __future__ import annotations

import abc
import contextlib
import copy
import hashlib
import io
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

CHUNK = 8 * 1024 * 1024
STALE_UPLOAD_S = 3600.0  # an upload begun this long ago is a killed run's, not a live one's


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the root, "/"-separated
    size: int
    etag: str = ""  # S3 ETag without quotes; empty on the filesystem
    modified_ns: int = 0  # modification time on the filesystem (st_mtime_ns); 0 on S3


def sha256_stream(stream: BinaryIO, chunk: int = CHUNK) -> tuple[str, int]:
    """(hex sha256, bytes) of a stream, read in chunks."""
    digest, total = hashlib.sha256(), 0
    while True:
        block = stream.read(chunk)
        if not block:
            return digest.hexdigest(), total
        digest.update(block)
        total += len(block)


# Names the backends use for their own bookkeeping (temporaries, election claims, probes).
# Any key with a segment starting like this is hidden from listings.
INTERNAL_PREFIX = ".trajflow-"


def check_key(key: str) -> str:
    """Keys are relative, "/"-separated, and never climb out of the root."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\0" in key:
        raise ValueError(f"invalid storage key {key!r}: keys are relative and use '/'")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}: empty, '.' or '..' segment")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: like a key, but may end in "/" or stop in the middle of a name."""
    if prefix == "":
        return prefix
    body = prefix[:-1] if prefix.endswith("/") else prefix
    try:
        check_key(body)
    except ValueError:
        raise ValueError(f"invalid storage prefix {prefix!r}: prefixes are relative and use '/'") from None
    return prefix


def check_range(start: int, end: int | None) -> None:
    if start < 0 or (end is not None and end < 0):
        raise ValueError(f"invalid byte range [{start}, {end}): offsets are non-negative")


def is_internal(key: str) -> bool:
    """True for the backends' own objects (temporaries, claims), never listed."""
    return any(part.startswith(INTERNAL_PREFIX) for part in key.split("/"))


class Storage(abc.ABC):
    """A run root (`file:///...` or `s3://bucket/prefix`).

    Writers are atomic: readers see either nothing or the whole object, never a part.
    """

    uri: str

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, sorted by key, temporaries excluded.

        The prefix is a plain string prefix, as in S3: "raw/" lists everything under the
        raw directory, "raw/0001" also matches "raw/00012/x" and "raw/0001.json".
        """

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size (and ETag) of one object, or None when absent."""

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    @abc.abstractmethod
    def open_read(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        """A stream of bytes [start, end) of `key` (end None: to the end), clipped to the
        object's size like a Python slice. FileNotFoundError if absent."""

    def read_bytes(self, key: str) -> bytes:
        with self.open_read(key) as fh:
            return fh.read()

    @abc.abstractmethod
    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        """Write `key` atomically: visible under its name only when the block exits cleanly."""

    def write_bytes(self, key: str, data: bytes) -> None:
        with self.writer(key) as fh:
            fh.write(data)

    @abc.abstractmethod
    def write_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` unless it exists; True when this call's data won. Exactly one
        concurrent writer wins."""

    def read_range(self, key: str, start: int, end: int | None = None) -> bytes:
        with self.open_read(key, start, end) as fh:
            return fh.read()

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; absent keys are not an error."""

    def sha256(self, key: str) -> tuple[str, int]:
        with self.open_read(key) as fh:
            return sha256_stream(fh)

    def prefetch(self, key: str) -> None:
        """Hint that `key` is about to be read whole: a backend that can fetch it in the
        background does; the others ignore it."""

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for `key` when the backend has one (for memory-mapping)."""
        return None

    def abort_stale_uploads(self, prefix: str, older_than_s: float,
                            which: Callable[[str], bool] = lambda key: True) -> None:
        """Abort the unfinished uploads of keys under `prefix` (those `which` picks) begun
        over `older_than_s` ago: a killed writer's, never visible, but stored and billed. An
        object store's; never raises (a bucket's lifecycle rule is the fallback)."""

    def largest_object(self) -> int | None:
        """The most bytes one object can hold here; None when nothing says."""
        return None

    def child(self, prefix: str) -> "Storage":
        """A storage rooted at `prefix` below this root."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class RangedFile(io.RawIOBase):
    """A read-only, seekable view of an object of known size through ranged reads, for
    parsers that read only the parts they need (h5py, pyarrow): a file of gigabytes of
    unselected images costs only its selected datasets. Small reads (a parser's scattered
    metadata, read again and again) are served from a few cached aligned blocks; large ones
    go to the store whole. The first storage error it meets is kept in `error`, as parsers
    may report it as a malformed file."""

    BLOCK = 1 << 20
    CACHED_BLOCKS = 16

    def __init__(self, storage: Storage, key: str, size: int):
        self.storage, self.key, self.size = storage, key, size
        self.error: Exception | None = None
        self._pos = 0
        self._blocks: OrderedDict[int, bytes] = OrderedDict()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _range(self, start: int, end: int) -> bytes:
        try:
            return self.storage.read_range(self.key, start, end)
        except Exception as exc:
            self.error = self.error or _detached(exc)
            raise

    def _block(self, index: int) -> bytes:
        data = self._blocks.pop(index, None)
        if data is None:
            data = self._range(index * self.BLOCK, min((index + 1) * self.BLOCK, self.size))
            if len(self._blocks) >= self.CACHED_BLOCKS:
                self._blocks.popitem(last=False)
        self._blocks[index] = data
        return data

    def readinto(self, buffer: "bytearray | memoryview") -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        n = min(out.nbytes, self.size - self._pos)
        if n <= 0:
            return 0
        if n >= 4 * self.BLOCK:
            data = self._range(self._pos, self._pos + n)
            out[: len(data)] = data
        else:
            done = 0
            while done < n:
                at = self._pos + done
                block = self._block(at // self.BLOCK)
                piece = block[at % self.BLOCK : at % self.BLOCK + n - done]
                if not piece:
                    break  # the object is shorter than its listed size
                out[done : done + len(piece)] = piece
                done += len(piece)
            data = out[:done]
        self._pos += len(data)
        return len(data)


def _detached(exc: Exception) -> Exception:
    """A copy of `exc` that shares nothing with the original: a parser (h5py) may keep the
    original, and with it frames that hold its own objects, alive until the interpreter's
    exit, which then frees them after the parser's library (a segfault)."""
    try:
        fresh = copy.copy(exc)
    except Exception:  # noqa: BLE001  an exception that cannot be rebuilt from its arguments
        fresh = OSError(getattr(exc, "errno", None), str(exc))
    fresh.__traceback__ = fresh.__cause__ = fresh.__context__ = None
    return fresh
