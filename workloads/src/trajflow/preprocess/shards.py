"""The resampled shard format: what preprocessing writes and training memory-maps.

One shard is one file, ``<root>/resampled/<shard>.safetensors``, plus its manifest
``<root>/resampled/_done/<shard>.json`` (written last; a shard is done iff it exists).

The file is a plain safetensors file (https://github.com/huggingface/safetensors), so any
safetensors reader can open it:

- one tensor per stream, named by its output stream name (``observation.state``,
  ``action`` ...), shape ``[N_total, D]``: every episode's frames concatenated in episode
  order, all at one uniform rate, all in one dtype (float32, bfloat16 or float16);
- ``__metadata__["trajflow.index"]``: a JSON index, the same one the manifest carries::

      {"format": "trajflow.shard", "version": 1, "rate_hz": 50.0, "dtype": "float32",
       "streams": {"observation.state": 14, "action": 7}, "num_frames": N_total,
       "episodes": [{"offset": 0, "length": 120, "source": "raw/00003/demo/ep1.parquet",
                     "episode": "1", "robot": "so100", "original_rate_hz": 29.97,
                     "raw_length": 73, "start_time": 0.0}, ...]}

  Episode ``i`` of stream ``s`` is rows ``[offset, offset + length)`` of tensor ``s``;
  frame ``j`` of it is at time ``start_time + j / rate_hz`` (seconds, in the raw
  recording's clock).

The tensors are stored back to back (in the writer's stream order, which
`ShardReader.streams` gives) with no padding, and the header is padded to 8 bytes, so with
one dtype per shard every tensor is aligned to its element size.
Writing is deterministic: the same episodes give the same bytes.

Reading (`open_shard`) memory-maps the file; nothing is copied until it is touched.
numpy has no bfloat16: for bf16 shards `ShardReader.array` returns the raw bit patterns as
``uint16`` (``x.astype(np.uint32) << 16`` viewed as float32 gives the values) and
`ShardReader.tensor` returns a real ``torch.bfloat16`` view of the same memory. float32
and float16 shards are native numpy dtypes.

For an S3 run root, `fetch_shard` downloads the file to local disk (checking the
manifest's sha256) so it can be memory-mapped; `open_shard(storage=..., key=...)` does it
for you when the storage has no local path.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import re
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Iterable, Iterator, Mapping, Sequence

import numpy as np

from trajflow.config.preprocess import SETTINGS_ADDED_LATER
from trajflow.errors import PermanentError
from trajflow.storage import STAGE_DIRS, Storage, done_shards, manifest_key, read_manifest, shard_name
from trajflow.storage.base import sha256_stream
from trajflow.storage.local import naming_write_errors

log = logging.getLogger(__name__)

FORMAT = "trajflow.shard"
FORMAT_VERSION = 1
INDEX_KEY = "trajflow.index"
SHARD_SUFFIX = ".safetensors"
REPORT_SUFFIX = ".report.json"
RESAMPLED_DIR = STAGE_DIRS["preprocess"]

# output dtype name -> (safetensors dtype code, numpy dtype used to hold it)
DTYPES: dict[str, tuple[str, np.dtype]] = {
    "float32": ("F32", np.dtype("<f4")),
    "float16": ("F16", np.dtype("<f2")),
    "bfloat16": ("BF16", np.dtype("<u2")),  # numpy has no bfloat16: raw bits
}
_COPY_CHUNK = 8 << 20
ABANDONED_PART_S = 3600.0  # a partial copy unchanged this long is no live fetcher's


# the largest header the safetensors library opens, and so the largest this module writes:
# the per-episode index lives in it, some 300 bytes an episode
MAX_HEADER_BYTES = 100_000_000


class ShardFormatError(ValueError):
    """A file that is not a readable trajflow shard; the message names the file."""


def shard_key(shard: int) -> str:
    """``resampled/00003.safetensors``."""
    return f"{RESAMPLED_DIR}/{shard_name(shard)}{SHARD_SUFFIX}"


def report_key(shard: int) -> str:
    """``resampled/00003.report.json``: what was quarantined, and why."""
    return f"{RESAMPLED_DIR}/{shard_name(shard)}{REPORT_SUFFIX}"


@dataclass(frozen=True)
class EpisodeInfo:
    """One resampled episode of a shard."""

    offset: int  # first row in every stream's [N_total, D] tensor
    length: int  # rows (frames at the shard's rate)
    source: str  # raw item key the episode came from (e.g. raw/00003/demo/ep1.parquet)
    episode: str  # the episode's id within that file (episode_index, demo_N, ...)
    robot: str = ""
    original_rate_hz: float = 0.0  # mean raw rate: (raw_length - 1) / raw span
    raw_length: int = 0  # raw samples
    start_time: float = 0.0  # time of frame 0, seconds in the raw clock

    def to_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "length": self.length, "source": self.source, "episode": self.episode,
                "robot": self.robot, "original_rate_hz": self.original_rate_hz, "raw_length": self.raw_length,
                "start_time": self.start_time}

    @staticmethod
    def from_json(doc: Mapping[str, Any]) -> "EpisodeInfo":
        return EpisodeInfo(
            offset=int(doc["offset"]),
            length=int(doc["length"]),
            source=str(doc.get("source", "")),
            episode=str(doc.get("episode", "")),
            robot=str(doc.get("robot", "")),
            original_rate_hz=float(doc.get("original_rate_hz", 0.0)),
            raw_length=int(doc.get("raw_length", 0)),
            start_time=float(doc.get("start_time", 0.0)),
        )


@dataclass
class Episode:
    """An episode to write: per-stream arrays ``[length, D]`` at the shard's rate."""

    data: dict[str, np.ndarray]
    source: str
    episode: str
    robot: str = ""
    original_rate_hz: float = 0.0
    raw_length: int = 0
    start_time: float = 0.0


@dataclass(frozen=True)
class ShardFile:
    """What `ShardWriter.close` wrote: the manifest's item plus the index."""

    key: str
    size: int
    sha256: str
    index: dict[str, Any] = field(repr=False)

    def item(self) -> dict[str, Any]:
        return {"key": self.key, "size": self.size, "sha256": self.sha256, "kind": "shard"}


def _dtype_info(dtype: str) -> tuple[str, np.dtype]:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unsupported shard dtype {dtype!r}; supported: {', '.join(DTYPES)}") from None


def _header_bytes(index: dict[str, Any], streams: Sequence[str], dims: Mapping[str, int], code: str,
                  itemsize: int, num_frames: int) -> bytes:
    header: dict[str, Any] = {
        "__metadata__": {INDEX_KEY: json.dumps(index, sort_keys=True, separators=(",", ":"))},
    }
    begin = 0
    for name in streams:
        nbytes = num_frames * dims[name] * itemsize
        header[name] = {"dtype": code, "shape": [num_frames, dims[name]], "data_offsets": [begin, begin + nbytes]}
        begin += nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class _Spool:
    """One stream's frames: copies of the appended arrays in memory up to ``limit`` bytes,
    after that all of them in an unlinked temporary file under ``directory``/$TMPDIR."""

    def __init__(self, limit: int, directory: str | None):
        self.limit, self.directory = limit, directory
        self.parts: list[np.ndarray] = []
        self.size = 0
        self.file: IO[bytes] | None = None

    def append(self, x: np.ndarray) -> None:
        with naming_write_errors(self.directory or tempfile.gettempdir()):  # the spool file has no name
            if self.file is None and self.size + x.nbytes > self.limit:
                self.file = tempfile.TemporaryFile(dir=self.directory)
                for part in self.parts:
                    self.file.write(part.data)
                self.parts = []
            if self.file is not None:
                self.file.write(np.ascontiguousarray(x).data)
            else:
                self.parts.append(np.array(x, order="C"))  # a copy: the caller's batch buffer is not kept alive
        self.size += x.nbytes

    def chunks(self) -> Iterator[bytes | memoryview]:
        if self.file is None:
            for part in self.parts:
                yield part.reshape(-1).view(np.uint8).data  # flat bytes, even of an empty array
            return
        self.file.seek(0)
        while block := self.file.read(_COPY_CHUNK):
            yield block

    def close(self) -> None:
        self.parts = []
        if self.file is not None:
            self.file.close()


class ShardWriter:
    """Append episodes (in their final order), then `close` to write the shard atomically.

    Frames are spooled per stream (in memory up to ``spool_bytes``, then in an unlinked
    temporary file under ``spool_dir``/$TMPDIR, which vanishes with a killed process); the
    shard file is written in one pass at `close` through the storage's atomic writer, so
    no reader ever sees a partial shard.
    """

    def __init__(self, storage: Storage, key: str, dims: Mapping[str, int], dtype: str, rate_hz: float,
                 spool_bytes: int = 256 << 20, spool_dir: str | None = None, spill_limit_bytes: int | None = None):
        if not dims:
            raise ValueError("a shard needs at least one stream")
        if not rate_hz > 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz!r}")
        self.storage, self.key = storage, key
        self.streams = list(dims)
        self.dims = {s: int(d) for s, d in dims.items()}
        self.dtype = dtype
        self.code, self.np_dtype = _dtype_info(dtype)
        self.rate_hz = float(rate_hz)
        self._per_stream = max(spool_bytes // len(self.streams), 1 << 20)
        self._spools = {s: _Spool(self._per_stream, spool_dir) for s in self.streams}
        self.spill_limit_bytes = spill_limit_bytes
        self.episodes: list[EpisodeInfo] = []
        self.num_frames = 0
        # the index's episode entries as the header holds them (a JSON string in a JSON string):
        # the shard is refused as soon as they alone pass the cap, not after the whole shard is read
        self._index_bytes = 0
        self._closed = False

    def add(self, data: Mapping[str, np.ndarray], *, source: str, episode: str, robot: str = "",
            original_rate_hz: float = 0.0, raw_length: int = 0, start_time: float = 0.0) -> EpisodeInfo:
        """Append one episode: ``data[stream]`` is ``[length, D]`` in the shard dtype (bf16 as
        uint16 bits), C-contiguous or not."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        missing = [s for s in self.streams if s not in data]
        if missing:
            raise ValueError(f"episode {episode!r} of {source}: missing stream(s) {missing}")
        length = None
        for s in self.streams:
            x = data[s]
            if x.ndim != 2 or x.shape[1] != self.dims[s]:
                raise ValueError(f"episode {episode!r} of {source}: stream {s!r} has shape {x.shape}, "
                                 f"expected [length, {self.dims[s]}]")
            if x.dtype != self.np_dtype:
                raise ValueError(f"episode {episode!r} of {source}: stream {s!r} has dtype {x.dtype}, "
                                 f"expected {self.np_dtype} for a {self.dtype} shard")
            if length is None:
                length = x.shape[0]
            elif x.shape[0] != length:
                raise ValueError(f"episode {episode!r} of {source}: streams have different lengths")
        info = EpisodeInfo(offset=self.num_frames, length=int(length or 0), source=source, episode=str(episode),
                           robot=robot, original_rate_hz=float(original_rate_hz), raw_length=int(raw_length),
                           start_time=float(start_time))
        # escaping goes character by character: the entry's share of the header, plus its comma
        entry = json.dumps(json.dumps(info.to_json(), sort_keys=True, separators=(",", ":")))
        if self._index_bytes + len(entry) - 1 > MAX_HEADER_BYTES:
            raise self._header_too_large(self._index_bytes + len(entry) - 1, len(self.episodes) + 1)
        self._check_spill({s: self._spools[s].size + data[s].nbytes for s in self.streams})
        for s in self.streams:
            self._spools[s].append(data[s])
        self._index_bytes += len(entry) - 1
        self.episodes.append(info)
        self.num_frames += info.length
        return info

    def _check_spill(self, sizes: Mapping[str, int]) -> None:
        """Stop before the spooled frames outgrow the temporary directory's size limit: past
        an emptyDir's sizeLimit the kubelet evicts the pod, which is retried forever."""
        if self.spill_limit_bytes is None:
            return
        on_disk = sum(n for n in sizes.values() if n > self._per_stream)  # a spool past its memory share is a file
        if on_disk > self.spill_limit_bytes:
            raise PermanentError(
                f"{self.key}: this shard's frames would take {on_disk / 2**20:.1f} MiB of the temporary directory, "
                f"more than the {self.spill_limit_bytes / 2**20:.1f} MiB it may use: raise preprocessing.tmp.sizeLimit "
                "(or config.spoolMemoryMib with the memory limit), or use more shards so that each is smaller"
            )

    def _header_too_large(self, size: int, episodes: int) -> PermanentError:
        # published, it would be a done shard that no reader opens, training included
        return PermanentError(
            f"{self.key}: the index of this shard's {episodes} episodes takes {size / 1e6:.0f} "
            f"MB, more than the {MAX_HEADER_BYTES / 1e6:.0f} MB a safetensors header may: use more shards "
            "(downloader.shards, preprocessing.shards and training.inputShards) so that each holds fewer episodes"
        )

    def index(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "rate_hz": self.rate_hz,
            "dtype": self.dtype,
            "streams": dict(self.dims),
            "num_frames": self.num_frames,
            "episodes": [e.to_json() for e in self.episodes],
        }

    def close(self) -> ShardFile:
        """Write the shard file atomically and return its key, size, sha256 and index."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        index = self.index()
        header = _header_bytes(index, self.streams, self.dims, self.code, self.np_dtype.itemsize, self.num_frames)
        if len(header) - 8 > MAX_HEADER_BYTES:
            raise self._header_too_large(len(header) - 8, len(self.episodes))
        digest, size = hashlib.sha256(), 0

        def blocks() -> Iterator[bytes | memoryview]:
            yield header
            for s in self.streams:
                yield from self._spools[s].chunks()

        # frames held in memory can be hashed on another core while they are written
        # (both release the GIL); a spool in a file is read once, for both
        hasher, hash_error = None, []

        def hash_all() -> None:
            try:
                for block in blocks():
                    digest.update(block)
            except BaseException as exc:  # handed to the writing thread
                hash_error.append(exc)

        if all(spool.file is None for spool in self._spools.values()):
            hasher = threading.Thread(target=hash_all, name="shard-sha256")
            hasher.start()
        try:
            with self.storage.writer(self.key) as out:
                for block in blocks():
                    if hasher is None:
                        digest.update(block)
                    out.write(block)
                    size += len(block)
                if hasher is not None:
                    hasher.join()
                    if hash_error:
                        raise hash_error[0]
        finally:
            if hasher is not None:
                hasher.join()
            self.abort()
        return ShardFile(self.key, size, digest.hexdigest(), index)

    def abort(self) -> None:
        """Drop the spooled frames; nothing is written."""
        self._closed = True
        for spool in self._spools.values():
            spool.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if not self._closed:
            self.abort()


def write_shard(storage: Storage, key: str, episodes: Iterable[Episode], dtype: str, rate_hz: float,
                dims: Mapping[str, int] | None = None) -> ShardFile:
    """Write ``episodes`` (float arrays, cast to ``dtype``) as one shard at ``key``.

    ``dims`` fixes the streams and their order; default: the first episode's streams.
    """
    from trajflow.preprocess.dtypes import to_storage_dtype

    episodes = list(episodes)
    if dims is None:
        if not episodes:
            raise ValueError("cannot infer the streams of a shard with no episodes: pass dims")
        dims = {s: int(np.asarray(x).shape[1]) for s, x in episodes[0].data.items()}
    writer = ShardWriter(storage, key, dims, dtype, rate_hz)
    with writer:
        for ep in episodes:
            writer.add({s: to_storage_dtype(np.asarray(ep.data[s]), dtype) for s in dims}, source=ep.source,
                       episode=ep.episode, robot=ep.robot, original_rate_hz=ep.original_rate_hz,
                       raw_length=ep.raw_length, start_time=ep.start_time)
        return writer.close()


# ---------------------------------------------------------------------------- reading


def read_header(fh: BinaryIO, name: str = "shard") -> tuple[dict[str, Any], int]:
    """(header JSON, offset of the data buffer) of a safetensors file."""
    head = fh.read(8)
    if len(head) != 8:
        raise ShardFormatError(f"{name}: too short to be a safetensors file ({len(head)} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > 256 << 20:  # shards written before MAX_HEADER_BYTES may be larger; beyond this, no shard
        raise ShardFormatError(f"{name}: header length {n} is implausible; not a safetensors file")
    raw = fh.read(n)
    if len(raw) != n:
        raise ShardFormatError(f"{name}: truncated header ({len(raw)} of {n} bytes)")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ShardFormatError(f"{name}: header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ShardFormatError(f"{name}: header is not a JSON object")
    return header, 8 + n


def _parse_index(header: Mapping[str, Any], name: str) -> dict[str, Any]:
    meta = header.get("__metadata__") or {}
    if INDEX_KEY not in meta:
        raise ShardFormatError(f"{name}: not a trajflow shard (no {INDEX_KEY!r} in the safetensors metadata)")
    try:
        index = json.loads(meta[INDEX_KEY])
    except (ValueError, RecursionError) as exc:
        raise ShardFormatError(f"{name}: corrupt shard index: {exc}") from None
    if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
        raise ShardFormatError(
            f"{name}: unsupported shard format {index.get('format')!r} version {index.get('version')!r} "
            f"(this reader handles {FORMAT} version {FORMAT_VERSION})"
        )
    return index


class ShardReader:
    """A memory-mapped shard. Arrays are views of the file: opening is O(header), and
    pages are read only when touched.

    - ``rate_hz``, ``dtype`` (``"float32"|"bfloat16"|"float16"``), ``streams`` (names in
      file order), ``dims`` (name -> D), ``num_frames``, ``episodes`` (`EpisodeInfo` list);
    - ``array(stream)``: read-only numpy memmap ``[num_frames, D]`` (bf16: uint16 bits);
    - ``tensor(stream)``: a torch tensor over the same pages (bf16 as ``torch.bfloat16``),
      copy-on-write: writing to it never changes the file;
    - ``episode(i, stream)``: rows of episode ``i`` (a view of ``array``);
    - ``episode_tensor(i, stream)``: the same as a torch view.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        name = str(self.path)
        with open(self.path, "rb") as fh:
            header, self._data_start = read_header(fh, name)
            size = os.fstat(fh.fileno()).st_size
        try:
            self.index = _parse_index(header, name)
            self._load_layout(header, name, size)
        except ShardFormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:  # a damaged header
            raise ShardFormatError(f"{name}: corrupt shard header: {type(exc).__name__}: {exc}") from None
        self.streams = [s for s, _ in sorted(self._layout.items(), key=lambda kv: kv[1][0])]
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    def _load_layout(self, header: dict[str, Any], name: str, size: int) -> None:
        self.rate_hz = float(self.index["rate_hz"])
        if not math.isfinite(self.rate_hz) or self.rate_hz <= 0:
            raise ShardFormatError(f"{name}: rate {self.rate_hz} Hz is no rate")
        self.dtype = str(self.index["dtype"])
        code, self.np_dtype = _dtype_info(self.dtype)
        self.dims: dict[str, int] = {s: int(d) for s, d in self.index["streams"].items()}
        self.num_frames = int(self.index["num_frames"])
        self.episodes = [EpisodeInfo.from_json(e) for e in self.index["episodes"]]
        # the writer lays episodes end to end over every frame: anything else repeats or drops frames
        end = 0
        for i, e in enumerate(self.episodes):
            if e.offset != end or e.length < 0 or e.offset + e.length > self.num_frames:
                raise ShardFormatError(f"{name}: episode {i} (frames {e.offset}+{e.length}) does not follow the "
                                       f"previous one (at frame {end}) within the shard's {self.num_frames} frames")
            end += e.length
        if end != self.num_frames:
            raise ShardFormatError(f"{name}: the episodes cover {end} of the shard's {self.num_frames} frames")
        self._layout: dict[str, tuple[int, int]] = {}
        spans = []
        for s, d in self.dims.items():
            if d < 0:
                raise ShardFormatError(f"{name}: stream {s!r} has width {d}")
            entry = header.get(s)
            if not isinstance(entry, dict):
                raise ShardFormatError(f"{name}: stream {s!r} is in the index but has no tensor")
            begin, end = (int(v) for v in entry["data_offsets"])
            if entry["dtype"] != code or list(entry["shape"]) != [self.num_frames, d]:
                raise ShardFormatError(f"{name}: tensor {s!r} is {entry['dtype']}{entry['shape']}, "
                                       f"the index says {code}[{self.num_frames}, {d}]")
            nbytes = self.num_frames * d * self.np_dtype.itemsize
            if begin < 0 or end - begin != nbytes or self._data_start + end > size:
                raise ShardFormatError(f"{name}: tensor {s!r} lies outside the file (truncated?)")
            self._layout[s] = (self._data_start + begin, d)
            spans.append((begin, end, s))
        # as safetensors lays them out: back to back from the buffer's start, no bytes shared
        spans.sort()
        for (_, end, s), (begin, _, t) in zip(spans, spans[1:]):
            if begin != end:
                raise ShardFormatError(f"{name}: tensors {s!r} and {t!r} are not laid back to back "
                                       f"(bytes {end} and {begin})")

    def __len__(self) -> int:
        return len(self.episodes)

    def _map(self, stream: str, mode: str) -> np.ndarray:
        cached = self._arrays.get((stream, mode))
        if cached is not None:
            return cached
        try:
            offset, d = self._layout[stream]
        except KeyError:
            raise KeyError(f"{self.path}: no stream {stream!r}; streams: {', '.join(self.streams)}") from None
        if self.num_frames == 0:
            arr = np.zeros((0, d), dtype=self.np_dtype)  # mmap cannot map zero bytes
        else:
            arr = np.memmap(self.path, dtype=self.np_dtype, mode=mode, offset=offset, shape=(self.num_frames, d))
        self._arrays[(stream, mode)] = arr
        return arr

    def array(self, stream: str) -> np.ndarray:
        """``[num_frames, D]`` read-only memmap of one stream (bf16: uint16 bit patterns)."""
        return self._map(stream, "r")

    def tensor(self, stream: str) -> Any:
        """``[num_frames, D]`` torch tensor over the file's pages (no copy)."""
        import torch

        t = torch.from_numpy(self._map(stream, "c"))  # copy-on-write map: writable, file untouched
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t

    def _rows(self, i: int) -> slice:
        e = self.episodes[i]
        return slice(e.offset, e.offset + e.length)

    def episode(self, i: int, stream: str) -> np.ndarray:
        return self.array(stream)[self._rows(i)]

    def episode_tensor(self, i: int, stream: str) -> Any:
        return self.tensor(stream)[self._rows(i)]

    def times(self, i: int) -> np.ndarray:
        """Frame times of episode ``i`` (float64 seconds in the raw clock)."""
        e = self.episodes[i]
        return e.start_time + np.arange(e.length, dtype=np.float64) / self.rate_hz

    def close(self) -> None:
        """Drop this reader's maps (arrays already handed out stay valid)."""
        self._arrays.clear()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ShardReader({str(self.path)!r}, episodes={len(self.episodes)}, frames={self.num_frames}, "
                f"rate_hz={self.rate_hz}, dtype={self.dtype}, streams={self.dims})")


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Values of a bf16 array held as uint16 bit patterns (numpy has no bfloat16)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def as_float32(reader: ShardReader, stream: str, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
    """A float32 copy of rows (frames) of a stream, whatever the shard dtype."""
    x = reader.array(stream)[rows]
    if reader.dtype == "bfloat16":
        return bf16_bits_to_float32(x)
    return np.asarray(x, dtype=np.float32)


# ------------------------------------------------------------------ listing and fetching


@dataclass(frozen=True)
class ShardEntry:
    """A done shard as its manifest describes it."""

    shard: int
    key: str  # the .safetensors key under the run root
    size: int
    sha256: str
    num_episodes: int
    num_frames: int
    manifest: dict[str, Any] = field(repr=False)


def _entry(shard: int, manifest: dict[str, Any], where: str) -> ShardEntry:
    listed = manifest.get("items", [])
    if not isinstance(listed, list) or not all(isinstance(it, dict) for it in listed):
        raise ShardFormatError(f"{where}: the manifest's items are not a list of objects")
    count = manifest.get("shards")  # older manifests record none
    if count is not None and (type(count) is not int or not 0 <= shard < count):
        raise ShardFormatError(f"{where}: the manifest of shard {shard} records a shard count of {count!r}")
    items = [it for it in listed if it.get("kind") == "shard"]
    if len(items) != 1:
        raise ShardFormatError(f"{where}: manifest lists {len(items)} shard files, expected 1")
    it = items[0]
    if it.get("key") != shard_key(shard):  # another shard's file would be read twice, this one never
        raise ShardFormatError(f"{where}: the manifest of shard {shard} names the file {it.get('key')!r}, not "
                               f"{shard_key(shard)!r}")
    sha256 = it.get("sha256")
    # a training cache files its copy under this name: nothing else may become a path there
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ShardFormatError(f"{where}: the shard file's sha256 {sha256!r} is not 64 lowercase hex digits")
    try:
        return ShardEntry(shard=shard, key=str(it["key"]), size=int(it["size"]), sha256=sha256,
                          num_episodes=int(manifest["num_episodes"]), num_frames=int(manifest["num_frames"]),
                          manifest=manifest)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ShardFormatError(f"{where}: the shard file's entry or the episode and frame counts are malformed "
                               f"({type(exc).__name__}: {exc})") from None


def settings_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The output settings a preprocess manifest records (`PreprocessConfig.output_settings`);
    an older manifest records only its rate and dtype."""
    recorded = manifest.get("settings")
    if isinstance(recorded, dict):
        return {**SETTINGS_ADDED_LATER, **recorded}
    return {"targetRateHz": manifest.get("rate_hz"), "dtype": manifest.get("dtype")}


def settings_differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Where two shards' output settings differ, on what both record: the top-level settings
    and the overrides of the sources both hold ("minLength 2 -> 3")."""
    changed = [f"{k} {before[k]!r} -> {v!r}" for k, v in after.items()
               if k != "sources" and k in before and before[k] != v]
    old, new = before.get("sources") or {}, after.get("sources") or {}
    changed += [f"sources.{name} {old[name]!r} -> {v!r}" for name, v in new.items() if name in old and old[name] != v]
    return changed


def merge_settings(seen: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Every setting recorded in either, the ones in ``seen`` kept where both record one."""
    return {**more, **seen, "sources": {**(more.get("sources") or {}), **(seen.get("sources") or {})}}


def list_shards(storage: Storage) -> list[ShardEntry]:
    """The done shards (their ``resampled/_done/<shard>.json`` exists), by shard number."""
    out = []
    for shard in sorted(done_shards(storage, "preprocess")):
        manifest = read_manifest(storage, "preprocess", shard)
        if manifest is None:  # removed between listing and reading
            continue
        out.append(_entry(shard, manifest, f"{storage.uri}/{manifest_key('preprocess', shard)}"))
    return out


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return sha256_stream(fh, _COPY_CHUNK)[0]


def check_shard_file(path: Path, entry: ShardEntry, stamp: Path | None = None) -> None:
    """That the file at ``path`` is the one ``entry``'s manifest describes (size, then sha256).
    A ``stamp`` file records a successful check: while the file keeps the size and
    modification time it had then, it is not hashed again (a terabyte takes most of an hour,
    and training checks its shards on every start)."""
    size = path.stat().st_size
    if size != entry.size:
        raise ShardFormatError(f"{path}: {size} bytes, the manifest says {entry.size}")
    if stamp is not None and _stamp_holds(stamp, path, entry.sha256):
        return
    digest = _file_sha256(path)
    if digest != entry.sha256:
        raise ShardFormatError(f"{path}: sha256 {digest} does not match the manifest's {entry.sha256}")
    if stamp is not None:
        _write_stamp(stamp, path, entry.sha256)


def _stamp_of(path: Path, sha256: str) -> dict[str, Any]:
    st = path.stat()
    return {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stamp_holds(stamp: Path, path: Path, sha256: str) -> bool:
    try:
        return bool(json.loads(stamp.read_text()) == _stamp_of(path, sha256))
    except (OSError, ValueError):
        return False


def _write_stamp(stamp: Path, path: Path, sha256: str) -> None:
    tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}-{threading.get_ident()}")
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(_stamp_of(path, sha256)))
        os.replace(tmp, stamp)
    except OSError as exc:  # a volume mounted read-only here: the file is hashed again next time
        log.info("cannot record that %s was checked (%s); it is hashed again at the next start", path, exc)
        with contextlib.suppress(OSError):  # a read-only volume refuses the unlink too
            tmp.unlink(missing_ok=True)


def default_cache_dir() -> Path:
    """Where shards of an object store are copied when no cache directory is given."""
    return Path(tempfile.gettempdir()) / f"trajflow-shards-{os.getuid()}"


def fetch_shard(storage: Storage, entry: ShardEntry, cache_dir: str | Path, verify: bool = True) -> Path:
    """A local path holding ``entry``'s file: the file itself on a filesystem root, else a
    copy under ``cache_dir`` (reused when its size and sha256 match the manifest, the sha256
    as `check_shard_file` checks it). Copies are filed by their sha256: runs of other roots
    sharing the cache never meet."""
    local = storage.local_path(entry.key)
    if local is not None:
        return local
    # (a shard opened without its manifest has no sha256: filed by where it comes from)
    folder = entry.sha256 or hashlib.sha256(f"{storage.uri}/{entry.key}".encode()).hexdigest()
    dest = Path(cache_dir) / folder / Path(entry.key).name
    stamp = dest.with_name(f".{dest.name}.checked")
    if dest.is_file() and dest.stat().st_size == entry.size:
        if not verify:
            return dest
        try:
            check_shard_file(dest, entry, stamp)
            return dest
        except ShardFormatError:
            pass  # a damaged copy: fetched again
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_parts_of_dead_fetchers(dest)
    tmp = _part_name(dest)
    digest = hashlib.sha256()
    try:
        with naming_write_errors(dest), storage.open_read(entry.key) as src, open(tmp, "wb") as out:
            for block in iter(lambda: src.read(_COPY_CHUNK), b""):
                digest.update(block)
                out.write(block)
        if verify and digest.hexdigest() != entry.sha256:
            raise ShardFormatError(f"{storage.uri}/{entry.key}: sha256 {digest.hexdigest()} does not match the "
                                   f"manifest's {entry.sha256}")
        os.replace(tmp, dest)
        if verify:
            _write_stamp(stamp, dest, entry.sha256)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _part_name(dest: Path) -> Path:
    """The partial copy this process writes: its host (a pod) and pid, as pods on one cache
    volume may have the same pids."""
    return dest.with_name(f".{dest.name}.part-{socket.gethostname()}-{os.getpid()}")


def _remove_parts_of_dead_fetchers(dest: Path) -> None:
    """Partial copies of ``dest`` no one finishes (a fetcher killed mid-copy, out of memory),
    on a cache volume that may outlive the pods: this host's whose process is gone, and any
    unchanged for an hour (another pod's, whose pids this one cannot see)."""
    from trajflow.local.procs import alive

    host = socket.gethostname()
    for part in dest.parent.glob(f".{glob.escape(dest.name)}.part-*"):
        owner, _, pid = part.name.rpartition(".part-")[2].rpartition("-")
        try:
            if owner == host:  # this pod's: its fetcher's pid says (a live one may stall for long)
                dead = pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid))
            else:
                dead = time.time() - part.stat().st_mtime > ABANDONED_PART_S
            if dead:
                part.unlink()
        except OSError:
            continue  # finished or removed meanwhile


def open_shard(path: str | Path | None = None, *, storage: Storage | None = None, key: str | None = None,
               cache_dir: str | Path | None = None, verify: bool = True) -> ShardReader:
    """Open a shard by local path, or by ``storage`` + ``key`` (fetched into ``cache_dir``,
    default a per-user temp directory, when the storage is not a filesystem, and checked
    against its manifest's sha256 unless ``verify`` is off)."""
    if path is not None:
        return ShardReader(path)
    if storage is None or key is None:
        raise ValueError("open_shard needs a path, or storage and key")
    local = storage.local_path(key)
    if local is not None:
        return ShardReader(local)
    stat = storage.stat(key)
    if stat is None:
        raise FileNotFoundError(f"{storage.uri}/{key}: no such shard")
    shard = int(Path(key).name.split(".")[0]) if Path(key).name.split(".")[0].isdigit() else -1
    manifest = read_manifest(storage, "preprocess", shard) if shard >= 0 else None
    if manifest is not None:
        entry = _entry(shard, manifest, key)
    else:
        entry = ShardEntry(shard, key, stat.size, "", 0, 0, {})
    return ShardReader(fetch_shard(storage, entry, cache_dir or default_cache_dir(), verify=verify and bool(entry.sha256)))


