"""Windows over the memory-mapped resampled shards.

A sample is `window` consecutive frames of the observation stream of one episode, and a
target at the window's last step:

- `behavior_cloning`: the action at the last frame of the window;
- `forecast`: the observation one frame after the window.

Episodes (not windows) are split into training and validation, so no validation window
shares frames with a training window. Batches are gathered with one fancy-indexing call
per shard over the memory map, so a batch costs a few numpy calls, not one per sample.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from trajflow.config.train import TrainConfig
from trajflow.errors import ConfigError, PermanentError, TransientError
from trajflow.preprocess.shards import (
    ShardEntry,
    ShardFormatError,
    ShardReader,
    as_float32,
    check_shard_file,
    default_cache_dir,
    fetch_shard,
    list_shards,
    open_shard,
    merge_settings,
    settings_differences,
    settings_of,
)
from trajflow.resources import TMP_SIZE_LIMIT_ENV, human_bytes, tmp_size_limit
from trajflow.storage import Storage, manifest_key, shard_name
from trajflow.threads import ordered_map

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpisodeRef:
    shard: int  # position in the reader list
    index: int  # episode number within the shard
    offset: int  # first row in the shard's stream arrays
    length: int
    name: str  # "<source>#<episode>", stable across re-preprocessing


@dataclass
class ShardSet:
    """The opened done shards and every episode in them."""

    readers: list[ShardReader]
    shard_ids: list[int]
    episodes: list[EpisodeRef]
    rate_hz: float
    dims: dict[str, int]
    files: list[str] = field(default_factory=list)  # the sha256 of every done shard's file, by shard

    def identity(self) -> str:
        """What the shards hold, as one digest: the ranks of a run must open the same."""
        digest = hashlib.sha256(json.dumps([self.files, self.shard_ids, self.rate_hz, self.dims]).encode())
        for ep in self.episodes:
            digest.update(f"{ep.name}\0{ep.length}\n".encode())
        return digest.hexdigest()


def open_shards(storage: Storage, streams: Sequence[str], cache_dir: str | Path | None = None,
                verify: bool = True) -> ShardSet:
    """Open every done shard under `<root>/resampled/` and check they agree on rate and
    streams; with ``verify``, that every file holds the bytes its manifest describes (a
    fetched copy is checked as it arrives, a file on the filesystem here)."""
    try:
        entries = list_shards(storage)
    except (ValueError, ShardFormatError) as exc:
        raise PermanentError(str(exc)) from None
    if not entries:
        raise TransientError(
            f"{storage.uri}/resampled/_done/: no done shards yet; training starts after preprocessing has finished"
        )
    entries = _one_sharding(storage, entries)
    _check_cache_room(storage, entries, cache_dir)
    readers: list[ShardReader] = []
    shard_ids: list[int] = []
    episodes: list[EpisodeRef] = []
    rate: float | None = None
    dims: dict[str, int] = {}
    settings: dict[str, Any] = {}  # every output setting the shards so far record
    for entry, path in zip(entries, _checked_files(storage, entries, cache_dir, verify)):
        try:
            reader = open_shard(path)
        except (ShardFormatError, ValueError) as exc:
            raise PermanentError(f"shard {entry.shard}: {exc}") from None
        if (len(reader.episodes), reader.num_frames) != (entry.num_episodes, entry.num_frames):
            raise PermanentError(
                f"{storage.uri}/{entry.key}: holds {len(reader.episodes)} episodes of {reader.num_frames} frames, its "
                f"manifest says {entry.num_episodes} of {entry.num_frames}; delete resampled/ so that preprocessing "
                "writes it again"
            )
        if not reader.episodes:  # a shard without trajectories: nothing to read, its streams have no width
            continue
        # shards kept from a run with other preprocessing settings would mix two datasets
        made = settings_of(entry.manifest)
        changed = settings_differences(settings, made)
        if changed:
            raise PermanentError(
                f"{storage.uri}/{manifest_key('preprocess', entry.shard)}: made with other preprocessing.config than "
                f"the shards before it ({'; '.join(changed)}); use a new global.runId or delete resampled/ so that "
                "every shard is made again with one config"
            )
        settings = merge_settings(settings, made)
        missing = [s for s in streams if s not in reader.dims]
        if missing:
            raise PermanentError(
                f"{storage.uri}/{entry.key}: no stream {missing[0]!r} (it has {', '.join(reader.streams)}); "
                "set training.config.observation/action to streams the preprocessing wrote"
            )
        if rate is None:
            rate = reader.rate_hz
            dims = {s: reader.dims[s] for s in streams}
        elif not np.isclose(reader.rate_hz, rate):
            raise PermanentError(
                f"{storage.uri}/{entry.key}: rate {reader.rate_hz} Hz differs from the other shards' {rate} Hz"
            )
        for s in streams:
            if reader.dims[s] != dims[s]:
                raise PermanentError(
                    f"{storage.uri}/{entry.key}: stream {s!r} has {reader.dims[s]} dims, other shards have {dims[s]}"
                )
        pos = len(readers)
        readers.append(reader)
        shard_ids.append(entry.shard)
        for i, ep in enumerate(reader.episodes):
            episodes.append(EpisodeRef(pos, i, ep.offset, ep.length, f"{ep.source}#{ep.episode}"))
    return ShardSet(readers, shard_ids, episodes, float(rate or 0.0), dims, [e.sha256 for e in entries])


# where a shard file on a filesystem root is recorded as checked (`check_shard_file`)
CHECKED_STAMPS = "train/.trajflow-checked"


def _checked_files(storage: Storage, entries: list[ShardEntry], cache_dir: str | Path | None,
                   verify: bool) -> list[Path]:
    """Each entry's file as a local path (an object store's copied into the cache), checked
    against its manifest with ``verify``: a file checked before and unchanged since is not
    hashed again. Several at once: hashing releases the GIL, and network volumes and object
    stores serve parallel reads faster."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()

    def one(entry: ShardEntry) -> Path:
        try:
            local = storage.local_path(entry.key)
            if local is None:
                return fetch_shard(storage, entry, cache, verify=verify and bool(entry.sha256))
            if verify:
                check_shard_file(local, entry, storage.local_path(f"{CHECKED_STAMPS}/{shard_name(entry.shard)}.json"))
            return local
        except FileNotFoundError as exc:
            raise PermanentError(f"shard {entry.shard} is marked done but its file is missing: {exc}") from None
        except (ShardFormatError, ValueError) as exc:
            raise PermanentError(f"shard {entry.shard}: {exc}") from None

    # a stop does not wait for copies stalled on the store
    return list(ordered_map(one, entries, max(1, min(8, os.cpu_count() or 1, len(entries))), lookahead=len(entries),
                            name="fetch"))


def _check_cache_room(storage: Storage, entries: list[ShardEntry], cache_dir: str | Path | None) -> None:
    """Shards on S3 are copied into the cache, by default in TMPDIR: an emptyDir whose size
    limit gets the pod evicted, with no message, when the copies outgrow it."""
    limit = tmp_size_limit()
    if cache_dir or limit is None or storage.local_path(entries[0].key) is not None:
        return
    total = sum(e.size for e in entries)
    if total > 0.9 * limit:  # HOME shares the directory
        raise ConfigError(
            f"the {len(entries)} preprocessed shards under {storage.uri}/resampled/ hold {human_bytes(total)} and "
            f"training copies them into {tempfile.gettempdir()}, limited to {human_bytes(limit)} "
            f"({TMP_SIZE_LIMIT_ENV}: the kubelet evicts the pod beyond it); raise training.tmp.sizeLimit to at "
            f"least {human_bytes(total / 0.9)}, or set training.config.cacheDir to a volume that holds them"
        )


def _one_sharding(storage: Storage, entries: list[ShardEntry]) -> list[ShardEntry]:
    """The done shards of one sharding of the data. After a re-sharding, manifests of the
    old count can outlive the new ones' writing for a while; reading both would count the
    same episodes twice. The complete set (every shard of its count done) is taken."""
    by_count: dict[Any, list[ShardEntry]] = {}
    for e in entries:
        by_count.setdefault(e.manifest.get("shards"), []).append(e)
    if len(by_count) == 1:
        (count,) = by_count
        done = sorted(e.shard for e in entries)
        if isinstance(count, int) and done != list(range(count)):
            missing = sorted(set(range(count)) - set(done))
            raise TransientError(
                f"{storage.uri}/resampled/_done/: {len(done)} of {count} preprocessed shards are done (not "
                f"{', '.join(str(m) for m in missing[:5])}{' ...' if len(missing) > 5 else ''}); "
                "training starts when every shard is done"
            )
        return entries
    complete = [n for n, group in by_count.items()
                if isinstance(n, int) and sorted(e.shard for e in group) == list(range(n))]
    summary = ", ".join(f"{len(g)} of {n}" for n, g in sorted(by_count.items(), key=lambda kv: str(kv[0])))
    if len(complete) != 1:
        raise TransientError(
            f"{storage.uri}/resampled/_done/: the done shards belong to different shard counts ({summary} done) and "
            "no one sharding is complete: preprocessing is being redone for a new count; train after it finishes"
        )
    log.warning("%s/resampled/_done/: shards of several shard counts (%s done); reading the complete %d-shard set",
                storage.uri, summary, complete[0])
    return by_count[complete[0]]


def frames_needed(config: TrainConfig) -> int:
    """Frames of an episode one sample spans (forecast also needs the frame after the window)."""
    return config.window + (1 if config.task == "forecast" else 0)


_RAW_SHARD = re.compile(r"^raw/[0-9]+/")


def split_episodes(episodes: Sequence[EpisodeRef], val_fraction: float, seed: int) -> tuple[list[EpisodeRef], list[EpisodeRef]]:
    """Hold out about val_fraction of the episodes: each one whose seeded hash of its name
    (without the raw shard it was downloaded into) falls below val_fraction, so an episode
    stays on its side when others are added, quarantined or re-sharded; the same on every
    rank. At least one episode on each side."""
    n = len(episodes)
    if n < 2:
        raise PermanentError(
            f"{n} episode(s) long enough for a sample; training needs at least 2 "
            "(one for training, one for validation)"
        )
    prefix = f"{seed}:"
    digests = b"".join([hashlib.sha256((prefix + _RAW_SHARD.sub("", ep.name)).encode()).digest()[:8]
                        for ep in episodes])
    # uint64 -> float64 rounds as int / 2.0**64 does, and dividing by 2**64 is exact: the
    # scores, and so the split, are those of checkpoints made before
    scores = (np.frombuffer(digests, ">u8").astype(np.float64) / 2.0**64).tolist()
    held = [s < val_fraction for s in scores]
    n_val = sum(held)

    def rank(i: int) -> tuple[float, str]:
        return scores[i], episodes[i].name

    if n_val == 0:  # the first of the (score, name) ranking is held out
        held[min(range(n), key=rank)] = True
    elif n_val == n:  # the last one is kept for training
        held[max(reversed(range(n)), key=rank)] = False
    # ordered by (shard, index), ties as the ranking had them
    order = sorted(range(n), key=lambda i: (episodes[i].shard, episodes[i].index, scores[i], episodes[i].name))
    val = [episodes[i] for i in order if held[i]]
    train = [episodes[i] for i in order if not held[i]]
    return train, val


class _Moments:
    def __init__(self, dim: int):
        self.count = 0
        self.total = np.zeros(dim, np.float64)
        self.squares = np.zeros(dim, np.float64)

    def add(self, x: np.ndarray) -> None:
        x64 = x.astype(np.float64, copy=False)
        self.count += x64.shape[0]
        self.total += x64.sum(axis=0)
        self.squares += np.square(x64).sum(axis=0)


# frames of one episode looked at at once by the passes over the whole data: memory follows
# this, not the longest episode (hours of frames) times its width
ROWS_PER_PASS = 1 << 16


def _finite_chunks(shards: ShardSet, ep: EpisodeRef, stream: str) -> Iterator[np.ndarray]:
    """The episode's frames of `stream` as float32, ROWS_PER_PASS rows at a time; a NaN/Inf
    frame is a data error (PermanentError naming the episode), not a divergence."""
    reader = shards.readers[ep.shard]
    for start in range(ep.offset, ep.offset + ep.length, ROWS_PER_PASS):
        x = as_float32(reader, stream, slice(start, min(start + ROWS_PER_PASS, ep.offset + ep.length)))
        if not np.isfinite(x).all():
            raise PermanentError(
                f"{reader.path}: episode {ep.name!r} has NaN/Inf values in stream {stream!r}; "
                "preprocessing should have quarantined it"
            )
        yield x


def check_finite(shards: ShardSet, episodes: Sequence[EpisodeRef], streams: Sequence[str]) -> None:
    """A NaN/Inf frame is a data error (PermanentError naming the episode), not a divergence."""
    for stream in streams:
        for ep in episodes:
            for _ in _finite_chunks(shards, ep, stream):
                pass


def local_moments(shards: ShardSet, episodes: Sequence[EpisodeRef], streams: Sequence[str]) -> np.ndarray:
    """[count, sum..., sum of squares...] per stream for `episodes`, as one float64 vector
    (so ranks can add theirs with one all-reduce). Non-finite values are a data error."""
    parts = []
    for stream in streams:
        moments = _Moments(shards.dims[stream])
        for ep in episodes:
            for x in _finite_chunks(shards, ep, stream):
                moments.add(x)
        parts.append(np.concatenate([[moments.count], moments.total, moments.squares]))
    return np.concatenate(parts)


def stats_from_moments(vector: np.ndarray, dims: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mean, std) per stream from summed `local_moments` vectors; a constant dimension gets std 1."""
    out, pos = [], 0
    for d in dims:
        count = vector[pos]
        total = vector[pos + 1 : pos + 1 + d]
        squares = vector[pos + 1 + d : pos + 1 + 2 * d]
        pos += 1 + 2 * d
        if count <= 0:
            raise PermanentError("the training split has no frames to compute normalisation statistics from")
        mean = total / count
        var = np.maximum(squares / count - mean**2, 0.0)
        std = np.sqrt(var)
        std = np.where(std < 1e-6 * np.maximum(np.abs(mean), 1.0), 1.0, std)
        out.append((mean.astype(np.float32), std.astype(np.float32)))
    return out


class WindowDataset(Dataset):
    """Map-style dataset of windows; `dataset[list_of_indices]` returns a whole batch."""

    def __init__(self, shards: ShardSet, episodes: Sequence[EpisodeRef], config: TrainConfig):
        self.shards = shards
        self.window = config.window
        self.input_stream = config.observation
        self.target_stream = config.observation if config.task == "forecast" else config.action
        # the target's row relative to the window start
        self.target_lag = config.window if config.task == "forecast" else config.window - 1
        self.stride = config.stride
        need = frames_needed(config)
        n = len(episodes)
        shard = np.fromiter((ep.shard for ep in episodes), np.int64, n)
        offset = np.fromiter((ep.offset for ep in episodes), np.int64, n)
        length = np.fromiter((ep.length for ep in episodes), np.int64, n)
        usable = length >= need
        self.skipped_episodes = int(n - usable.sum())
        self.num_episodes = n - self.skipped_episodes
        # Per episode, not per window (10^9 windows of start and shard are 12 GB on every
        # rank). Windows are numbered episode by episode, stride apart, as they always were:
        # checkpoints' epoch orders name the same windows.
        self.episode_shard = shard[usable].astype(np.int32)
        self.episode_offset = offset[usable]
        # the number of the episode's first window; the last entry is the total
        windows = (length[usable] - need) // self.stride + 1
        self.first_window = np.concatenate([np.zeros(1, np.int64), np.cumsum(windows)])
        self._offsets = np.arange(self.window, dtype=np.int64)

    @property
    def input_dim(self) -> int:
        return self.shards.dims[self.input_stream]

    @property
    def target_dim(self) -> int:
        return self.shards.dims[self.target_stream]

    def __len__(self) -> int:
        return int(self.first_window[-1])

    def locate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The shard (position in the reader list) and first row of windows `idx`."""
        ep = np.searchsorted(self.first_window, idx, side="right") - 1
        return self.episode_shard[ep], self.episode_offset[ep] + (idx - self.first_window[ep]) * self.stride

    def __getitem__(self, index: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        single = np.isscalar(index)
        idx = np.atleast_1d(np.asarray(index, dtype=np.int64))
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"window index out of range 0..{len(self) - 1}")
        x = np.empty((idx.size, self.window, self.input_dim), np.float32)
        y = np.empty((idx.size, self.target_dim), np.float32)
        shard_of, start_of = self.locate(idx)
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            reader = self.shards.readers[int(shard)]
            starts = start_of[where]
            x[where] = as_float32(reader, self.input_stream, starts[:, None] + self._offsets)
            y[where] = as_float32(reader, self.target_stream, starts + self.target_lag)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        return (xt[0], yt[0]) if single else (xt, yt)


class EpochBatches(Sampler[list[int]]):
    """Batches of this rank's share of an epoch, optionally starting after the batches a
    mid-epoch checkpoint already covered.

    The share is DistributedSampler's, index for index (the permutation seeded with
    seed + epoch, padded cyclically so that every rank takes as many steps, then every
    world_size-th index from the rank's): checkpoints of either resume alike. Where
    the windows do not divide by the world size, the first few of the order come again.
    After b batches on every rank, the ranks have taken the first world_size x batch_size
    x b windows of the order, whatever the world size: a run resumed on another world size
    or batch size goes on from there (`Trainer._place_in_epoch`).
    It is kept as an int64 tensor, not a list of Python ints (46 bytes a window, on every
    rank, for all the windows of the data)."""

    def __init__(self, dataset: WindowDataset, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True, max_batches: int = 0):
        self.windows = len(dataset)
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.per_rank = -(-self.windows // world_size)
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip_batches

    def batches_per_epoch(self) -> int:
        n = -(-self.per_rank // self.batch_size)
        return min(n, self.max_batches) if self.max_batches else n

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.skip, 0)

    def rank_indices(self) -> torch.Tensor:
        """This rank's windows of the epoch, in order."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            # 8 bytes a window while it is dealt, then freed; checkpoints resume to this very
            # order (DistributedSampler's), so it stays a randperm over all the windows
            order = torch.randperm(self.windows, generator=generator)
        else:
            order = torch.arange(self.windows)
        pad = self.per_rank * self.world_size - self.windows
        if pad:
            order = torch.cat([order, order[:pad] if pad <= self.windows else order.repeat(-(-pad // self.windows))[:pad]])
        # a copy of the rank's share only: a view would keep the whole permutation alive on
        # every rank (8 bytes a window of the data, for the epoch)
        return order[self.rank::self.world_size].clone()

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.rank_indices()
        for b in range(self.skip, self.batches_per_epoch()):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size].tolist()


def rank_share(n: int, rank: int, world_size: int) -> range:
    """Indices rank::world_size of n items: every item exactly once over all ranks (no
    padding), for evaluation and for statistics. A range, not a list (36 bytes an item)."""
    return range(rank, n, world_size)


@dataclass
class TrainData:
    shards: ShardSet
    train: WindowDataset
    val: WindowDataset
    train_episodes: list[EpisodeRef] = field(repr=False)
    val_episodes: list[EpisodeRef] = field(repr=False)

    def describe(self) -> dict[str, object]:
        return {
            "shards": len(self.shards.readers),
            "rate_hz": self.shards.rate_hz,
            "train_episodes": self.train.num_episodes,
            "val_episodes": self.val.num_episodes,
            "train_windows": len(self.train),
            "val_windows": len(self.val),
            "dims": dict(self.shards.dims),
        }


def build_data(shards: ShardSet, config: TrainConfig, announce: bool = True) -> TrainData:
    """The split and its windows; `announce`: log what is left out (one rank does)."""
    need = frames_needed(config)
    usable = [ep for ep in shards.episodes if ep.length >= need]
    short = len(shards.episodes) - len(usable)
    sample = (f"a sample of {need} frames (training.config.window {config.window}"
              f"{' and the frame after it' if config.task == 'forecast' else ''}) at {shards.rate_hz:g} Hz")
    remedy = "a shorter window, or a higher preprocessing.config.targetRateHz, keeps more of them"
    if short and announce:
        frames = sum(ep.length for ep in shards.episodes)
        lost = frames - sum(ep.length for ep in usable)
        # most of the data out of reach trains a model on what is left, silently
        most = 2 * lost > frames
        log.log(logging.WARNING if most else logging.INFO,
                "%d of %d episodes (%.1f%% of the frames) are shorter than %s and are not used%s", short,
                len(shards.episodes), 100 * lost / max(frames, 1), sample, f": {remedy}" if most else "")
    if not shards.episodes:  # not a training problem: what preprocessing made
        raise PermanentError(
            "the preprocessed shards hold no episode: preprocessing read no trajectory (a format that matches none "
            "of the raw files, streams they lack, every trajectory quarantined); its log and "
            "resampled/<shard>.report.json say which. Shards kept from earlier settings are remade only under a new "
            "global.runId, or once resampled/ is deleted")
    if len(usable) < 2:
        longest = max(ep.length for ep in shards.episodes)
        raise PermanentError(f"{len(usable)} of {len(shards.episodes)} episode(s) are long enough for {sample}, the "
                             f"longest having {longest} frames; training needs at least 2 (one for training, one "
                             f"for validation): {remedy}")
    train_eps, val_eps = split_episodes(usable, config.val_fraction, config.seed)
    return TrainData(shards, WindowDataset(shards, train_eps, config), WindowDataset(shards, val_eps, config),
                     train_eps, val_eps)
