"""Readers for the raw formats robot-learning datasets ship, and per-episode validation.

Every reader turns one raw file into a list of outcomes, one per episode found:
`RawEpisode` (times and the selected streams, checked and ready to resample) or
`Quarantined` (why the episode, or the whole file, cannot be used). A broken file never
raises here: it becomes a quarantine entry. Only storage failures (the bytes could not be
fetched) propagate, because retrying can fix those.

Formats:

- ``lerobot``: LeRobot-style parquet, one row per frame with ``episode_index``,
  ``frame_index``, ``timestamp`` and vector columns (fixed-size or variable
  lists of floats, or scalars) such as ``observation.state`` and ``action``. A file may hold
  one episode (LeRobot v2) or many (v3). Without a timestamp column, times are
  ``frame_index / rate``.
- ``robomimic``: robomimic-style HDF5, ``data/demo_N/obs/<key>``, ``data/demo_N/actions``
  ...; times from a ``timestamps`` dataset (in the demo group or under ``obs/``) or a
  recorded rate (``rate_hz``/``fps``/``control_freq`` attributes of the demo or of
  ``data``, or ``env_args.env_kwargs.control_freq``). Stream names are paths relative to
  the demo group (``obs/robot0_eef_pos``, ``actions``). With a ``filterKey``, only the demos
  the file's ``mask/<filterKey>`` lists (robomimic's filter keys: ``train``, ``valid``...).
- ``npz``: one episode per file (top-level keys: the time key and the streams) or several
  (keys ``<episode>/<stream>``); a scalar ``rate_hz``/``fps`` stands in for timestamps.

Timestamps count the configured ``timeUnit``: float seconds by default (integers are refused
as counts of ms, us or ns); with ms, us or ns, integers or floats converted to seconds.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import os
import re
import types
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import numpy as np

from trajflow.config.preprocess import PreprocessConfig
from trajflow.preprocess.npzfile import PickledMember, load_npz
from trajflow.storage import Storage
from trajflow.storage.base import RangedFile
from trajflow.storage.local import check_regular

log = logging.getLogger(__name__)

# quarantine reasons (the metric label values and the report's keys)
UNREADABLE = "unreadable_file"  # truncated or corrupt: the parser gave up
MISSING_FILE = "missing_file"  # listed in the raw manifest but not in storage
SIZE_MISMATCH = "size_mismatch"  # size differs from the raw manifest (truncated download)
MISSING_STREAM = "missing_stream"
MISSING_TIME = "missing_time"  # neither timestamps nor a recorded rate, or times that are no seconds
# Below this mean rate, timestamps are taken to count ms, us or ns rather than seconds (or to
# jump): resampled as seconds, the episode would grow 1000x or more (a multi-GB allocation).
MIN_MEAN_RATE_HZ = 1.0
# Above this one, they count minutes or hours (or a recorded rate is corrupt): resampled as
# seconds, the episode would shrink to a frame or two.
MAX_MEAN_RATE_HZ = 100_000.0
MAX_SECONDS = 1e11  # no clock counts this many seconds: a larger timestamp is a count of ms, us or ns
TOO_SHORT = "too_short"
NON_MONOTONIC = "non_monotonic_time"
TIME_GAP = "time_gap"  # samples further apart than maxGapSeconds
NON_FINITE = "non_finite"  # NaN/Inf (or null) in times or data
SHAPE_MISMATCH = "shape_mismatch"  # ragged or wrong-width vectors
DUPLICATE = "duplicate_episode"  # another name of an episode already read (an HDF5 link)
REASONS = (UNREADABLE, MISSING_FILE, SIZE_MISMATCH, MISSING_STREAM, MISSING_TIME, TOO_SHORT, NON_MONOTONIC,
           TIME_GAP, NON_FINITE, SHAPE_MISMATCH, DUPLICATE)

FORMAT_EXTENSIONS = {
    "lerobot": (".parquet",),
    "robomimic": (".hdf5", ".h5", ".he5"),
    "npz": (".npz",),
}
TIME_KEYS = ("timestamp", "timestamps", "time", "t")
MAX_NAMES_SHOWN = 10  # of what an episode has, in a missing stream's message
UNIT_PER_SECOND = {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}  # the timeUnit setting
HALF_PRECISION_EPS = 1e-10  # float32 and float16 have more; float64 resolves 0.4 us at epoch seconds
INT_TIME_LIMIT = 2**62  # integer timestamps (146 years of ns either side of 0) subtract safely in int64
RATE_ATTRS = ("rate_hz", "fps", "control_freq", "frequency", "hz")


@dataclass
class SourceSpec:
    """The reading settings of one source, with per-source overrides applied."""

    name: str
    format: str
    streams: list[str]  # raw names, in output order
    renames: dict[str, str]
    time_key: str
    rate_hz: float | None
    robot: str  # set for the source: wins over what the data names
    default_robot: str  # when neither the source settings nor the data name one
    min_length: int
    max_gap_s: float | None
    time_unit: str = "s"  # of the timestamps: s, ms, us or ns
    filter_key: str = ""  # robomimic: read only the demos mask/<filter_key> lists ("": all)

    def robot_for(self, named_by_data: str = "") -> str:
        return self.robot or named_by_data or self.default_robot

    @property
    def time_keys(self) -> list[str]:
        """Where timestamps are looked for: the configured key, else the usual names (also under obs/)."""
        return [self.time_key] if self.time_key else [*TIME_KEYS, *(f"obs/{k}" for k in TIME_KEYS)]

    @property
    def outputs(self) -> list[str]:
        return [self.renames.get(s, s) for s in self.streams]

    @staticmethod
    def resolve(config: PreprocessConfig, source: str) -> "SourceSpec":
        o = config.sources.get(source)

        def pick(name: str) -> Any:
            value = getattr(o, name) if o is not None else None
            return getattr(config, name) if value is None else value

        return SourceSpec(name=source, format=pick("format"), streams=list(pick("streams")),
                          renames=dict(pick("renames")), time_key=pick("time_key"), rate_hz=pick("rate_hz"),
                          time_unit=pick("time_unit"), filter_key=pick("filter_key"),
                          robot=(o.robot or "") if o is not None else "", default_robot=config.robot,
                          min_length=config.min_length, max_gap_s=config.max_gap_seconds)


@dataclass
class RawEpisode:
    """One valid episode: float64 times relative to ``start_time`` and the streams packed
    side by side in ``frames [S, sum(dims)]`` (float32), in the spec's output order."""

    source: str
    episode: str
    robot: str
    start_time: float
    times: np.ndarray  # [S] float64, times[0] == 0, strictly increasing
    frames: np.ndarray  # [S, Dsum] float32, C-contiguous
    dims: dict[str, int]  # output stream -> D, in column order
    # how far the stored times may be off by their dtype's rounding (s): float32 timestamps of
    # k frames at fps, or 30 Hz in whole milliseconds, can end just short of k/fps, which must
    # not cost the last frame
    time_rounding: float = 0.0
    widest_step: int = 0  # the widest gap between samples follows times[widest_step]

    @property
    def length(self) -> int:
        return int(self.times.shape[0])

    @property
    def widest_gap(self) -> float:
        return float(self.times[self.widest_step + 1] - self.times[self.widest_step]) if self.length > 1 else 0.0

    @property
    def original_rate_hz(self) -> float:
        span = float(self.times[-1])
        return (self.length - 1) / span if span > 0 else 0.0


@dataclass
class Quarantined:
    source: str
    episode: str  # "" when the whole file is affected
    reason: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"source": self.source, "episode": self.episode, "reason": self.reason, "detail": self.detail}


Outcome = RawEpisode | Quarantined


@dataclass
class FileResult:
    key: str
    size: int  # bytes read
    outcomes: list[Outcome] = field(default_factory=list)


class UnreadableFile(Exception):
    """The parser rejected the file (truncated, corrupt, not this format)."""


def detect_format(key: str, configured: str) -> str | None:
    """The reader for ``key``, or None when it is not a trajectory file of that format."""
    lower = key.lower()
    for fmt, extensions in FORMAT_EXTENSIONS.items():
        if lower.endswith(extensions) and configured in ("auto", fmt):
            return fmt
    return None


# ------------------------------------------------------------------------ validation


def make_episode(spec: SourceSpec, source: str, episode: str, robot: str, times: np.ndarray | None,
                 rate_hz: float | None, streams: Mapping[str, np.ndarray | None],
                 available: Callable[[], list[str]] | None = None) -> Outcome:
    """Check one episode's raw arrays and pack them; ``streams`` maps raw name -> [S] or
    [S, D] array (None: absent). Times come from ``times`` (in ``spec.time_unit``) or else
    ``rate_hz``. ``available``: the names the episode has, for a missing stream's message."""

    def bad(reason: str, detail: str) -> Quarantined:
        return Quarantined(source, episode, reason, detail)

    missing = [name for name in spec.streams if streams.get(name) is None]
    if missing:
        detail = f"no stream {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        if available is not None:
            detail += "; this episode has: " + _first_names(available())
        return bad(MISSING_STREAM, detail)
    arrays: list[np.ndarray] = []
    length: int | None = None
    for name in spec.streams:
        x = np.asarray(streams[name])
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            return bad(SHAPE_MISMATCH, f"stream {name!r} has shape {x.shape}; expected [samples] or [samples, D]")
        if x.shape[1] == 0:
            return bad(SHAPE_MISMATCH, f"stream {name!r} has shape {x.shape}: no values per sample")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
            return bad(SHAPE_MISMATCH, f"stream {name!r} has non-numeric dtype {x.dtype}")
        if length is None:
            length = x.shape[0]
        elif x.shape[0] != length:
            return bad(SHAPE_MISMATCH, f"stream {name!r} has {x.shape[0]} samples but {spec.streams[0]!r} has {length}")
        arrays.append(x)
    assert length is not None
    origin = 0.0  # seconds to add to t for the stored times (t is relative to the first when they are no seconds)
    stored_step = 0.0  # seconds of one count of integer times: a recorder rounds (or cuts) to it
    if times is None:
        if spec.time_key:
            # a configured time column says the file has timestamps: a rate would be a guess
            return bad(MISSING_TIME, f"no timestamps {spec.time_key!r} (the configured timeKey); "
                       "leave timeKey empty to fall back to a recorded rate")
        if not rate_hz:
            return bad(MISSING_TIME, "no timestamps and no recorded rate (set preprocessing.config.rateHz or timeKey)")
        t = np.arange(length, dtype=np.float64) / float(rate_hz)
    else:
        t = np.asarray(times)
        integer = np.issubdtype(t.dtype, np.integer)
        if integer and spec.time_unit == "s":
            return bad(MISSING_TIME, integer_times_detail(t.dtype))
        if t.dtype.kind in "mM":  # datetime64 / timedelta64
            unit = np.datetime_data(t.dtype)[0]
            return bad(MISSING_TIME, f"timestamps are {t.dtype}, not seconds: convert them to float seconds" + (
                f" (or to integers, .astype('int64'), and set preprocessing.config.timeUnit: {unit})"
                if unit in ("ms", "us", "ns") else ""))
        if not (integer or np.issubdtype(t.dtype, np.floating)):
            return bad(SHAPE_MISMATCH, f"timestamps have non-numeric dtype {t.dtype}")
        source_eps = 0.0 if integer else float(np.finfo(t.dtype).eps)
        if integer:
            stored_step = 1.0 / UNIT_PER_SECOND[spec.time_unit]
        t = t.reshape(-1)
        if t.shape[0] != length:
            return bad(SHAPE_MISMATCH, f"{t.shape[0]} timestamps for {length} samples")
        if spec.time_unit == "s":
            t = t.astype(np.float64)
        elif integer and length and (t.min() < -INT_TIME_LIMIT or t.max() > INT_TIME_LIMIT):
            # beyond it, the differences to the first would wrap around in int64
            return bad(MISSING_TIME, f"timestamps reach {int(t.max()) if t.max() > INT_TIME_LIMIT else int(t.min())} "
                                     f"{spec.time_unit}, beyond ±2**62")
        elif length:
            # relative to the first in the stored type: int64 ns epochs keep their precision
            per_second = UNIT_PER_SECOND[spec.time_unit]
            t = t.astype(np.int64 if integer else np.float64)
            origin = float(t[0]) / per_second
            t = (t - t[0]).astype(np.float64) / per_second
    if length < spec.min_length:
        return bad(TOO_SHORT, f"{length} samples < minLength {spec.min_length}")

    def at(i: int) -> float:  # timestamp[i] in seconds
        return origin + float(t[i])

    finite = np.isfinite(t)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        return bad(NON_FINITE, f"timestamp[{i}] is {at(i)}")
    reach = max(abs(at(0)), abs(at(-1)))
    if times is not None and length > 1 and source_eps > HALF_PRECISION_EPS:
        # float32 epoch seconds step by 128 s, and a day of uptime by 8 ms: samples would
        # merge, or land far from where they were recorded (times going back are told below)
        resolution, mean_step = source_eps * reach, float(t[-1] - t[0]) / (length - 1)
        if 0 <= mean_step < 2 * resolution:
            return bad(MISSING_TIME, f"timestamps are {np.asarray(times).dtype} and reach {reach:.10g}, where that type "
                                     f"resolves only {resolution:.3g} s, against a mean sample step of {mean_step:.3g} "
                                     "s: store them as float64, or relative to each episode's start")
    step = np.diff(t)
    if not (step > 0).all():
        i = int(np.flatnonzero(step <= 0)[0])
        return bad(NON_MONOTONIC, f"timestamp[{i + 1}] = {at(i + 1)!r} is not after timestamp[{i}] = {at(i)!r}")
    span = float(t[-1] - t[0])
    # what times too large for their timeUnit count, and the remedy
    finer = "ms, us or ns" if spec.time_unit == "s" else f"a unit finer than {spec.time_unit}"
    set_unit = "set preprocessing.config.timeUnit to their unit"
    if (times is not None and not spec.time_key and spec.time_unit == "s" and length > 2
            and bool((t == np.round(t)).all())):
        # counts stored as floats (libfranka's milliseconds): 1 kHz would pass for 1 Hz; a
        # configured timeKey says they are seconds
        return bad(MISSING_TIME, f"timestamps are whole numbers ({at(0):.15g}, {at(1):.15g}, ...), not seconds: "
                                 f"ms, us or ns counts stored as floats? {set_unit} (or, for whole seconds, name "
                                 "their column in timeKey)")
    if reach > MAX_SECONDS:
        # epoch milliseconds of a fast or jittery clock pass both checks around this one
        return bad(MISSING_TIME, f"timestamps reach {reach:.15g}, beyond {MAX_SECONDS:g} s (past the year "
                                 f"5000 as epoch seconds): {finer} counts? {set_unit}")
    widest = int(np.argmax(step)) if length > 1 else 0  # the widest gap between samples follows timestamp[widest]
    if length > 1 and (length - 1) / span < MIN_MEAN_RATE_HZ:
        return bad(MISSING_TIME, f"{length} samples over {span:.6g} s ({(length - 1) / span:.3g} Hz, below "
                                 f"{MIN_MEAN_RATE_HZ:g} Hz; the widest gap is {float(step[widest]):.6g} s after "
                                 f"timestamp[{widest}]): timestamps in {finer} rather than "
                                 f"{'seconds' if spec.time_unit == 's' else spec.time_unit}? {set_unit}")
    if length > 1 and (length - 1) / span > MAX_MEAN_RATE_HZ:
        return bad(MISSING_TIME, f"{length} samples over {span:.6g} s ({(length - 1) / span:.3g} Hz, above "
                                 f"{MAX_MEAN_RATE_HZ:g} Hz): timestamps in minutes or hours, or a corrupt recorded "
                                 f"rate? they must count {'seconds' if spec.time_unit == 's' else spec.time_unit}")
    if spec.max_gap_s is not None and length > 1 and step[widest] > spec.max_gap_s:
        return bad(TIME_GAP, f"{float(step[widest]):.6g} s between timestamp[{widest}] = {at(widest)!r} and the "
                             f"next, more than maxGapSeconds {spec.max_gap_s:g}")
    dims = {out: a.shape[1] for out, a in zip(spec.outputs, arrays)}
    frames = np.empty((length, sum(dims.values())), dtype=np.float32)
    col = 0
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, reported below as such
        for a in arrays:
            frames[:, col:col + a.shape[1]] = a
            col += a.shape[1]
    if not np.isfinite(frames).all():
        s, c = (int(v) for v in np.argwhere(~np.isfinite(frames))[0])
        name, d = column_owner(dims, c)
        raw = float(arrays[spec.outputs.index(name)][s, d])
        detail = f"{name}[{s}, {d}] is {raw}" + (" (beyond float32)" if math.isfinite(raw) else "")
        return bad(NON_FINITE, detail)
    start = at(0)
    rounding = 0.0 if times is None else stored_step or source_eps * reach
    return RawEpisode(source, episode, robot, start, t - t[0], frames, dims, rounding, widest)


def integer_times_detail(dtype: Any) -> str:
    # integer seconds cannot be finer than 1 Hz: integers count ms/us/ns, taken as seconds they
    # would stretch an episode 1000x or more (a multi-GB allocation)
    return (f"timestamps are integers ({dtype}), not seconds: set preprocessing.config.timeUnit to their unit (ms, us "
            "or ns; e.g. timeUnit: ns), convert them to float seconds, or drop them and set rateHz")


def column_owner(dims: Mapping[str, int], col: int) -> tuple[str, int]:
    for name, d in dims.items():
        if col < d:
            return name, col
        col -= d
    raise IndexError(col)


# ------------------------------------------------------------------------- parquet


def _float_values(arr: Any) -> np.ndarray:
    """Numbers of an arrow array as a numpy float array (float32 kept, others as float64)."""
    import pyarrow as pa

    if arr.null_count and pa.types.is_boolean(arr.type):
        arr = arr.fill_null(False)  # else numpy gets objects; the caller's null mask marks those rows
    x = arr.to_numpy(zero_copy_only=False)
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)


def _list_column(col: Any, name: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """A parquet column as a float matrix [rows, D] (float32 stays float32), a mask of null
    rows (or rows holding nulls) and, for lists of mixed widths, each row's width (-1 when
    null), else None. Rows of mixed widths are padded with NaN to the widest: each episode
    is held to its own rows' width (another robot's episodes may share the file)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):  # one chunk, as a file's column mostly is, is used as is: combining copies
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    else:
        arr = col
    n = len(arr)
    t = arr.type
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        if not (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)
                or pa.types.is_boolean(t.value_type)):  # booleans read as 0 and 1, as in npz and HDF5
            raise TypeError(f"column {name!r} holds lists of {t.value_type}, not numbers")
        null = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else None
        if pa.types.is_fixed_size_list(t):
            d = t.list_size
            values = arr.values.slice(arr.offset * d, n * d)
            flat = _float_values(values)
            if values.null_count:
                inner = values.is_null().to_numpy(zero_copy_only=False)
                flat = np.where(inner, np.nan, flat)
                null = inner.reshape(n, d).any(1) | (null if null is not None else False)
            return flat.reshape(n, d), null, None
        widths = pc.list_value_length(arr).fill_null(-1).to_numpy()
        valid = widths[widths >= 0]
        d = int(valid.max()) if valid.size else 0
        mixed = bool(valid.size) and int(valid.min()) != d
        if null is None and not mixed and arr.values.null_count == 0:
            return _float_values(pc.list_flatten(arr)).reshape(n, d), None, None
        flat = pc.list_flatten(arr)  # null rows hold no values
        vals = _float_values(flat).astype(np.float64)
        if flat.null_count:
            vals[flat.is_null().to_numpy(zero_copy_only=False)] = np.nan
        lengths = np.maximum(widths, 0)
        out = np.full((n, d), np.nan)
        row_of = np.repeat(np.arange(n), lengths)
        out[row_of, np.arange(len(vals)) - np.repeat(np.cumsum(lengths) - lengths, lengths)] = vals
        return out, null, (widths if mixed else None)
    if pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t):
        vals = _float_values(arr)
        null = None
        if arr.null_count:
            null = arr.is_null().to_numpy(zero_copy_only=False)
            vals = np.where(null, np.nan, vals)
        return vals[:, None], null, None
    raise TypeError(f"column {name!r} has type {t}, not a number or a list of numbers")


def _index_column(col: Any, name: str) -> np.ndarray:
    """An ``episode_index``/``frame_index`` column as int64; TypeError unless whole numbers
    without nulls (pandas writes integer columns as floats at times)."""
    values = col.to_numpy()
    whole = values.dtype.kind in "iu" or (
        np.issubdtype(values.dtype, np.floating) and bool(np.isfinite(values).all())
        and bool((values == np.round(values)).all()))
    if col.null_count or not whole:
        raise TypeError(f"column {name!r} must hold whole numbers without nulls; it has type {col.type} and "
                        f"{col.null_count} null(s)")
    # int64 holds every index; larger ones would wrap (two episodes merged into one, or negative)
    if len(values) and (values.max() >= 2**63 or values.min() < -2**63):
        raise TypeError(f"column {name!r} holds values from {values.min()} to {values.max()}, beyond a 64-bit index")
    return values.astype(np.int64, copy=False)  # never written to


# Parquet's run-length and dictionary encodings keep a constant column in a few bytes however
# long it is, so no ratio bounds what a file decodes to. Past the floor, a file declaring
# values of more than this many times its size is refused before anything is decoded: a
# recording's timestamps and sensors do not compress that far, while a few hundred kB of
# constants declaring 800 MB of frames took 4.5 GB to read.
_PARQUET_MAX_EXPANSION = 1024
_PARQUET_DECODED_FLOOR = 256 << 20
_PARQUET_WIDTHS = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8}


def _source_size(src: Any) -> int:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return len(src)
    if isinstance(src, str):
        return os.path.getsize(src)
    at = src.tell()
    size = src.seek(0, io.SEEK_END)
    src.seek(at)
    return size


def _check_parquet_declared_size(metadata: Any, file_size: int) -> None:
    """Raise UnreadableFile when the file's column chunks declare far more values than it can
    plausibly hold (see _PARQUET_MAX_EXPANSION)."""
    declared = 0
    for i in range(metadata.num_row_groups):
        group = metadata.row_group(i)
        for j in range(group.num_columns):
            chunk = group.column(j)
            width = _PARQUET_WIDTHS.get(chunk.physical_type)
            if chunk.physical_type == "FIXED_LEN_BYTE_ARRAY":
                width = metadata.schema.column(j).length
            # byte arrays: their encoded size at least
            declared += chunk.num_values * width if width else chunk.total_uncompressed_size
    if declared > max(_PARQUET_DECODED_FLOOR, _PARQUET_MAX_EXPANSION * file_size):
        raise UnreadableFile(f"its columns declare {declared} bytes of values in a file of {file_size} bytes: "
                             "a corrupt or crafted file (no recording compresses that far); not decoded")


def read_lerobot(src: Any, spec: SourceSpec, source: str, robot: str) -> list[Outcome]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # the bytes are local (a path, mapped, or a buffer): coalescing reads ahead only costs here;
        # pages written with CRCs are checked (a flipped bit in a data page changes values silently)
        pf = pq.ParquetFile(pa.BufferReader(src) if isinstance(src, bytes) else src, memory_map=isinstance(src, str),
                            pre_buffer=False, page_checksum_verification=True)
        columns_in_order = pf.schema_arrow.names
        names = set(columns_in_order)
        _check_parquet_declared_size(pf.metadata, _source_size(src))
    except (pa.ArrowException, ValueError, OSError) as exc:
        _reraise_io(exc)
        raise UnreadableFile(f"not a readable parquet file: {exc}") from None
    time_key = spec.time_key or next((k for k in TIME_KEYS if k in names), "")
    wanted = [c for c in ("episode_index", "frame_index") if c in names]
    if time_key in names:
        wanted.append(time_key)
    wanted += [s for s in spec.streams if s in names and s not in wanted]
    try:
        table = pf.read(columns=wanted, use_threads=False)
    except (pa.ArrowException, ValueError, OSError) as exc:
        _reraise_io(exc)
        raise UnreadableFile(f"cannot read parquet columns: {exc}") from None
    n = table.num_rows
    try:
        ep = _index_column(table.column("episode_index"), "episode_index") if "episode_index" in names else \
            np.zeros(n, dtype=np.int64)
        frame = _index_column(table.column("frame_index"), "frame_index") if "frame_index" in names else \
            np.arange(n, dtype=np.int64)
    except TypeError as exc:
        return [Quarantined(source, "", SHAPE_MISMATCH, str(exc))]
    order = None
    # rows already in (episode, frame) order, as written, need no sort: the sort is stable,
    # so it would leave them where they are
    if not ((ep[1:] > ep[:-1]) | ((ep[1:] == ep[:-1]) & (frame[1:] >= frame[:-1]))).all():
        order = np.lexsort((frame, ep))  # stable: rows in file order within equal keys
    columns: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray] | None] = {}
    for s in spec.streams:
        if s not in names:
            columns[s] = None
            continue
        try:
            columns[s] = _list_column(table.column(s), s)
        except TypeError as exc:
            return [Quarantined(source, "", SHAPE_MISMATCH, str(exc))]
    times_all = None
    if time_key in names:
        tcol = table.column(time_key)
        ttype = tcol.type
        value_type = getattr(ttype, "value_type", ttype)
        if pa.types.is_temporal(value_type):
            unit = getattr(value_type, "unit", "")
            return [Quarantined(source, "", MISSING_TIME, f"column {time_key!r} has type {ttype}, not seconds: "
                                "convert it to float seconds" + (f" (or cast it to int64 and set "
                                f"preprocessing.config.timeUnit: {unit})" if unit in ("ms", "us", "ns") else ""))]
        if pa.types.is_integer(ttype) and spec.time_unit != "s" and not tcol.null_count:
            times_all = tcol.to_numpy()  # as integers: float64 would round ns epochs to 256 ns
        else:
            try:
                tv, _, _ = _list_column(tcol, time_key)  # nulls are NaN: caught as non-finite
            except TypeError as exc:
                return [Quarantined(source, "", SHAPE_MISMATCH, str(exc))]
            if tv.shape[1] != 1:
                return [Quarantined(source, "", SHAPE_MISMATCH,
                                    f"time column {time_key!r} holds {tv.shape[1]} values per row, not one")]
            if pa.types.is_boolean(value_type):  # as npz and HDF5 name them
                return [Quarantined(source, "", SHAPE_MISMATCH, f"timestamps have non-numeric dtype bool (column "
                                                                 f"{time_key!r})")]
            if pa.types.is_integer(value_type) and spec.time_unit == "s":
                return [Quarantined(source, "", MISSING_TIME, integer_times_detail(ttype))]
            times_all = tv[:, 0]
    if order is not None:
        ep, frame = ep[order], frame[order]
        times_all = times_all[order] if times_all is not None else None
        columns = {s: (None if c is None else tuple(None if m is None else m[order] for m in c))
                   for s, c in columns.items()}
    rate = spec.rate_hz
    bounds = np.flatnonzero(np.diff(ep)) + 1
    starts = np.concatenate([[0], bounds]).astype(np.int64) if n else np.array([], dtype=np.int64)
    ends = np.concatenate([bounds, [n]]).astype(np.int64) if n else np.array([], dtype=np.int64)
    if "frame_index" not in names:  # rows in file order are the frames
        frame = np.arange(n, dtype=np.int64) - np.repeat(starts, ends - starts)
    out: list[Outcome] = []
    for a, b in zip(starts.tolist(), ends.tolist()):
        episode = str(int(ep[a]))
        streams: dict[str, np.ndarray | None] = {}
        problem = None
        for s in spec.streams:
            c = columns[s]
            if c is None:
                streams[s] = None
                continue
            vals, null, widths = c
            d = vals.shape[1]
            if widths is not None:
                rows = widths[a:b]
                held = np.flatnonzero(rows >= 0)
                d = int(rows[held[0]]) if held.size else 0
                ragged = held[rows[held] != d]
                if ragged.size:
                    i = int(ragged[0])
                    problem = Quarantined(source, episode, SHAPE_MISMATCH, f"{s!r} has {int(rows[i])} values at frame "
                                          f"{int(frame[a + i])}, {d} at frame {int(frame[a + held[0]])}")
                    break
            if null is not None and null[a:b].any():
                i = int(np.flatnonzero(null[a:b])[0])
                problem = Quarantined(source, episode, NON_FINITE, f"{s!r} is null at frame {int(frame[a + i])}")
                break
            streams[s] = vals[a:b, :d]
        if problem is not None:
            out.append(problem)
            continue
        times = None
        if times_all is not None:
            times = times_all[a:b]
        elif rate and not spec.time_key:  # a configured time column that is missing is quarantined
            times = frame[a:b].astype(np.float64) / rate
            if spec.time_unit != "s":  # make_episode reads times in the timeUnit
                times = times * UNIT_PER_SECOND[spec.time_unit]
        out.append(make_episode(spec, source, episode, spec.robot_for(robot), times, None, streams,
                                lambda: columns_in_order))
    return out


# --------------------------------------------------------------------------- HDF5


def _attr_rate(attrs: Any) -> float | None:
    """The first recorded rate among ``attrs`` (HDF5 attributes, env kwargs, npz members)
    that is a positive finite number; None when there is none."""
    for key in RATE_ATTRS:
        if key in attrs:
            try:
                value = np.asarray(attrs[key])
            except (TypeError, ValueError):
                continue
            # only numbers: True would pass as 1 Hz and the string "50" as 50 Hz
            if value.dtype.kind not in "iuf" or not value.size:
                continue
            rate = float(value.reshape(-1)[0])
            if np.isfinite(rate) and rate > 0:
                return rate
    return None


def _env_args(attrs: Any) -> dict[str, Any]:
    raw = attrs.get("env_args")
    if raw is None:
        return {}
    try:
        doc = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _robot_name(value: Any) -> str:
    """A robot label from metadata: a string or bytes, the first of an array or list, or a
    dict's ``name`` (robomimic's ``robots=[{'name': 'Panda'}]``); '' for anything else."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size and value.dtype.kind in "USO" else None
    elif isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("name")
    if isinstance(value, bytes):  # also numpy's bytes_
        value = value.decode("utf-8", "backslashreplace")
    return value.strip() if isinstance(value, str) else ""


def _natural_key(name: str) -> tuple:
    # isdecimal, what \d matches: isdigit also takes "²", which int() refuses
    return tuple(int(p) if p.isdecimal() else p for p in re.split(r"(\d+)", name))


# numpy dtypes met in HDF5 files and the memory types h5py reads them as, see `_h5_dataset`
_H5_PLAIN_TYPES: list[tuple[Any, np.dtype]] = []


def _h5_plain_dtype(obj: Any) -> np.dtype | None:
    """The numpy dtype of dataset ``obj`` when its file type is exactly the memory type h5py
    reads that dtype as (a plain number, stored as it lies in memory), else None. Telling a
    known type costs a few microseconds; h5py's conversion to a dtype, several times that."""
    import h5py

    tid = obj.get_type()
    for memory_type, dtype in _H5_PLAIN_TYPES:
        if tid == memory_type:
            return dtype
    dtype = obj.dtype
    if dtype.kind not in "biuf" or dtype.metadata:
        return None
    memory_type = h5py.h5t.py_create(dtype)
    if tid != memory_type:
        return None
    if len(_H5_PLAIN_TYPES) < 32:
        _H5_PLAIN_TYPES.append((memory_type, dtype))
    return dtype


@contextlib.contextmanager
def _raw_fd(src: Any) -> Iterator[int | None]:
    """A descriptor of the file at path ``src`` for `_h5_dataset`'s direct reads; None
    for bytes, a file object, or a file that will not open (HDF5 then reads alone)."""
    fd = None
    if isinstance(src, str):
        try:
            fd = os.open(src, os.O_RDONLY)
        except OSError:
            pass
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


_H5_SOFT_LINKS = 16  # soft links followed in one lookup at most, as HDF5 itself allows


def _h5_open(group: Any, name: bytes, budget: list[int] | None = None) -> Any:
    """The object linked as ``name`` from the low-level ``group``, which must lie in the
    same file: a downloaded file must not make the reader open other files of the machine
    it runs on (an external link, also one reached through a soft link; opening a named
    pipe would even hang). Links are checked before they are followed: soft links are
    resolved here, one component at a time, with one budget for the whole lookup (links
    to links would otherwise multiply the work)."""
    import h5py

    budget = [_H5_SOFT_LINKS] if budget is None else budget
    shown = name.decode("utf-8", "backslashreplace")
    kind = group.links.get_info(name).type
    if kind == h5py.h5l.TYPE_SOFT:
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError(f"{shown!r}: more than {_H5_SOFT_LINKS} soft links to follow")
        target = group.links.get_val(name)
        obj = h5py.h5o.open(group, b"/") if target.startswith(b"/") else group
        for part in (p for p in target.split(b"/") if p and p != b"."):
            if not isinstance(obj, h5py.h5g.GroupID) or not obj.links.exists(part):
                raise KeyError(f"{shown!r} is a soft link to {target.decode('utf-8', 'backslashreplace')!r}, "
                               "which does not exist")
            obj = _h5_open(obj, part, budget)
        return obj
    if kind != h5py.h5l.TYPE_HARD:
        raise ValueError(f"{shown!r} links to another file, which is not followed: copy its data into this file")
    obj = h5py.h5o.open(group, name)
    if obj.fileno != group.fileno:  # cannot happen through a hard link; never read another file regardless
        raise ValueError(f"{shown!r} lies in another file, which is not read")
    return obj


# What compression may shrink a dataset by: deflate's ceiling is 1032x (constant values in
# large chunks come close), with room to spare for other filters. A dataset declaring more
# than its stored bytes times this holds chunks never written: reading would allocate the
# declared size (terabytes, from a header) and fill it with the fill value.
_H5_MAX_EXPANSION = 4096
# HDF5 inflates a whole chunk to read any row of it: a chunk far larger than its dataset (50
# rows in a chunk of 100M) costs gigabytes of memory for kilobytes of data
_H5_MAX_CHUNK_BYTES = 64 << 20
_H5_MAX_CHUNK_OVER_DATA = 8


def _h5_dataset(group: Any, path: str, fd: int | None = None, file_size: int | None = None) -> np.ndarray | None:
    """The dataset at ``path`` below the low-level ``group`` id, read whole; None when
    there is none (absent, or a group). h5py's high-level objects cost ~0.1 ms per call
    under one global lock, which made them most of the work per demo; link lookups one
    component at a time are the cheapest way to tell an absent path.

    ``fd``: the HDF5 file, open for reading. A contiguous dataset (allocated, not external)
    stored in the very type it is read as holds its values as they lie in memory: its
    bytes are read with one ``preadv``, a fraction of what HDF5 spends on a read. Anything
    else (chunked, compressed, compact, converted on reading, a short read) is read by HDF5.

    Nothing is allocated beyond what the file (of ``file_size`` bytes; asked when None) can
    hold: a dataset declaring more (never written, or a corrupt header) raises ValueError."""
    import h5py

    obj = group
    parts = [p for p in path.encode().split(b"/") if p]
    for part in parts:
        if not isinstance(obj, h5py.h5g.GroupID) or not obj.links.exists(part):
            return None
        obj = _h5_open(obj, part)
    if not parts or not isinstance(obj, h5py.h5d.DatasetID):
        return None
    shape = obj.shape  # each property call asks HDF5 again
    if shape is None:  # a null dataspace (h5py.Empty): no values, an empty dataset
        return np.empty(0, dtype=obj.dtype)
    plain = _h5_plain_dtype(obj) if fd is not None else None
    dtype = obj.dtype if plain is None else plain
    count = math.prod(shape)
    if not count:
        return np.empty(shape, dtype=dtype)
    stored = obj.get_storage_size()
    if file_size is None:
        file_size = h5py.h5i.get_file_id(obj).get_filesize()
    if plain is not None:
        offset = obj.get_offset()  # None unless contiguous, allocated and in the file itself
        nbytes = count * dtype.itemsize
        # the size test also catches the offset HDF5 gives an unallocated dataset in a
        # file with a user block (the block's size - 1)
        if offset is not None and stored == nbytes and offset + nbytes <= file_size:
            out = np.empty(shape, dtype=dtype)
            if os.preadv(fd, [out.reshape(-1).view(np.uint8)], offset) == nbytes:
                return out
    dcpl = obj.get_create_plist()
    if dcpl.get_external_count() or dcpl.get_layout() == h5py.h5d.VIRTUAL:
        raise ValueError(f"{path!r} keeps its values in other files (external or virtual storage), which "
                         "are not read: store them in the file itself")
    # contiguous, compact or unfiltered chunks hold every byte they declare; compressed ones
    # at most the expansion cap times theirs; none more than the file
    declared = count * obj.get_type().get_size()
    room = min(stored, file_size) * (_H5_MAX_EXPANSION if dcpl.get_nfilters() else 1)
    if declared > room:
        raise ValueError(f"{path!r} declares shape {shape} ({declared} bytes) but the file stores {stored} bytes "
                         "of it: never written (fill values only), or a corrupt header")
    if dcpl.get_layout() == h5py.h5d.CHUNKED:
        chunk = dcpl.get_chunk()
        chunk_bytes = math.prod(chunk) * obj.get_type().get_size()
        if chunk_bytes > max(_H5_MAX_CHUNK_BYTES, _H5_MAX_CHUNK_OVER_DATA * declared):
            raise ValueError(f"{path!r} is stored in chunks of {chunk_bytes} bytes for {declared} bytes of data: "
                             "each read would inflate a whole chunk (rechunk it, e.g. with h5repack)")
        # chunks never written read as fill values (a recorder that died after growing the
        # dataset); compression or chunk padding hides them from the size test above. Counted
        # rather than asked (H5Dget_space_status): HDF5 before 1.10.9 calls every filtered
        # dataset partly allocated
        expected = math.prod(-(-n // c) for n, c in zip(shape, chunk))
        if obj.get_num_chunks() < expected:
            raise ValueError(f"{path!r} has chunks that were never written (they would read as fill values): a "
                             "recording cut short, or a corrupt file")
    out = np.empty(shape, dtype=dtype)
    if not shape:  # a scalar
        obj.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
        return out
    rows = _h5_rows_per_read(shape, dcpl.get_chunk()) if dcpl.get_layout() == h5py.h5d.CHUNKED else shape[0]
    for r0 in range(0, shape[0], rows):
        _h5_read_rows(obj, out, r0, min(shape[0], r0 + rows))
    return out


# chunks one read may span: HDF5 keeps some 4 kB of state per chunk a read touches, and a
# recorder writing one step at a time leaves a chunk per row (400k rows took 1.6 GB at once)
_H5_CHUNKS_PER_READ = 4096


def _h5_rows_per_read(shape: tuple[int, ...], chunk: tuple[int, ...]) -> int:
    across = math.prod(-(-n // c) for n, c in zip(shape[1:], chunk[1:]))
    return chunk[0] * max(1, _H5_CHUNKS_PER_READ // max(1, across))


def _h5_read_rows(obj: Any, out: np.ndarray, r0: int, r1: int) -> None:
    """Rows [r0, r1) of dataset ``obj`` into the same rows of ``out``."""
    import h5py

    if r0 == 0 and r1 == out.shape[0]:
        obj.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
        return
    block = out[r0:r1]  # rows of a C-ordered array: contiguous
    space = obj.get_space()
    space.select_hyperslab((r0,) + (0,) * (out.ndim - 1), block.shape)
    obj.read(h5py.h5s.create_simple(block.shape), space, block)


def _h5_num_samples(demo: Any) -> int | None:
    """A demo group's integer ``num_samples`` attribute (robomimic's frame count), or None."""
    import h5py

    if not h5py.h5a.exists(demo, b"num_samples"):
        return None
    attr = h5py.h5a.open(demo, b"num_samples")  # low level: h5py.Group(...).attrs costs ~0.1 ms
    if attr.shape not in ((), (1,)) or attr.dtype.kind not in "iu":
        return None
    value = np.empty(attr.shape, dtype=attr.dtype)
    attr.read(value)
    return int(value.reshape(-1)[0])


def read_robomimic(src: Any, spec: SourceSpec, source: str, robot: str) -> list[Outcome]:
    import h5py

    try:
        fh = h5py.File(io.BytesIO(src) if isinstance(src, bytes) else src, "r")
    except (OSError, ValueError) as exc:
        _reraise_io(exc)
        raise UnreadableFile(f"not a readable HDF5 file: {exc}") from None
    with fh, _raw_fd(src) as fd:
        if not fh.id.links.exists(b"data"):
            raise UnreadableFile("no 'data' group (expected robomimic layout data/demo_N/...)")
        try:
            data_id = _h5_open(fh.id, b"data")
        except (KeyError, ValueError) as exc:  # also a dangling link
            _reraise_io(exc)
            raise UnreadableFile(f"cannot open 'data': {exc}") from None
        if not isinstance(data_id, h5py.h5g.GroupID):
            raise UnreadableFile("'data' is not a group (expected robomimic layout data/demo_N/...)")
        data = h5py.Group(data_id)
        try:
            env_args = _env_args(data.attrs)
            kwargs = env_args.get("env_kwargs") if isinstance(env_args.get("env_kwargs"), dict) else {}
            file_rate = _attr_rate(data.attrs) or _attr_rate(kwargs)
            file_robot = _robot_name(data.attrs.get("robot")) or _robot_name(kwargs.get("robots"))
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  optional metadata: a corrupt attribute costs it, not the demos
            _reraise_io(exc)
            log.warning("%s: the attributes of 'data' are unreadable (%s: %s); read without its rate and robot",
                        source, type(exc).__name__, exc)
            file_rate, file_robot = None, ""
        file_robot = spec.robot_for(file_robot or robot)
        file_size = fh.id.get_filesize()
        seen: dict[tuple[int, int], str] = {}  # demos by object: a link to a demo already read
        out: list[Outcome] = []
        # h5py hands a member name that is not valid UTF-8 over as bytes: labelled escaped, opened as is
        members = [(n.decode("utf-8", "backslashreplace"), n) if isinstance(n, bytes) else (n, n.encode())
                   for n in data.keys()]
        if spec.filter_key:
            wanted = _h5_mask(fh.id, spec.filter_key, fd, file_size)
            members = [m for m in members if m[1] in wanted]
            if not members:
                listed = sorted((n.decode("utf-8", "backslashreplace") for n in wanted), key=_natural_key)
                raise UnreadableFile(f"mask/{spec.filter_key} (the filterKey) lists none of the demos in 'data' (it "
                                     f"lists: {_first_names(listed)})")
        for name, raw_name in sorted(members, key=lambda m: _natural_key(m[0])):
            try:
                demo = _h5_open(data.id, raw_name)
                if not isinstance(demo, h5py.h5g.GroupID):
                    continue
                info = h5py.h5o.get_info(demo)
                first = seen.setdefault((info.fileno, info.addr), name)
                if first != name:
                    out.append(Quarantined(source, name, DUPLICATE, f"{name} is {first} (a link to it): read once"))
                    continue
                streams = {s: _h5_dataset(demo, s, fd, file_size) for s in spec.streams}
                # robomimic records each demo's frame count: rows beyond it are padding, not frames
                num_samples = _h5_num_samples(demo)
                padded = next(((s, x.shape[0]) for s, x in streams.items() if num_samples is not None
                               and x is not None and x.ndim and x.shape[0] != num_samples), None)
                if padded is not None:
                    out.append(Quarantined(source, name, SHAPE_MISMATCH, f"stream {padded[0]!r} has {padded[1]} "
                                                                         f"samples but num_samples is {num_samples}"))
                    continue
                times = None
                for k in spec.time_keys:
                    times = _h5_dataset(demo, k, fd, file_size)
                    if times is not None:
                        break
                rate = None
                if times is None:
                    rate = _attr_rate(h5py.Group(demo).attrs) or file_rate or spec.rate_hz
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001  h5py raises many types for corrupt bytes: that demo is lost
                _reraise_io(exc)
                out.append(Quarantined(source, name, UNREADABLE, f"cannot read {name}: {type(exc).__name__}: {exc}"))
                continue
            out.append(make_episode(spec, source, name, file_robot, times, rate, streams, lambda: _h5_datasets(demo)))
        return out


def _first_names(names: list[str]) -> str:
    return (", ".join(names[:MAX_NAMES_SHOWN]) or "nothing") + (", ..." if len(names) > MAX_NAMES_SHOWN else "")


def _h5_mask(file_id: Any, filter_key: str, fd: int | None, file_size: int) -> set[bytes]:
    """The demo names robomimic's filter mask ``mask/<filter_key>`` lists, as stored (bytes):
    read as the streams are, within what the file holds and never from another file."""
    import h5py

    where = f"mask/{filter_key} (the filterKey)"
    try:
        names = _h5_dataset(file_id, f"mask/{filter_key}", fd, file_size)
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        _reraise_io(exc)
        raise UnreadableFile(f"cannot read {where}: {exc}") from None
    if names is None:
        masks: list[str] = []
        with contextlib.suppress(Exception):  # only a message: a corrupt mask group shows no masks
            group = _h5_open(file_id, b"mask")
            if isinstance(group, h5py.h5g.GroupID):
                masks = sorted(h5py.Group(group).keys(), key=_natural_key)
        raise UnreadableFile(f"no {where}; this file's masks: {_first_names(masks)}")
    if h5py.check_string_dtype(names.dtype) is None:
        raise UnreadableFile(f"{where} holds {names.dtype} values, not demo names")
    # fixed-length strings read as bytes, variable-length ones (low level) too
    return {n if isinstance(n, bytes) else str(n).encode() for n in names.reshape(-1)}


def _h5_datasets(demo: Any) -> list[str]:
    """The paths of the datasets below the low-level group ``demo`` (hard links only), the
    first few: for a missing stream's message."""
    import h5py

    found: list[str] = []

    def visit(name: str, obj: Any) -> bool | None:
        if isinstance(obj, h5py.Dataset):
            found.append(name)
        return len(found) > MAX_NAMES_SHOWN or None  # anything but None stops the visit

    with contextlib.suppress(Exception):  # only a message: a corrupt group shows what was found before
        h5py.Group(demo).visititems(visit)
    return found


# ---------------------------------------------------------------------------- npz


def read_npz(src: Any, spec: SourceSpec, source: str, robot: str) -> list[Outcome]:
    # the members read: streams, times, rates and the robot, at the top level or in an
    # episode group (`<episode>/<name>`)
    names = {*spec.streams, *spec.time_keys, *RATE_ATTRS, "robot"}
    try:
        arrays = load_npz(_contents(src), lambda key: key in names or key.partition("/")[2] in names)
    except (zipfile.BadZipFile, EOFError, ValueError, zlib.error, KeyError, OSError, NotImplementedError) as exc:
        _reraise_io(exc)
        raise UnreadableFile(f"not a readable npz file: {type(exc).__name__}: {exc}") from None
    time_keys = spec.time_keys
    # one episode when the streams or times sit at the top level; a top-level rate or robot
    # alone is the default of the ``<episode>/...`` groups beside it
    top_level = any(k in arrays for k in time_keys) or any(s in arrays for s in spec.streams)
    groups: dict[str, dict[str, Any]] = {}
    if top_level:
        # the groups' streams would be dropped unseen: neither layout is the file's for sure. A
        # prefix of a stream or time key's own name (obs/ of obs/joint_pos) is no episode group
        wanted = (*spec.streams, *time_keys)
        nested = sorted({group for group, _, rest in (k.partition("/") for k in arrays)
                         if rest in wanted and not any(w.startswith(group + "/") for w in wanted)}, key=_natural_key)
        if nested:
            raise UnreadableFile(f"holds streams both at the top level and in episode groups ({', '.join(nested[:5])}"
                                 f"{', ...' if len(nested) > 5 else ''}): store one episode per file or one "
                                 "group per episode")
    else:
        for k, v in arrays.items():
            if "/" in k:
                ep, rest = k.split("/", 1)
                groups.setdefault(ep, {})[rest] = v
    file_rate = _attr_rate(arrays)
    if not groups:
        if not top_level and file_rate is None:
            raise UnreadableFile(f"none of the streams {spec.streams} nor timestamps found; keys: {sorted(arrays)[:10]}")
        groups = {Path(source).stem: arrays}
    file_robot = _npz_robot(arrays) or robot
    out: list[Outcome] = []
    for episode in sorted(groups, key=_natural_key):
        g = groups[episode]
        time_key = next((k for k in time_keys if k in g), None)
        needed = [k for k in (*spec.streams, time_key) if k is not None and k in g]
        odd = next((k for k in needed if not isinstance(g[k], np.ndarray)), None)
        if odd is not None:
            what = "Python objects, which are never unpickled" if isinstance(g[odd], PickledMember) else "no array"
            out.append(Quarantined(source, episode, SHAPE_MISMATCH, f"{odd!r} holds {what}"))
            continue
        ep_robot = spec.robot_for(_npz_robot(g) or file_robot)
        rate = _attr_rate(g) or file_rate or spec.rate_hz
        times = g[time_key] if time_key is not None else None
        out.append(make_episode(spec, source, episode, ep_robot, times, rate, {s: g.get(s) for s in spec.streams},
                                lambda: list(g)))
    return out


def _npz_robot(arrays: Mapping[str, Any]) -> str:
    r = arrays.get("robot")
    return _robot_name(r) if isinstance(r, np.ndarray) else ""


# --------------------------------------------------------------------------- dispatch

READERS: dict[str, Callable[[Any, SourceSpec, str, str], list[Outcome]]] = {
    "lerobot": read_lerobot,
    "robomimic": read_robomimic,
    "npz": read_npz,
}


_STORAGE_ERRNOS = (errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ECONNRESET, errno.ENOSPC, errno.EACCES)
# HDF5 tells of a failed read(2) in its message only, whatever type h5py raises (RuntimeError,
# KeyError, OSError without an errno): "... (file read failed: time = ..., filename = '...',
# file descriptor = 3, errno = 5, error message = 'Input/output error', ...)"
# (matched whole: names that a file holds appear in messages too)
_HDF5_READ_ERRNO = re.compile(r"file read failed: time = [^,]*, filename = '.*?', file descriptor = -?\d+, "
                              r"errno = (\d+), error message = '", re.DOTALL)


def _reraise_io(exc: BaseException) -> None:
    """A real I/O error (EIO, ESTALE...) is the storage failing, not the file: retryable."""
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        raise exc
    failed_read = _HDF5_READ_ERRNO.search(str(exc))
    if failed_read and int(failed_read.group(1)) in _STORAGE_ERRNOS:
        code = int(failed_read.group(1))
        raise OSError(code, f"{os.strerror(code)} under HDF5: {exc}") from exc


# On an object store, files up to this size are read whole (one request); larger ones by
# ranges, of which a parser of scattered metadata makes many
RANGED_READ_ABOVE = 64 << 20
# Formats whose parsers would read a file in many small pieces, and the largest file read
# whole first instead (None: any): from a cold disk one large read is faster, and it can be
# prefetched. Other files (HDF5, large parquet) go to their parser as a file, on a local
# volume or read by ranges from an object store: it reads only the datasets asked for.
_READ_WHOLE = {"npz": None, "lerobot": RANGED_READ_ABOVE}
# formats whose decoders release the GIL: reading threads run them on several cores at once
PARALLEL_DECODERS = ("lerobot",)


def reads_whole(fmt: str, size: int | None) -> bool:
    """Whether `read_item` reads a file of ``fmt`` and ``size`` bytes whole."""
    return fmt in _READ_WHOLE and (size is None or size <= (_READ_WHOLE[fmt] or size))


def _contents(src: Any) -> bytes:
    """The bytes of a reader's source: a path, bytes, or a binary file object."""
    if isinstance(src, bytes):
        return src
    if isinstance(src, str):
        with open(src, "rb") as fh:
            return fh.read()
    return src.read()


def _parse(reader: Callable[..., list[Outcome]], *args: Any) -> list[Outcome]:
    return reader(*args)


def _parse_naming(key: str) -> Callable[..., list[Outcome]]:
    """`_parse` in a frame whose file name is ``<parsing KEY>``: the stacks the wedge watchdog
    prints (`trajflow.cli.watch_for_a_wedged_interpreter`) carry frames' file names only, and
    this one says which raw file a native library hung on."""
    return types.FunctionType(_parse.__code__.replace(co_filename=f"<parsing {key}>"), globals())


def read_item(storage: Storage, key: str, expected_size: int | None, fmt: str, spec: SourceSpec,
              robot_hint: str = "", whole_allowed: bool = True) -> FileResult:
    """Read one raw file into episodes and quarantine entries. Raises only on storage
    failures. ``robot_hint``: the robot a dataset's metadata names (LeRobot meta/info.json),
    used when the file names none. ``whole_allowed`` False: the parser reads only what it
    asks for, from a local path or by ranges, however small the file (its wanted columns
    are a sliver of it)."""
    local = storage.local_path(key)
    known_size = expected_size is not None and expected_size >= 0
    whole = whole_allowed and known_size and reads_whole(fmt, expected_size)  # then no stat: one call less per file
    src: str | bytes | BinaryIO
    ranged: RangedFile | None = None
    try:
        if not whole:  # read in part, or of a size the manifest does not give
            if local is not None:  # the parser opens the path itself: only a regular file
                info = local.stat()
                check_regular(str(local), info.st_mode)
                src, size = str(local), info.st_size
            else:  # an object store: a large file by ranges, what the parser asks for
                size = expected_size if known_size else -1
                if not 0 <= size <= RANGED_READ_ABOVE:
                    info = storage.stat(key)
                    if info is None:
                        raise FileNotFoundError(key)
                    size = info.size
                if size > RANGED_READ_ABOVE or not whole_allowed:
                    src = ranged = RangedFile(storage, key, size)
            whole = whole_allowed and ((not known_size and reads_whole(fmt, size)) or
                                       (local is None and size <= RANGED_READ_ABOVE))
        if whole:
            src = storage.read_bytes(key)
            size = len(src)
    except FileNotFoundError:
        return FileResult(key, 0, [Quarantined(key, "", MISSING_FILE, "listed in the raw manifest but absent")])
    except OSError as exc:
        if local is None:
            raise
        _reraise_io(exc)
        return FileResult(key, 0, [Quarantined(key, "", UNREADABLE, f"cannot read the file: {exc}")])
    result = FileResult(key, size)
    if known_size and size != expected_size:
        result.outcomes.append(Quarantined(key, "", SIZE_MISMATCH,
                                           f"{size} bytes, the raw manifest says {expected_size} (truncated?)"))
        return result
    try:
        result.outcomes = _parse_naming(key)(READERS[fmt], src, spec, key, robot_hint)
    except UnreadableFile as exc:
        result.outcomes = [Quarantined(key, "", UNREADABLE, str(exc))]
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001  a parser tripping over malformed bytes: the file's fault, not the shard's
        _reraise_io(exc)
        result.outcomes = [Quarantined(key, "", UNREADABLE, f"cannot parse the file: {type(exc).__name__}: {exc}")]
    finally:
        if ranged is not None:
            ranged.close()
    if ranged is not None and ranged.error is not None:
        error, ranged.error = ranged.error, None
        raise error  # the store failed under the parser, which may have called it a bad file
    if not result.outcomes:  # neither written nor quarantined, it would be missing from every count
        result.outcomes = [Quarantined(key, "", UNREADABLE, f"no episodes in this {fmt} file")]
    return result
