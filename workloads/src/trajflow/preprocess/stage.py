"""The preprocessing stage: one raw shard in, one fixed-rate shard out.

    raw/_done/<shard>.json  ->  read + decode + validate (in file order)
                            ->  group by length, pack (pinned), copy to the device, resample
                            ->  copy back, reorder, spool
                            ->  resampled/<shard>.safetensors, <shard>.report.json,
                                resampled/_done/<shard>.json (last)

Reading, device work and writing overlap where a second thread gains more than it costs
in contention for the GIL: a thread pool reads ahead when files come over the network or
decode without the GIL (parquet), and a writer thread drains finished batches while the
GPU computes the next ones. Local npz and HDF5 files are read on the main thread, with
the page cache asked to fetch them ahead, and on the CPU batches are written as soon as
they are resampled. Output order is the raw
manifest's item order and, within a file, the episode order, whatever the batching, so a
shard's bytes depend only on its inputs and settings.

Bad trajectories never fail a shard by themselves: they are listed with a reason in the
report. Only when more than ``maxBadFraction`` of them are bad does the shard fail, with
PermanentError (exit 3, the chart fails that index). Storage failures are TransientError
(exit 4, retried).
"""
from __future__ import annotations

import hashlib
import json
import logging
import queue
import textwrap
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Collection, Iterator, NamedTuple, Sequence

import numpy as np

from trajflow import log as trajflow_log
from trajflow.config.preprocess import PreprocessConfig
from trajflow.errors import ConfigError, PermanentError, TrajflowError, TransientError
from trajflow.metrics import Pusher, StageMetrics, preprocess_metrics
from trajflow.download.verify import item_fingerprint, read_record
from trajflow.plan import INFO_FILE_SUFFIX, Item, read_plan_in_use, shard_item_docs
from trajflow.preprocess import readers
from trajflow.preprocess.readers import FileResult, Quarantined, RawEpisode, SourceSpec
from trajflow.preprocess.shards import (RESAMPLED_DIR, SHARD_SUFFIX, ShardWriter, report_key, settings_differences,
                                       settings_of, shard_key)
from trajflow.resources import cpu_budget, human_bytes, memory_limit, tmp_size_limit
from trajflow.storage import (
    LocalStorage,
    Storage,
    manifest_key,
    read_manifest,
    read_manifest_fields,
    remove_foreign_manifests,
    shard_name,
    update_manifest,
    write_manifest,
)
from trajflow.storage.base import STALE_UPLOAD_S
from trajflow.storage.manifest import clear_failure, record_failure
from trajflow.storage.wait import UpstreamFailures, storage_failure
from trajflow.threads import ordered_map

log = logging.getLogger(__name__)

# in pods, a line this often while a shard's files are read: a big shard takes minutes
PROGRESS_INTERVAL_S = 10.0
UPSAMPLING_WARN_FACTOR = 2.0  # a target rate this many times every episode's recorded rate is warned about
# bytes held while one episode of F frames of B bytes is resampled and written: the torch
# path's search takes about 57 bytes a frame whatever the width and its blend about one
# output (measured on rows of 10^7 frames, 1 to 64 columns), the writer a copy
SEARCH_BYTES_PER_FRAME = 64
# a pause is a gap this many times an episode's median step
PAUSE_STEPS = 10
# pauses are warned about when they fill at least this share of a shard's frames
PAUSE_WARN_SHARE = 0.1
INFO_WAIT_LOG_INTERVAL_S = 300.0  # how often a wait for another shard's dataset metadata says so

RAW_DIR = "raw"


@dataclass
class ShardSummary:
    shard: int
    skipped: bool = False
    key: str = ""
    episodes: int = 0
    frames: int = 0
    trajectories: int = 0  # episodes seen, good and bad (an unreadable file counts once)
    quarantined: dict[str, int] = field(default_factory=dict)
    ignored_files: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    resample_seconds: float = 0.0
    batches: int = 0
    device: str = ""
    backend: str = ""
    # a done shard kept though made with other settings: how they differ ("targetRateHz 50.0 -> 30.0")
    stale: list[str] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return sum(self.quarantined.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------ helpers


_END = object()  # the last item put in the writer's queue


# without a CPU limit a pod sees the whole node: past this many threads reading only queues for the disk
_MAX_DEFAULT_READERS = 16


def _default_read_workers(work: Sequence["_Work"], local: bool) -> int:
    """Reading threads (0: read on the main thread). Decoders that hold the GIL gain
    nothing from threads on local files (the page cache reads ahead) but contention."""
    cpus = cpu_budget()
    if 2 * sum(w.format in readers.PARALLEL_DECODERS for w in work) > len(work):
        return max(1, min(cpus, _MAX_DEFAULT_READERS))
    if local:
        return 0
    return max(1, min(cpus // 2, _MAX_DEFAULT_READERS))  # network waits overlap


def source_of(key: str) -> str:
    """``raw/<shard>/<source>/...`` -> ``<source>``."""
    parts = key.split("/")
    return parts[2] if len(parts) > 3 and parts[0] == RAW_DIR else ""


def raw_items(manifest: dict[str, Any], shard: int) -> list[tuple[str, int | None]]:
    """(key relative to the run root, expected size) of every item of a raw manifest."""
    prefix = f"{RAW_DIR}/{shard_name(shard)}/"
    out = []
    for entry in manifest.get("items", []):
        key = entry["key"] if isinstance(entry, dict) else str(entry)
        if not key.startswith(prefix):
            key = prefix + key.lstrip("/")  # a key relative to the shard's directory
        size = entry.get("size") if isinstance(entry, dict) else None
        out.append((key, int(size) if size is not None else None))
    return sorted(set(out))


def raw_items_digest(manifest: dict[str, Any]) -> str:
    """Identity of the data a raw manifest lists: its items' keys, sizes and checksums (not
    its plan or generation, which change without the data changing)."""
    digest = hashlib.sha256()
    entries = [e for e in manifest.get("items", []) if isinstance(e, dict)]
    for entry in sorted(entries, key=lambda e: str(e.get("key"))):
        digest.update(f"{entry.get('key')}\0{entry.get('size')}\0{entry.get('sha256')}\n".encode())
    return digest.hexdigest()


class DatasetInfo(NamedTuple):
    """What a LeRobot dataset's ``meta/info.json`` says about its files."""

    robot: str
    fps: float | None
    # frames carry image bytes (a feature of dtype image): its parquet files are read by the
    # wanted columns, not whole (a few KB of states beside megabytes of pictures)
    embeds_images: bool = False


NO_INFO = DatasetInfo("", None)


def _read_info(storage: Storage, key: str) -> DatasetInfo | None:
    try:
        doc = json.loads(storage.read_bytes(key))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        log.warning("ignoring %s: not JSON: %s", key, exc)
        return None
    if not isinstance(doc, dict):
        return None
    fps = doc.get("fps")
    features = doc.get("features")
    images = isinstance(features, dict) and any(isinstance(f, dict) and f.get("dtype") == "image"
                                                for f in features.values())
    return DatasetInfo(str(doc.get("robot_type") or ""), float(fps) if isinstance(fps, (int, float)) and fps > 0 else None,
                       images)


def _plan_parts(storage: Storage, wanted: Collection[str]) -> Iterator[tuple[int, list[Any]]]:
    """The download plan's parts that may hold the ``wanted`` item keys, one part at a time:
    those the plan's header names for them, or every part of a plan without that index
    (nothing when there is no readable plan: the datasets then go without their info file)."""
    plan = read_plan_in_use(storage)
    try:
        shards = int(plan["shards"]) if plan is not None else 0
        index = plan.get("info_files") if plan is not None else None
        parts = sorted({int(index[k]) for k in wanted if k in index}) if isinstance(index, dict) else range(shards)
    except (KeyError, TypeError, ValueError):
        return
    for j in parts:
        try:
            yield j, shard_item_docs(storage, plan, j)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("cannot read shard %d of the download plan (%s)", j, exc)


def _verified_for_plan(storage: Storage, key: str, item: dict[str, Any]) -> bool:
    """Whether ``key`` holds the plan entry ``item``: its verification record says so (a
    file that merely exists may be an earlier dataset's, left in the run root)."""
    record = read_record(storage, item["key"])
    return record is not None and record.location == key and \
        record.fingerprint == item_fingerprint(Item.from_json(item), gunzip=False)  # no .gz: info.json


def _done_download(storage: Storage, shard: int, shards: int, generation: str | None) -> dict[str, Any] | None:
    """Download shard ``shard``'s manifest once it is done for ``shards`` and ``generation``
    (when given), else None: polled by its fields, its items read only then."""

    def done(doc: dict[str, Any] | None) -> bool:
        return doc is not None and doc.get("shards") == shards and generation in (None, doc.get("generation"))

    try:
        if done(read_manifest_fields(storage, "download", shard)):
            doc = read_manifest(storage, "download", shard)
            return doc if done(doc) else None
    except ValueError:  # torn: its download pod writes it again
        pass
    return None


def _await_info(storage: Storage, key: str, item: dict[str, Any], shard: int, shards: int,
                generation: str | None, wait_s: float, deadline: float) -> bool:
    """Wait until ``key``, planned (as ``item``) in download shard ``shard``, is there, or
    that shard is done (for ``shards`` and ``generation``, when given): whether ``key`` is
    this download's then. TransientError (retried) at ``deadline`` (monotonic)."""
    delay, told = 1.0, None
    failures = UpstreamFailures(storage, "download", shards, generation)
    while not _verified_for_plan(storage, key, item):
        done = _done_download(storage, shard, shards, generation)
        if done is not None:
            return key in {entry.get("key") for entry in done.get("items") or [] if isinstance(entry, dict)}
        failures.poll([shard])
        left = deadline - time.monotonic()
        # a wait of hours holding a GPU: said at its start and every few minutes
        if left > 0 and (told is None or time.monotonic() - told >= INFO_WAIT_LOG_INTERVAL_S):
            log.info("waiting up to %.0fs more for download shard %s, which holds %s (its dataset's episodes take "
                     "their rate and robot from it)", left, shard_name(shard), key)
            told = time.monotonic()
        if left <= 0:
            raise TransientError(
                f"{storage.uri}/{key} is not downloaded yet: its dataset's episodes take their rate and robot from "
                f"it, and download shard {shard_name(shard)}, which holds it, is not done"
                + (f" after waiting {wait_s:.0f}s" if wait_s else " (`trajflow preprocess --wait` waits for it)")
                + (f"; {failures.explain([shard])}" if failures.explain([shard]) else ""))
        time.sleep(min(delay, left))
        delay = min(2 * delay, 30.0)
    return True


def dataset_hints(storage: Storage, keys: Sequence[str], shard: int, shards: int,
                  wait_s: float = 0.0, generation: str | None = None) -> dict[str, DatasetInfo]:
    """LeRobot datasets of this shard: dataset directory -> what its ``meta/info.json`` says.
    The plan spreads a dataset's files over shards, so the info file may sit in another
    shard's directory: the download plan says which, and the downloader's
    verification record that the file there is this plan's (an earlier dataset's may lie at
    the same path). Its episodes are read once it is there (up to ``wait_s``): without it,
    their rate and robot label would depend on download timing."""
    here = {k[: -len(INFO_FILE_SUFFIX) + 1]: k for k in keys if k.endswith(INFO_FILE_SUFFIX)}
    # the nearest `data` directory above a file is its dataset's (the dataset may sit in a folder named data)
    datasets = {k.rsplit("/data/", 1)[0] + "/" for k in keys if k.endswith(".parquet") and "/data/" in k}
    prefix = f"{RAW_DIR}/{shard_name(shard)}/"
    elsewhere: dict[str, str] = {}
    missing = sorted(d for d in datasets if d not in here and d.startswith(prefix))
    if missing:
        wanted = {d[len(prefix):] + INFO_FILE_SUFFIX[1:]: d for d in missing}
        deadline = time.monotonic() + wait_s  # one wait for all of them
        for j, items in _plan_parts(storage, wanted):
            for it in items:
                rel = it.get("key") if isinstance(it, dict) else None
                if rel in wanted:
                    key, directory = f"{RAW_DIR}/{shard_name(j)}/{rel}", wanted.pop(rel)
                    if _await_info(storage, key, it, j, shards, generation, wait_s, deadline):
                        elsewhere[directory] = key
            if not wanted:
                break
    hints = {}
    for directory in sorted(set(here) | datasets):
        key = here.get(directory) or elsewhere.get(directory)
        info = _read_info(storage, key) if key else None
        if info is not None:
            hints[directory] = info
        elif directory in datasets:
            log.info("no meta/info.json for %s: its episodes get the configured robot label and rate", directory)
    return hints


def _is_lerobot_metadata(key: str, fmt: str) -> bool:
    """A LeRobot dataset's ``meta/`` parquet files (v3.0: ``meta/episodes/...``,
    ``meta/tasks.parquet``) describe its episodes: they hold no frames. The nearest
    ``meta`` or ``data`` directory above the file decides, so a dataset that merely sits
    in a folder called ``meta`` (``meta/pusht/data/...``) is still read."""
    if fmt != "lerobot":
        return False
    nearest = [d for d in key.split("/")[3:-1] if d in ("meta", "data")]
    return bool(nearest) and nearest[-1] == "meta"


def _hint_for(key: str, hints: dict[str, DatasetInfo]) -> DatasetInfo:
    """The hint of the deepest dataset directory (keys end in '/') holding `key`: one
    lookup per directory level, not a scan of every dataset for every file."""
    end = len(key)
    while (end := key.rfind("/", 0, end)) > 0:
        hint = hints.get(key[: end + 1])
        if hint is not None:
            return hint
    return NO_INFO


def select_device(config: PreprocessConfig) -> Any:
    import torch

    if config.device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if config.device == "cuda":
        # a GPU node without a usable GPU: another pod (node) may do better, so retry
        raise TrajflowError(
            "preprocessing.config.device is cuda but no CUDA device is visible (check the pod's "
            "nvidia.com/gpu limit, runtimeClassName and the node's driver), or set device: auto/cpu"
        )
    return torch.device("cpu")


# ---------------------------------------------------------------- quarantine report


class QuarantineReport:
    """Every trajectory that did not make it into the shard, and why."""

    def __init__(self, shard: int):
        self.shard = shard
        self.entries: list[Quarantined] = []
        self.ignored: list[str] = []
        self._log = trajflow_log.Capped(log)

    def add(self, q: Quarantined) -> None:
        self.entries.append(q)
        # a warning: the data has a problem someone may need to fix (README's log search finds it)
        self._log.log(logging.WARNING, "quarantined trajectories", "quarantined %s%s: %s: %s", q.source,
                      f" episode {q.episode}" if q.episode else "", q.reason, q.detail)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(q.reason for q in self.entries).items()))

    def document(self, trajectories: int, written: int, max_bad_fraction: float) -> dict[str, Any]:
        bad = len(self.entries)
        return {
            "shard": self.shard,
            "raw_manifest": manifest_key("download", self.shard),
            "trajectories": trajectories,
            "written": written,
            "quarantined": bad,
            "bad_fraction": bad / trajectories if trajectories else 0.0,
            "max_bad_fraction": max_bad_fraction,
            "reasons": self.counts(),
            "entries": [q.to_json() for q in self.entries],
            "ignored_files": self.ignored,
        }


# ---------------------------------------------------------------- device + writer


@dataclass
class _Pending:
    """A launched batch: output on the host once ``done`` has fired."""

    episodes: list[RawEpisode]
    seqs: list[int]
    steps: list[int]
    out: Any  # [B, T_max, Dsum] host tensor
    done: Any = None  # torch.cuda.Event, None on the CPU
    timing: Any = None  # (start, end) cuda events, or seconds on the CPU
    work_bytes: int = 0


# raw bytes the page cache is asked to hold ahead of the reader (reclaimable memory)
_PREFETCH_BYTES = 64 << 20
# The shard's stream widths are those most of its first good episodes have: this many, or
# fewer once they hold _VOTE_BYTES, but never under _VOTE_MIN_EPISODES (two like the rest
# outvote one long odd episode read first). Constants, not settings: which episodes a shard
# keeps depends on its inputs alone, whatever the batching or memory settings of its pod.
_VOTE_EPISODES = 15
_VOTE_MIN_EPISODES = 3
_VOTE_BYTES = 256 << 20


class _OrderedWriter:
    """Drains finished batches into the ShardWriter in sequence order: on a thread of its
    own when they finish asynchronously on a GPU, else as they are put (on the CPU a batch
    is done when it is put, and a second thread would only contend for the GIL)."""

    def __init__(self, writer: ShardWriter, metrics: StageMetrics, dims: dict[str, int], depth: int,
                 started: float, threaded: bool):
        self.writer, self.metrics, self.dims = writer, metrics, dims
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        self.next_seq = 0
        self.ready: dict[int, tuple[RawEpisode, np.ndarray]] = {}
        self.resample_seconds = 0.0
        self.work_bytes = 0
        self.batches = 0
        self.started = started  # the shard's start (perf_counter): the throughput gauge's one definition
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True) if threaded else None
        if self.thread is not None:
            self.thread.start()

    def put(self, item: Any) -> None:
        if self.thread is None:
            self._drain(item)
            return
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Write every batch put so far; raises what the writer thread raised."""
        if self.thread is not None:
            self.put(_END)
            self.thread.join()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=60)

    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                try:
                    item = self.queue.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item is _END:
                    return
                self._drain(item)
        except BaseException as exc:  # handed to the main thread
            self.error = exc

    def _as_numpy(self, out: Any) -> np.ndarray:
        import torch

        if out.dtype == torch.bfloat16:
            return out.view(torch.int16).numpy().view(np.uint16)
        return out.numpy()

    def _drain(self, p: _Pending) -> None:
        if p.done is not None:
            p.done.synchronize()
            seconds = p.timing[0].elapsed_time(p.timing[1]) / 1000.0
        else:
            seconds = float(p.timing)
        self.metrics.resample_seconds.observe(seconds)
        self.resample_seconds += seconds
        self.work_bytes += p.work_bytes
        self.batches += 1
        if self.resample_seconds > 0:
            self.metrics.bandwidth.set(self.work_bytes / self.resample_seconds)
        out = self._as_numpy(p.out)
        for b, (ep, seq) in enumerate(zip(p.episodes, p.seqs)):
            self.ready[seq] = (ep, out[b, : p.steps[b]])
        while self.next_seq in self.ready:
            ep, frames = self.ready.pop(self.next_seq)
            cols, c = {}, 0
            for name, d in self.dims.items():
                cols[name] = frames[:, c:c + d]
                c += d
            self.writer.add(cols, source=ep.source, episode=ep.episode, robot=ep.robot,
                            original_rate_hz=ep.original_rate_hz, raw_length=ep.length, start_time=ep.start_time)
            self.next_seq += 1
            self.metrics.trajectories.inc()
        self.metrics.last_progress.set(time.time())
        _set_throughput(self.metrics, self.next_seq, time.perf_counter() - self.started)
        log.debug("batch %d written (%d episodes, %d frames in the shard)", self.batches, len(p.episodes),
                  self.writer.num_frames)


class _Resampler:
    """Packs batches, moves them to the device and launches the kernel."""

    def __init__(self, config: PreprocessConfig, device: Any):
        import torch

        from trajflow.preprocess.kernels import resolve_backend

        self.torch = torch
        self.config, self.device = config, device
        self.cuda = device.type == "cuda"
        self.backend = resolve_backend(config.backend, device)
        if self.backend == "triton" and not self.cuda:
            log.warning("backend triton on the CPU runs Triton's interpreter: correct but very slow")
        self.data_dtype = getattr(torch, config.dtype)
        # a GPU gets the shard dtype (half the bytes to copy); on the CPU nothing is copied, so
        # the raw values go in as float32 and the result is rounded to the shard dtype once
        self.pack_dtype = self.data_dtype if self.cuda else torch.float32
        self.time_dtype = getattr(torch, config.time_dtype)
        self.pin = self.cuda and config.pin_memory

    def costs(self, columns: int) -> tuple[int, int]:
        """Bytes moved per input sample (data and time) and per output frame, to weigh input
        padding against output padding."""
        size = lambda dtype: self.torch.empty((), dtype=dtype).element_size()  # noqa: E731
        return size(self.pack_dtype) * columns + size(self.time_dtype), size(self.data_dtype) * columns

    def steps(self, episodes: Sequence[RawEpisode]) -> list[int]:
        """Output frames per episode, as the kernels define them (`uniform_grid_steps`)."""
        from trajflow.preprocess.kernels import uniform_grid_steps

        spans = np.array([[0.0, ep.times[-1]] for ep in episodes], dtype=np.float64).reshape(-1, 2)
        rounding = self.torch.tensor([ep.time_rounding for ep in episodes], dtype=self.torch.float64)
        return uniform_grid_steps(self.torch.from_numpy(spans), self.config.target_rate_hz,
                                  time_rounding=rounding).tolist()

    def coarse_in_time_dtype(self, ep: RawEpisode) -> bool:
        """Whether the time dtype cannot keep two samples of `ep`, or two frames of its
        output grid, half a step apart: float32 times of a 333 Hz episode from about 4.5
        hours into it, or a 1 kHz grid from about 2.3 hours."""
        if self.time_dtype != self.torch.float32 or ep.length < 2:
            return False
        smallest = min(float(np.diff(ep.times).min()), 1 / self.config.target_rate_hz)
        return 2 * float(np.spacing(np.float32(ep.times[-1]))) > smallest

    def launch(self, episodes: list[RawEpisode], seqs: list[int], steps: list[int],
               float64_times: bool = False) -> _Pending:
        from trajflow.preprocess.batching import pack
        from trajflow.preprocess.kernels import UniformGrid, resample

        torch = self.torch
        hb = pack([ep.frames for ep in episodes], [ep.times for ep in episodes], steps, self.pack_dtype,
                   torch.float64 if float64_times else self.time_dtype, self.pin)
        grid = UniformGrid(start=0.0, rate_hz=self.config.target_rate_hz, num=max(steps))
        if not self.cuda:
            t0 = time.perf_counter()
            out = resample(hb.data, hb.times, grid, hb.lengths, backend=self.backend, check=False).to(self.data_dtype)
            seconds = time.perf_counter() - t0
            return _Pending(episodes, seqs, steps, out, None, seconds, hb.input_bytes + out.element_size() * out.numel())
        # all on the current stream: copies from pinned memory are asynchronous and the
        # pinned blocks are not reused before the copies that read them have finished
        data = hb.data.to(self.device, non_blocking=self.pin)
        times = hb.times.to(self.device, non_blocking=self.pin)
        lengths = hb.lengths.to(self.device, non_blocking=self.pin)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = resample(data, times, grid, lengths, backend=self.backend, check=False)
        end.record()
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=self.pin)
        host.copy_(out, non_blocking=self.pin)
        done = torch.cuda.Event()
        done.record()
        return _Pending(episodes, seqs, steps, host, done, (start, end), hb.input_bytes + out.element_size() * out.numel())


# ------------------------------------------------------------------------ the shard


def _widths(ep: RawEpisode) -> tuple[tuple[str, int], ...]:
    """An episode's stream widths, whatever the order of its streams."""
    return tuple(sorted(ep.dims.items()))


def _reorder_columns(ep: RawEpisode, dims: dict[str, int]) -> RawEpisode | None:
    """``ep`` with its columns in the shard's stream order, or None when the streams or
    their widths differ."""
    if ep.dims == dims:
        if list(ep.dims) != list(dims):
            offsets, c = {}, 0
            for name, d in ep.dims.items():
                offsets[name] = c
                c += d
            cols = np.concatenate([np.arange(offsets[n], offsets[n] + d) for n, d in dims.items()])
            ep.frames = np.ascontiguousarray(ep.frames[:, cols])
            ep.dims = dict(dims)
        return ep
    return None


@dataclass
class _Work:
    """One raw file to read."""

    key: str
    size: int | None
    format: str
    spec: SourceSpec
    robot_hint: str
    whole_allowed: bool = True  # False: read by the wanted columns only, never whole


def _read_whole(w: _Work) -> bool:
    """Whether the reader reads ``w`` whole, or by ranges (its wanted streams only)."""
    return w.whole_allowed and readers.reads_whole(w.format, w.size)


def _file_bytes(w: _Work) -> int:
    """The size of ``w``'s file, 1 MiB when it is unknown."""
    return w.size if w.size is not None and w.size >= 0 else 1 << 20


def _bytes_read_whole(w: _Work) -> int:
    """The bytes of ``w`` a reader holds at once: the file's when it is read whole; 0 for a
    file read by ranges, which holds its streams only."""
    return _file_bytes(w) if _read_whole(w) else 0


class _ReadAhead:
    """What a file read ahead of the batching holds, for `ordered_map`'s budget
    (readAheadMib). A file read whole holds its bytes while it is parsed. A file read in part
    (HDF5, large parquet) holds the episodes it yields, which only reading it tells: until a
    file of its format and source has yielded episodes its size stands for them, then the
    bytes those held per byte of file. Once read, a file holds its episodes until the
    batching takes them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._learned: dict[tuple[str, str], tuple[int, int]] = {}  # (format, source) -> (file bytes, held)

    def estimate(self, w: _Work) -> int:
        size = _file_bytes(w)
        if _read_whole(w):
            return size
        with self._lock:
            sizes, held = self._learned.get((w.format, source_of(w.key)), (0, 0))
        return int(size * held / sizes) if sizes else size

    def held(self, w: _Work, result: FileResult) -> int:
        episodes = sum(o.frames.nbytes + o.times.nbytes for o in result.outcomes if isinstance(o, RawEpisode))
        size = w.size if w.size is not None and w.size > 0 else result.size
        # a file lost whole or without episodes says nothing of what the next one yields
        if episodes and size > 0 and not _read_whole(w):
            kind = (w.format, source_of(w.key))
            with self._lock:
                sizes, held = self._learned.get(kind, (0, 0))
                self._learned[kind] = (sizes + size, held + episodes)
        return episodes


class ShardProcessor:
    """Preprocesses one shard; `run` is the whole stage for that shard."""

    def __init__(self, storage: Storage, shard: int, shards: int, config: PreprocessConfig,
                 metrics: StageMetrics | None = None, device: Any = None, wait_s: float = 0.0,
                 started: Callable[[], Any] | None = None, download_generation: str | None = None):
        self.storage, self.shard, self.shards, self.config = storage, shard, shards, config
        self.download_generation = download_generation  # the download the input must come from (None: any)
        self.wait_s = wait_s  # for download shards holding metadata this shard's datasets need
        # called once the metrics hold this run's start: a done shard's figures, or zeros and
        # the start time of work that begins (pushing earlier would report a reset or no start)
        self._started = started or (lambda: None)
        self.metrics = metrics or preprocess_metrics()
        for reason in readers.REASONS:  # every reason exported, at 0 until it happens
            self.metrics.quarantined.labels(reason=reason)
        self._device = device
        self.report = QuarantineReport(shard)
        self.summary = ShardSummary(shard=shard, key=shard_key(shard))
        # bytes of the trajectory files, and of those lost whole: an unreadable file counts as one
        # trajectory however many it held, so maxBadFraction also bounds the share of bytes lost
        self.file_bytes = self.lost_file_bytes = 0
        self.raw_digest = ""  # of the download manifest this shard is made from
        self.raw_generation: str | None = None  # the generation that download manifest records
        self.raw_sources: set[str] = set()  # the downloader sources of its items
        self.started = time.perf_counter()  # reset by run
        self.resample_bytes = 0  # bytes in and out of the resampling kernels
        self.memory_limit = memory_limit()
        # episodes with a pause (`_note_pause`) that resamples to more frames than they
        # have samples: (count, frames in those pauses, the widest: (frames, gap s, after s, "<source> episode <e>"))
        self.paused: tuple[int, int, tuple[int, float, float, str] | None] = (0, 0, None)
        self.float64_episodes = 0  # resampled with float64 times, timeDtype float32 being too coarse for them

    def run(self) -> ShardSummary:
        started = self.started = time.perf_counter()
        shard, summary = self.shard, self.summary
        try:
            existing = read_manifest(self.storage, "preprocess", shard)
        except ValueError as exc:  # a torn write: the shard is made again, as if never done
            log.warning("%s; shard %s is preprocessed again", exc, shard_name(shard))
            self.storage.delete(manifest_key("preprocess", shard))
            existing = None
        redo = ""
        if existing is not None and existing.get("shards") != self.shards:
            redo = f"was written for {existing.get('shards')} shards, this run has {self.shards}"
        elif existing is not None:
            redo = self._upstream_change(existing)
        if existing is not None and not redo:
            self._remove_foreign_manifests()
            summary.stale = self._warn_if_stale(existing)
            summary.skipped = True
            summary.episodes = int(existing.get("num_episodes", 0))
            summary.frames = int(existing.get("num_frames", 0))
            log.info("shard %s is already done (%s exists): skipping", shard_name(shard), manifest_key("preprocess", shard),
                     extra={"summary": summary.to_json()})
            self._restore_metrics(existing)
            self._started()
            return summary
        try:
            raw_manifest = read_manifest(self.storage, "download", shard)
        except ValueError as exc:
            raise TransientError(f"{exc}: rerun download shard {shard_name(shard)}, which replaces it") from None
        if raw_manifest is None:
            raise TransientError(
                f"download shard {shard_name(shard)} is not done ({self.storage.uri}/{manifest_key('download', shard)} "
                "does not exist): run `trajflow wait --stage download` first"
            )
        if raw_manifest.get("shards") != self.shards:  # the downloader has yet to redo it for this shard count
            raise TransientError(
                f"download shard {shard_name(shard)} was written for {raw_manifest.get('shards')} shards, this run has "
                f"{self.shards}: run `trajflow wait --stage download --expect-shards {self.shards}` first"
            )
        self._check_download_generation(raw_manifest)
        self.raw_digest = raw_items_digest(raw_manifest)
        self.raw_generation = raw_manifest.get("generation")
        self.raw_sources = {source_of(key) for key, _ in raw_items(raw_manifest, shard)}
        # only now is this run's shard count confirmed (a leftover pod of another count stops above)
        if redo:
            log.warning("shard %s %s: it is preprocessed again", shard_name(shard), redo)
            self.storage.delete(manifest_key("preprocess", shard))  # not done until redone
        self._remove_foreign_manifests()
        if isinstance(self.storage, LocalStorage):  # left by a killed run of this or another shard
            self.storage.remove_stale_temporaries("resampled")
        else:  # an object store's: a killed run's upload of this shard (shard 0: of shard numbers this count lacks)
            self.storage.abort_stale_uploads(f"{RESAMPLED_DIR}/", STALE_UPLOAD_S, self._own_upload)

        import torch

        resampler = _Resampler(self.config, torch.device(self._device or select_device(self.config)))
        summary.device, summary.backend = str(resampler.device), resampler.backend
        work = self._plan_work(raw_manifest)
        log.info("shard %s: %d trajectory file(s), %d other file(s) ignored; device %s, backend %s, dtype %s, %.6g Hz",
                 shard_name(shard), len(work), summary.ignored_files, resampler.device, resampler.backend,
                 self.config.dtype, self.config.target_rate_hz)
        self.metrics.start_time.set(time.time())
        self._started()
        threads = torch.get_num_threads()
        # also on a GPU, whose batches are packed (cast, padded) on the CPU: torch's default is
        # a thread per core of the node, however few of them the pod may use
        torch.set_num_threads(self.config.cpu_threads or cpu_budget())
        try:
            shard_file = self._pipeline(work, resampler)
            self._publish(shard_file, self.shards)
        except TrajflowError:
            raise
        except BaseException as exc:
            failure = storage_failure(exc, self.storage.uri, f"shard {shard_name(shard)}")
            if failure is None:
                raise
            raise failure from (None if isinstance(failure, ConfigError) else exc)
        finally:
            torch.set_num_threads(threads)
        summary.seconds = time.perf_counter() - started
        _set_throughput(self.metrics, summary.episodes, summary.seconds)
        self.metrics.last_progress.set(time.time())
        log.info("shard %s done: %d episodes, %d frames, %d quarantined%s, %.1f MB in, %.1f MB out, %.2fs "
                 "(%.2fs resampling in %d batches)", shard_name(shard), summary.episodes, summary.frames, summary.bad,
                 f" {summary.quarantined}" if summary.quarantined else "", summary.bytes_in / 1e6,
                 summary.bytes_out / 1e6, summary.seconds,
                 summary.resample_seconds, summary.batches, extra={"summary": summary.to_json()})
        return summary

    def _plan_work(self, raw_manifest: dict[str, Any]) -> list[_Work]:
        """The trajectory files of the shard, in key order, with their reading settings."""
        items = raw_items(raw_manifest, self.shard)
        hints = dataset_hints(self.storage, [k for k, _ in items], self.shard, self.shards, self.wait_s,
                              self.download_generation)
        specs: dict[str, SourceSpec] = {}
        work = []
        other_format: dict[tuple[str, str, str], list[str]] = {}  # (source, configured, found) -> keys
        for key, size in items:
            source = source_of(key)
            spec = specs.get(source) or specs.setdefault(source, SourceSpec.resolve(self.config, source))
            fmt = readers.detect_format(key, spec.format)
            if fmt is None or _is_lerobot_metadata(key, fmt):
                self.report.ignored.append(key)
                other = readers.detect_format(key, "auto")
                if fmt is None and other is not None and not _is_lerobot_metadata(key, other):
                    other_format.setdefault((source, spec.format, other), []).append(key)
                continue
            info = _hint_for(key, hints)
            if info.fps:  # the dataset's own rate (info.json), ahead of rateHz as HDF5 and npz rate attributes are
                spec = SourceSpec(**{**spec.__dict__, "rate_hz": info.fps})
            work.append(_Work(key, size, fmt, spec, info.robot, whole_allowed=not info.embeds_images))
        self.summary.ignored_files = len(self.report.ignored)
        if not work and items:
            log.warning("shard %s: none of its %d file(s) is a trajectory file preprocessing reads (e.g. %s): check "
                        "preprocessing.config.format (formats: lerobot parquet, robomimic HDF5, npz) and the sources",
                        shard_name(self.shard), len(items), items[0][0])
        for (source, configured, found), keys in sorted(other_format.items()):
            # not an error: a format setting may leave out part of a dataset on purpose
            log.warning("shard %s: %d %s file(s) of source %r left out, its format being %s (e.g. %s); set "
                        "preprocessing.config.format (or the source's format) to auto or %s to read them",
                        shard_name(self.shard), len(keys), found, source or "(root)", configured, keys[0], found)
        return work

    def _quarantine(self, q: Quarantined) -> None:
        self.report.add(q)
        self.metrics.quarantined.labels(reason=q.reason).inc()

    def _pipeline(self, work: list[_Work], resampler: "_Resampler") -> Any:
        """Read -> batch -> resample -> write; returns the written `ShardFile`."""
        cfg, summary = self.config, self.summary
        dims: dict[str, int] | None = None
        writer: ShardWriter | None = None
        drain: _OrderedWriter | None = None
        window: list[tuple[int, RawEpisode]] = []  # (sequence number in the shard, episode)
        window_bytes = 0
        seq = 0
        window_size, window_limit = cfg.batch_size * cfg.sort_window_batches, cfg.sort_window_mib << 20
        tmp_limit = tmp_size_limit()
        spill_limit = None if tmp_limit is None else int(tmp_limit * 0.9)  # HOME shares the directory

        def flush() -> None:
            from trajflow.preprocess.batching import plan_batches

            nonlocal window_bytes
            window_bytes = 0
            if not window:
                return
            eps = [ep for _, ep in window]
            steps = resampler.steps(eps)
            in_cost, out_cost = resampler.costs(eps[0].frames.shape[1])
            coarse = set()
            for i, (ep, frames) in enumerate(zip(eps, steps)):
                self._note_pause(ep)
                self._check_output_size(ep, frames, out_cost)
                if resampler.coarse_in_time_dtype(ep):
                    coarse.add(i)
            self.float64_episodes += len(coarse)
            # the batches are written in the episodes' order whichever group they are launched in
            fine = [i for i in range(len(eps)) if i not in coarse]
            for group, float64_times in ((fine, False), (sorted(coarse), True)):
                for batch in plan_batches([eps[i].length for i in group], [steps[i] for i in group], cfg.batch_size,
                                          cfg.max_padding_fraction, in_cost=in_cost, out_cost=out_cost):
                    assert drain is not None
                    rows = [group[j] for j in batch]
                    drain.put(resampler.launch([eps[i] for i in rows], [window[i][0] for i in rows],
                                               [steps[i] for i in rows], float64_times))
                    summary.batches += 1
            window.clear()

        undecided: list[RawEpisode] = []  # the good episodes read before the shard's stream widths are known
        undecided_bytes = 0
        # per source: the episodes of the shard's widths, and (count, widths) of those of others
        fitting: set[str] = set()
        misfits: dict[str, tuple[int, dict[str, int]]] = {}

        def open_writer() -> None:
            """Fix the shard's streams: the widths most of the first good episodes have, so
            that one odd episode read first is the one set aside."""
            nonlocal dims, writer, drain
            best = Counter(map(_widths, undecided)).most_common(1)[0][0]  # equal counts: the first seen
            dims = dict(next(ep.dims for ep in undecided if _widths(ep) == best))
            writer = ShardWriter(self.storage, shard_key(self.shard), dims, cfg.dtype, cfg.target_rate_hz,
                                 spool_bytes=cfg.spool_memory_mib << 20, spill_limit_bytes=spill_limit)
            drain = _OrderedWriter(writer, self.metrics, dims, cfg.prefetch + 1, self.started,
                                   threaded=resampler.cuda)
            for ep in undecided:
                admit(ep)
            undecided.clear()

        def admit(outcome: RawEpisode) -> None:
            nonlocal seq, window_bytes
            assert dims is not None
            ep = _reorder_columns(outcome, dims)
            source = source_of(outcome.source)
            if ep is None:
                n, widths = misfits.get(source, (0, outcome.dims))
                misfits[source] = (n + 1, widths)
                self._quarantine(Quarantined(outcome.source, outcome.episode, readers.SHAPE_MISMATCH,
                                             f"stream widths {outcome.dims} differ from the shard's {dims}, which "
                                             "most of its first episodes have"))
                return
            fitting.add(source)
            too_large = _beyond_dtype(ep, cfg.dtype)
            if too_large is not None:
                self._quarantine(too_large)
                return
            window.append((seq, ep))
            window_bytes += ep.frames.nbytes
            seq += 1
            if len(window) >= window_size or window_bytes >= window_limit:
                flush()

        def read(w: _Work) -> FileResult:
            return readers.read_item(self.storage, w.key, w.size, w.format, w.spec, robot_hint=w.robot_hint,
                                     whole_allowed=w.whole_allowed)

        sizes = {w.key: w.size for w in work}
        try:
            local = bool(work) and self.storage.local_path(work[0].key) is not None
            workers = cfg.read_workers or _default_read_workers(work, local)
            files_read = trajflow_log.progress(f"shard {shard_name(self.shard)}", total=len(work), unit="files",
                                               interval_s=PROGRESS_INTERVAL_S, logger=log)
            with files_read:
                ahead = _ReadAhead()
                for result in ordered_map(read, self._prefetching(work), workers, workers * 2 + cfg.prefetch,
                                          cost=ahead.estimate, budget=cfg.read_ahead_mib << 20, held=ahead.held,
                                          name="read"):
                    files_read.advance()
                    summary.bytes_in += result.size
                    self.metrics.bytes_in.inc(result.size)
                    size = sizes.get(result.key)
                    size = result.size if size is None or size < 0 else size  # a missing or cut file: the size it has
                    self.file_bytes += size
                    if any(isinstance(o, Quarantined) and not o.episode for o in result.outcomes):
                        self.lost_file_bytes += size
                    for outcome in result.outcomes:
                        summary.trajectories += 1
                        if isinstance(outcome, Quarantined):
                            self._quarantine(outcome)
                        elif dims is not None:
                            admit(outcome)
                        else:
                            undecided.append(outcome)
                            undecided_bytes += outcome.frames.nbytes
                            if len(undecided) >= _VOTE_EPISODES or (
                                    undecided_bytes >= _VOTE_BYTES and len(undecided) >= _VOTE_MIN_EPISODES):
                                open_writer()
            if dims is None and undecided:
                open_writer()
            summary.quarantined = self.report.counts()
            summary.episodes = seq
            self._check_whole_sources(misfits, fitting, dims or {})
            flush()
            if drain is not None:
                drain.finish()
                summary.resample_seconds = drain.resample_seconds
                self.resample_bytes = drain.work_bytes
            self._check_bad_fraction()
            if writer is None:  # not one good episode: an empty shard keeps the set of shards complete
                names = [cfg.renames.get(s, s) for s in cfg.streams]
                writer = ShardWriter(self.storage, shard_key(self.shard), {n: 0 for n in names}, cfg.dtype,
                                     cfg.target_rate_hz)
            self._check_download_unchanged()  # before the shard file replaces another pod's
            return writer.close()
        except BaseException:
            if drain is not None:
                drain.abandon()
            if writer is not None:
                writer.abort()
            raise

    def _prefetching(self, work: list[_Work]) -> Iterator[_Work]:
        """``work`` in order, with storage asked to fetch the files read whole up to
        `_PREFETCH_BYTES` ahead, so that the disk works while the CPU decodes. Files read
        in part (HDF5) are left alone: most of their bytes may never be needed."""

        def whole_bytes(w: _Work) -> int:  # 0: not prefetched (read in part, or larger than the window)
            size = _bytes_read_whole(w)
            return size if size <= _PREFETCH_BYTES else 0

        ahead, window = 0, 0
        for i, w in enumerate(work):
            while ahead < len(work) and (ahead <= i or window < _PREFETCH_BYTES):
                if whole_bytes(work[ahead]):
                    self.storage.prefetch(work[ahead].key)
                    window += whole_bytes(work[ahead])
                ahead += 1
            window -= whole_bytes(w)
            yield w

    def _report_bytes(self) -> bytes:
        s = self.summary
        doc = self.report.document(s.trajectories, s.episodes, self.config.max_bad_fraction)
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    def _publish(self, shard_file: Any, shards: int) -> None:
        """The report, then the manifest: the shard is done."""
        self._check_download_unchanged()
        summary, index = self.summary, shard_file.index
        self._warn_if_only_upsampled(index["episodes"])
        self._warn_if_single_frames(index["episodes"])
        self._warn_of_pauses(index["num_frames"])
        if self.float64_episodes:
            log.info("shard %s: %d episode(s) resampled with float64 times: they are too long for timeDtype float32 "
                     "to keep their samples, or output frames, apart", shard_name(self.shard), self.float64_episodes)
        report_raw = self._report_bytes()
        self.storage.write_bytes(report_key(self.shard), report_raw)
        summary.frames = index["num_frames"]
        summary.bytes_out = shard_file.size
        self.metrics.bytes_out.inc(shard_file.size)
        write_manifest(
            self.storage, "preprocess", self.shard, shards,
            [shard_file.item(),
             {"key": report_key(self.shard), "size": len(report_raw), "sha256": _sha256(report_raw), "kind": "report"}],
            rate_hz=index["rate_hz"], dtype=index["dtype"], streams=index["streams"],
            num_episodes=len(index["episodes"]), num_frames=index["num_frames"], episodes=index["episodes"],
            trajectories=summary.trajectories, quarantined=summary.bad, reasons=summary.quarantined,
            raw_manifest=manifest_key("download", self.shard), raw_digest=self.raw_digest,
            download_generation=self.raw_generation,
            bytes_in=summary.bytes_in, settings=self.config.output_settings(self.raw_sources),
            # for the gauges of a rerun that skips the shard
            seconds=time.perf_counter() - self.started, resample_seconds=summary.resample_seconds,
            resample_bytes=self.resample_bytes,
        )

    def _own_upload(self, key: str) -> bool:
        """Whether an upload to `key` is one this shard's pod cleans up after a killed run."""
        if key == shard_key(self.shard):
            return True
        number = key[len(RESAMPLED_DIR) + 1:].removesuffix(SHARD_SUFFIX)
        return self.shard == 0 and key.endswith(SHARD_SUFFIX) and number.isdecimal() and int(number) >= self.shards

    def _note_pause(self, ep: RawEpisode) -> None:
        """Count an episode whose widest gap, a pause, resamples to more frames than it has
        samples (`_warn_of_pauses`)."""
        gap = ep.widest_gap
        in_gap = int(gap * self.config.target_rate_hz)
        # (with two gaps or fewer there is no median step to tell a pause from the others by)
        if in_gap > ep.length and (ep.length < 4 or gap > PAUSE_STEPS * float(np.median(np.diff(ep.times)))):
            count, total, widest = self.paused
            if widest is None or in_gap > widest[0]:
                widest = (in_gap, gap, float(ep.times[ep.widest_step]), f"{ep.source} episode {ep.episode}")
            self.paused = (count + 1, total + in_gap, widest)

    def _check_output_size(self, ep: RawEpisode, frames: int, frame_bytes: int) -> None:
        """Fail the shard on an episode whose output (resampled and written whole) cannot fit
        in this pod's memory, naming what made it that large, instead of an allocator error
        retried to the same end."""
        need = frames * (2 * frame_bytes + SEARCH_BYTES_PER_FRAME)
        if self.memory_limit is None or need <= self.memory_limit:
            return
        raise PermanentError(
            f"shard {shard_name(self.shard)}: {ep.source} episode {ep.episode} resamples to {frames:,} frames at "
            f"targetRateHz {self.config.target_rate_hz:g} ({human_bytes(frames * frame_bytes)}): its {ep.length:,} "
            f"samples span {float(ep.times[-1]):.6g} s, the widest gap {ep.widest_gap:.6g} s after "
            f"{float(ep.times[ep.widest_step]):.6g} s. Resampling it needs about {human_bytes(need)}, more than the "
            f"{human_bytes(self.memory_limit)} this pod may use: lower targetRateHz, set maxGapSeconds to quarantine "
            "episodes with long pauses, or raise the memory limit"
        )

    def _warn_of_pauses(self, num_frames: int) -> None:
        """A pause between two samples is filled with a straight line: frames with nothing to
        learn, which can outnumber the shard's recorded ones."""
        count, total, widest = self.paused
        if widest is None or self.config.max_gap_seconds is not None or total < PAUSE_WARN_SHARE * num_frames:
            return
        frames, gap, after, episode = widest
        log.warning("shard %s: %d episode(s) have a pause between two samples that resampling fills with more "
                    "frames than they have samples, %.1f%% of the shard's frames (the widest: %.6g s after %.6g s "
                    "in %s, %s frames): set preprocessing.config.maxGapSeconds to quarantine such episodes",
                    shard_name(self.shard), count, 100 * total / max(num_frames, 1), gap, after, episode,
                    f"{frames:,}")

    def _warn_if_single_frames(self, episodes: list[dict[str, Any]]) -> None:
        """A target rate below an episode's span makes it one frame: nothing any training
        window spans, which training would only say once every shard is done."""
        single = sum(1 for e in episodes if int(e.get("length", 0)) < 2)
        if single:
            log.warning("shard %s: targetRateHz %g leaves %d of its %d episode(s) a single frame (their span is under "
                        "one output step of %.6g s)", shard_name(self.shard), self.config.target_rate_hz, single,
                        len(episodes), 1 / self.config.target_rate_hz)

    def _warn_if_only_upsampled(self, episodes: list[dict[str, Any]]) -> None:
        """A target rate far above every recorded one makes frames that are all interpolation:
        as many times the data to train on, and nothing more to learn from it."""
        recorded = max((float(e.get("original_rate_hz") or 0.0) for e in episodes), default=0.0)
        target = self.config.target_rate_hz
        if recorded > 0 and target > UPSAMPLING_WARN_FACTOR * recorded:
            log.warning("shard %s: targetRateHz %g is over %g times the highest rate its episodes were recorded at "
                        "(%g Hz): most of its frames are interpolated, which adds training time and no information",
                        shard_name(self.shard), target, UPSAMPLING_WARN_FACTOR, recorded)

    def _restore_metrics(self, manifest: dict[str, Any]) -> None:
        """A skipped shard pushes what its manifest records: its push replaces the shard's
        series in the Pushgateway, which must not drop to zeros on a rerun."""
        m = self.metrics
        m.start_time.set(time.time())
        m.trajectories.inc(int(manifest.get("num_episodes", 0)))
        for reason, count in (manifest.get("reasons") or {}).items():
            m.quarantined.labels(reason=reason).inc(int(count))
        m.bytes_in.inc(int(manifest.get("bytes_in", 0)))
        m.bytes_out.inc(sum(int(it.get("size", 0)) for it in manifest.get("items", []) if it.get("kind") == "shard"))
        # the gauges too (a manifest written before they were recorded leaves them at 0)
        _set_throughput(m, int(manifest.get("num_episodes", 0)), float(manifest.get("seconds") or 0.0))
        if float(manifest.get("resample_seconds") or 0.0) > 0:
            m.bandwidth.set(float(manifest.get("resample_bytes") or 0) / float(manifest["resample_seconds"]))

    def _check_whole_sources(self, misfits: dict[str, tuple[int, dict[str, int]]], fitting: set[str],
                             dims: dict[str, int]) -> None:
        """Fail the shard when no episode of a source (of two or more; a source's one episode is
        quarantined like any bad one) has the shard's stream widths: a whole source
        of other widths is another robot, not bad trajectories (whatever maxBadFraction says),
        and another shard may well have picked that source's widths, which training refuses
        only once every shard is done. `misfits`: per source, (count, widths) of its episodes of
        other widths; `fitting`: the sources with an episode of the shard's."""
        misfits = {s: m for s, m in misfits.items() if s not in fitting and m[0] >= 2}
        if not misfits:
            return
        self.storage.write_bytes(report_key(self.shard), self._report_bytes())  # kept to debug the data
        source, (count, widths) = sorted(misfits.items())[0]
        more = f" (and {len(misfits) - 1} more source(s))" if len(misfits) > 1 else ""
        raise PermanentError(
            f"shard {shard_name(self.shard)}: none of the {count} episode(s) of source {source or '(root)'!r}{more} "
            f"has the shard's stream widths {dims}: it has {widths}, another robot's data rather than bad "
            "trajectories (other shards may pick its widths); preprocess the sources separately (a global.runId "
            "each) or rename their streams (preprocessing.config.sources.<source>.renames) so that each output "
            f"stream has one width; see {self.storage.uri}/{report_key(self.shard)}"
        )

    def _check_bad_fraction(self) -> None:
        total, bad, limit = self.summary.trajectories, self.summary.bad, self.config.max_bad_fraction
        lost = self.lost_file_bytes / self.file_bytes if self.file_bytes else 0.0
        over = []
        if total and bad / total > limit:
            over.append(f"{bad} of {total} trajectories are bad ({bad / total:.1%})")
        if lost > limit:
            over.append(f"files lost whole hold {lost:.1%} of the trajectory bytes")
        if over:
            self.storage.write_bytes(report_key(self.shard), self._report_bytes())  # kept to debug the data
            top = ", ".join(f"{r}: {n}" for r, n in sorted(self.summary.quarantined.items(), key=lambda kv: -kv[1]))
            hint = ""
            if set(self.summary.quarantined) == {readers.MISSING_STREAM} and not self.summary.episodes:
                hint = " (no trajectory has the configured streams: check preprocessing.config.streams, renames, sources)"
            # the first few by name: the report may sit in a bucket the on-call cannot read
            first = "; ".join(f"{q.source}{f' episode {q.episode}' if q.episode else ''}: {q.reason}: "
                              f"{textwrap.shorten(q.detail, 160, placeholder=' ...')}" for q in self.report.entries[:3])
            raise PermanentError(
                f"shard {shard_name(self.shard)}: {' and '.join(over)} > maxBadFraction {limit:.1%} ({top}){hint}; "
                f"first: {first}; see {self.storage.uri}/{report_key(self.shard)}"
            )

    def _remove_foreign_manifests(self) -> None:
        """Shard 0 drops the manifests of shard numbers this count does not have (training
        would read their episodes a second time), and their files, whose data the shards of
        this count hold again."""
        if self.shard == 0:
            for other in remove_foreign_manifests(self.storage, "preprocess", self.shards):
                self.storage.delete(shard_key(other))
                self.storage.delete(report_key(other))

    def _upstream_change(self, manifest: dict[str, Any]) -> str:
        """Why a done shard no longer holds its download shard's data ("" while it does): the
        downloader's items changed since (new sources, a new plan). A download shard not
        done (being redone) or of another shard count keeps the shard until it is, unless
        the shard was made from another download than the expected one."""
        made_from = manifest.get("download_generation")
        try:
            raw = read_manifest(self.storage, "download", self.shard)
        except ValueError:
            raw = None  # torn: the downloader replaces it
        if raw is None or raw.get("shards") != self.shards:
            if self.download_generation and made_from != self.download_generation:
                made = "a download it does not record" if made_from is None else f"download generation {made_from!r}"
                raise TransientError(
                    f"shard {shard_name(self.shard)} was made from {made}, and download "
                    f"shard {shard_name(self.shard)} of this config's generation {self.download_generation!r} is not "
                    "done: run `trajflow wait --stage download` first"
                )
            return ""
        self._check_download_generation(raw)
        recorded = manifest.get("raw_digest")
        if recorded is None:  # written before the digest was recorded: its download is unknown
            return "records neither the digest of its raw items nor their download" \
                if self.download_generation and made_from is None else ""
        if raw_items_digest(raw) != recorded:
            return f"was made from other raw items than download shard {shard_name(self.shard)} holds now"
        if made_from != raw.get("generation"):
            # made before the field was recorded, or from the same items planned under another
            # generation: the training's wait goes by it
            update_manifest(self.storage, "preprocess", self.shard, manifest, download_generation=raw.get("generation"))
        return ""

    def _check_download_generation(self, raw: dict[str, Any]) -> None:
        """A download manifest of another generation than this config's is an earlier
        dataset's, until the downloader redoes the shard (exit 4: the pod is retried)."""
        if self.download_generation and raw.get("generation") != self.download_generation:
            raise TransientError(
                f"download shard {shard_name(self.shard)} records generation {raw.get('generation')!r}, not "
                f"{self.download_generation!r} of the downloader.config in use: it holds an earlier dataset until its "
                "download pod has planned and fetched this one; run `trajflow wait --stage download` first"
            )

    def _check_download_unchanged(self) -> None:
        """The download shard is still the one this pod read (exit 4 otherwise: the retry reads
        the new one). A pod of a replaced Job, still running beside the new Job's, would
        otherwise publish a shard of the old download over the new Job's."""
        raw = read_manifest(self.storage, "download", self.shard)
        if raw is None:
            change = "its manifest is gone"
        elif raw.get("shards") != self.shards:
            change = f"it was written again for {raw.get('shards')} shards"
        elif raw.get("generation") != self.raw_generation:
            change = f"it was written again for generation {raw.get('generation')!r}"
        elif raw_items_digest(raw) != self.raw_digest:
            change = "it was written again with other items"
        else:
            return
        raise TransientError(f"download shard {shard_name(self.shard)} changed while it was preprocessed ({change}): "
                             "nothing was written; a retry preprocesses the shard as it is now")

    def _warn_if_stale(self, manifest: dict[str, Any]) -> list[str]:
        changed = stale_settings(manifest, self.config)
        if changed:
            log.warning(
                "shard %s was made with other preprocessing.config (%s); it is kept (a done shard is redone only for "
                "another shard count or other raw items: use a new runId or delete resampled/ to recompute)",
                shard_name(self.shard), ", ".join(changed))
        return changed


def stale_settings(manifest: dict[str, Any], config: PreprocessConfig) -> list[str]:
    """How the settings a done shard was made with differ from ``config``'s ([]: they match)."""
    made = settings_of(manifest)
    return settings_differences(made, config.output_settings(made.get("sources") or ()))


# from these magnitudes on, a value rounds to inf in the half-precision shard dtypes (half
# way between the largest finite value and the next power of two: (2 - 2**-(mantissa+1)) * 2**emax)
_INF_FROM = {"float16": (2 - 2**-11) * 2.0**15, "bfloat16": (2 - 2**-8) * 2.0**127}


def _beyond_dtype(ep: RawEpisode, dtype: str) -> Quarantined | None:
    """The quarantine entry of an episode with a value the shard dtype cannot hold, else None.
    Resampling interpolates, so it never leaves the range of the raw values."""
    limit = _INF_FROM.get(dtype)
    if limit is None or not ep.frames.size or float(np.abs(ep.frames).max()) < limit:
        return None
    s, c = (int(v) for v in np.argwhere(np.abs(ep.frames) >= limit)[0])
    name, d = readers.column_owner(ep.dims, c)
    return Quarantined(ep.source, ep.episode, readers.NON_FINITE,
                       f"{name}[{s}, {d}] = {float(ep.frames[s, c]):g} rounds to inf in {dtype} (from +-{limit:g} on); "
                       f"set preprocessing.config.dtype: float32")


def _set_throughput(metrics: StageMetrics, episodes: int, seconds: float) -> None:
    """The throughput gauge, one definition throughout: episodes written per second since the
    shard began (as `trajectories`, the counter of episodes written, counts them)."""
    if seconds > 0:
        metrics.throughput.set(episodes / seconds)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------- entry points


def process_shard(storage: Storage, shard: int, shards: int, config: PreprocessConfig,
                  metrics: StageMetrics | None = None, device: Any = None, wait_s: float = 0.0,
                  download_generation: str | None = None) -> ShardSummary:
    """Preprocess one shard of ``storage`` (skipped when its manifest exists)."""
    return ShardProcessor(storage, shard, shards, config, metrics, device, wait_s,
                          download_generation=download_generation).run()


def run_shard(settings: Any, storage: Storage | None = None, shard: int | None = None,
              wait_s: float = 0.0) -> ShardSummary:
    """Preprocess one shard from `StageSettings` (``settings.shard`` unless ``shard`` is
    given), pushing metrics to ``global.metrics.pushgatewayUrl`` when set; ``wait_s``: how
    long to wait for another download shard holding a dataset's metadata."""
    from trajflow.storage import open_run_root

    storage = storage or open_run_root(settings.global_)
    shard = settings.shard if shard is None else shard
    trajflow_log.set_context(run=settings.global_.run_id, stage="preprocess", shard=shard)
    metrics = preprocess_metrics()
    metrics.start_time.set(time.time())  # a push that fails early still says when the shard started
    pusher = Pusher(settings.global_.metrics.pushgateway_url, metrics, settings.global_.run_id, shard)

    def started() -> None:
        pusher.start(settings.config.push_interval_seconds)
        if shard == 0:
            pusher.drop_shards_from(settings.shards)

    ok = interrupted = False
    clear_failure(storage, "preprocess", shard)
    try:
        summary = ShardProcessor(storage, shard, settings.shards, settings.config, metrics, wait_s=wait_s,
                                 started=started, download_generation=settings.download_generation).run()
        ok = True
        return summary
    except PermanentError as exc:  # training, waiting for every shard, stops instead of holding its GPUs
        record_failure(storage, "preprocess", shard, settings.shards, settings.download_generation, str(exc))
        raise
    except KeyboardInterrupt:  # SIGTERM (Terminated) or Ctrl-C: resumed by a retry, not failed
        interrupted = True
        raise
    finally:
        pusher.stop(ok, interrupted=interrupted)


def run_shards(settings: Any, shards: Sequence[int], wait_timeout_s: float = 0.0, storage: Storage | None = None,
               poll_s: float = 2.0) -> list[ShardSummary]:
    """Preprocess several shards, each as soon as its download shard is done (pipelined);
    gives up with WaitTimeout after ``wait_timeout_s`` without progress (0: no waiting)."""
    from trajflow.errors import WaitTimeout
    from trajflow.storage import done_shards, open_run_root
    from trajflow.storage.wait import manifest_expectations, stale_reason

    expected = manifest_expectations("download", settings.shards, settings.download_generation)

    def not_downloaded(shard: int) -> str | None:
        """Why download shard ``shard`` is not done for this run's shard count (None: it is)."""
        try:
            doc = read_manifest_fields(storage, "download", shard)
        except ValueError as exc:
            return str(exc)
        if doc is None:
            return "not done"
        return stale_reason(doc, expected)

    outside = sorted(s for s in set(shards) if not 0 <= s < settings.shards)
    if outside:
        raise ConfigError(f"shard {outside[0]} is not one of this run's {settings.shards} shards "
                          f"(0-{settings.shards - 1}): check --shards against preprocessing.shards")
    storage = storage or open_run_root(settings.global_)
    pending = sorted(set(shards))
    out = []
    deadline = time.monotonic() + wait_timeout_s
    while pending:
        listed = done_shards(storage, "download")  # one listing; only the listed manifests are read
        waiting = {s: not_downloaded(s) if s in listed else "not done" for s in pending}
        runnable = [s for s in pending if waiting[s] is None]
        if not runnable:
            if time.monotonic() >= deadline:
                if not wait_timeout_s:
                    # let process_shard name the missing manifest
                    runnable = pending[:1]
                else:
                    why = "; ".join(f"{s}: {waiting[s]}" for s in pending[:10])
                    raise WaitTimeout(f"timed out after {wait_timeout_s:.0f}s waiting for download shard(s) "
                                      f"{pending[:10]} under {storage.uri}/raw/_done ({why})")
            else:
                time.sleep(poll_s)
                continue
        shard = runnable[0]
        out.append(run_shard(settings, storage, shard, wait_s=wait_timeout_s))
        pending.remove(shard)
        deadline = time.monotonic() + wait_timeout_s
    return out
