"""Small raw trajectory datasets for the preprocessing tests (and anyone else's).

Every generator returns the exact values it stored (after the file's own dtype rounding),
so a test can build a float64 reference from precisely what the stage will read:

- `make_episode`: a smooth multi-rate trajectory with timing jitter;
- `write_lerobot` (parquet, one row per frame, one or many episodes per file),
  `write_robomimic` (HDF5 data/demo_N/...), `write_npz` (one or many episodes per file);
- `publish_raw_shard`: puts files under ``raw/<shard>/<source>/`` of a run root and writes
  the download manifest the way the downloader does (key, size, sha256), last;
- `bad_corpus`: one file per quarantine reason, plus good episodes;
- `reference_resample` / `expected_steps`: the float64 answers.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

STATE, ACTION = "observation.state", "action"
RATES_HZ = (30.0, 50.0, 100.0, 125.0, 200.0, 333.0)


@dataclass
class GenEpisode:
    """What was stored: float64 times and float64 copies of the stored stream values."""

    episode: str
    times: np.ndarray
    streams: dict[str, np.ndarray]
    rate_hz: float
    robot: str = ""
    source_path: str = ""  # path under the source directory, set by the writers
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.times.shape[0])


def make_episode(rng: np.random.Generator, episode: str, rate_hz: float, duration_s: float,
                 dims: dict[str, int] | None = None, jitter: float = 0.2, t0: float | None = None,
                 robot: str = "") -> GenEpisode:
    """Samples at ``rate_hz`` with each interval jittered by up to +-``jitter`` of the
    period (times stay strictly increasing), values a sum of sines per dimension."""
    dims = dims or {STATE: 6, ACTION: 3}
    n = max(int(duration_s * rate_hz), 2)
    period = 1.0 / rate_hz
    steps = period * (1.0 + rng.uniform(-jitter, jitter, size=n - 1))
    start = float(rng.uniform(0.0, 5.0)) if t0 is None else t0
    times = start + np.concatenate([[0.0], np.cumsum(steps)])
    streams = {}
    for name, d in dims.items():
        freq = rng.uniform(0.2, 2.0, size=d)
        phase = rng.uniform(0, 2 * np.pi, size=d)
        amp = rng.uniform(0.5, 3.0, size=d)
        streams[name] = amp * np.sin(2 * np.pi * freq * (times[:, None] - start) + phase) + rng.normal(0, 0.05, size=d)
    return GenEpisode(episode, times, streams, rate_hz, robot)


def mixed_episodes(rng: np.random.Generator, count: int, dims: dict[str, int] | None = None,
                   min_s: float = 0.5, max_s: float = 4.0, robot: str = "") -> list[GenEpisode]:
    return [make_episode(rng, str(i), float(RATES_HZ[i % len(RATES_HZ)]), float(rng.uniform(min_s, max_s)), dims,
                         robot=robot)
            for i in range(count)]


def _stored(ep: GenEpisode, time_dtype: Any = np.float64, data_dtype: Any = np.float32) -> None:
    """Round the episode to what the file holds, in place."""
    ep.times = ep.times.astype(time_dtype).astype(np.float64)
    ep.streams = {k: v.astype(data_dtype).astype(np.float64) for k, v in ep.streams.items()}


# --------------------------------------------------------------------------- writers


def write_lerobot(path: Path, episodes: Sequence[GenEpisode], time_dtype: Any = np.float32,
                  with_timestamps: bool = True, stream_names: dict[str, str] | None = None) -> None:
    """LeRobot-style parquet: one row per frame, fixed-size list columns (float32),
    ``episode_index``, ``frame_index``, ``timestamp`` (float32 like LeRobot), ``index``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stream_names = stream_names or {}
    cols: dict[str, list] = {"episode_index": [], "frame_index": [], "index": [], "task_index": []}
    if with_timestamps:
        cols["timestamp"] = []
    vec: dict[str, list] = {}
    row = 0
    for ep in episodes:
        _stored(ep, time_dtype)
        n = ep.length
        cols["episode_index"].append(np.full(n, int(ep.episode), dtype=np.int64))
        cols["frame_index"].append(np.arange(n, dtype=np.int64))
        cols["index"].append(np.arange(row, row + n, dtype=np.int64))
        cols["task_index"].append(np.zeros(n, dtype=np.int64))
        if with_timestamps:
            cols["timestamp"].append(ep.times.astype(time_dtype))
        for name, x in ep.streams.items():
            vec.setdefault(stream_names.get(name, name), []).append(x.astype(np.float32))
        row += n
        ep.source_path = path.name
    arrays = {k: pa.array(np.concatenate(v)) for k, v in cols.items()}
    for name, parts in vec.items():
        x = np.concatenate(parts)
        arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path)


def write_lerobot_info(dataset_dir: Path, fps: float, robot_type: str) -> None:
    (dataset_dir / "meta").mkdir(parents=True, exist_ok=True)
    (dataset_dir / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v2.1", "fps": fps,
                                                                "robot_type": robot_type}))


def write_lerobot_v3_meta(dataset_dir: Path, episodes: Sequence[GenEpisode]) -> None:
    """LeRobot v3.0 metadata parquet files: ``meta/tasks.parquet`` and the episodes table
    ``meta/episodes/chunk-000/file-000.parquet`` (one row per episode, no frames)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (dataset_dir / "meta" / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"task_index": [0], "task": ["pick"]}), dataset_dir / "meta" / "tasks.parquet")
    pq.write_table(pa.table({"episode_index": [int(ep.episode) for ep in episodes],
                             "length": [ep.length for ep in episodes],
                             "data/chunk_index": [0] * len(episodes)}),
                   dataset_dir / "meta" / "episodes" / "chunk-000" / "file-000.parquet")


def write_robomimic(path: Path, episodes: Sequence[GenEpisode], state_key: str = "obs/joint_pos",
                    action_key: str = "actions", timestamps: bool = True, robot: str = "") -> None:
    """robomimic-style HDF5: ``data/demo_N/obs/<state>``, ``data/demo_N/actions`` and,
    with ``timestamps``, ``data/demo_N/timestamps``; otherwise a ``rate_hz`` attribute
    per demo (the recorded rate)."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "env_kwargs": {"robots": [robot or "Panda"]}})
        for ep in episodes:
            _stored(ep)
            g = data.create_group(f"demo_{ep.episode}")
            g.create_dataset(state_key, data=ep.streams[STATE].astype(np.float32))
            g.create_dataset(action_key, data=ep.streams[ACTION].astype(np.float32))
            if timestamps:
                g.create_dataset("timestamps", data=ep.times)
            else:
                g.attrs["rate_hz"] = ep.rate_hz
            g.attrs["num_samples"] = ep.length
            ep.source_path = path.name
            ep.episode = f"demo_{ep.episode}"
            ep.robot = robot or "Panda"


def write_npz(path: Path, episodes: Sequence[GenEpisode], multi: bool = False) -> None:
    """One episode (top-level ``timestamps`` + streams) or several (``<episode>/<key>``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for ep in episodes:
        _stored(ep)
        prefix = f"{ep.episode}/" if multi else ""
        arrays[prefix + "timestamps"] = ep.times
        for name, x in ep.streams.items():
            arrays[prefix + name] = x.astype(np.float32)
        if ep.robot:
            arrays[prefix + "robot"] = np.array(ep.robot)
        ep.source_path = path.name
        if not multi:
            ep.episode = path.stem
    if not multi and len(episodes) != 1:
        raise ValueError("a single-episode npz holds exactly one episode")
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


# --------------------------------------------------------------- run root and manifest


def publish_raw_shard(storage: Any, shard: int, files: dict[str, bytes], shards: int = 1,
                      sizes: dict[str, int] | None = None, generation: str | None = None) -> list[dict[str, Any]]:
    """Store ``files`` (``<source>/<path>`` -> bytes) under ``raw/<shard>/`` and write the
    download manifest last. ``sizes`` overrides the size the manifest claims; ``generation``
    is the download's (`DownloadConfig.generation_id`), recorded when given."""
    from trajflow.storage import shard_name, write_manifest

    items = []
    for rel, data in sorted(files.items()):
        key = f"raw/{shard_name(shard)}/{rel}"
        storage.write_bytes(key, data)
        items.append({"key": key, "size": (sizes or {}).get(rel, len(data)),
                      "sha256": hashlib.sha256(data).hexdigest()})
    write_manifest(storage, "download", shard, shards, items, **({"generation": generation} if generation else {}))
    return items


def read_tree(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` as ``relative path -> bytes``."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def mixed_format_dataset(tmp: Path, rng: np.random.Generator, per_format: int = 6,
                         dims: dict[str, int] | None = None) -> tuple[dict[str, bytes], list[GenEpisode]]:
    """One source per format (``lerobot``, ``robomimic``, ``npz``) with mixed rates:
    returns the files (``<source>/<path>`` -> bytes) and the stored episodes, each with
    ``source_path`` set to ``<source>/<path>``."""
    episodes: list[GenEpisode] = []
    # LeRobot: one file per episode (v2) plus one multi-episode file and the metadata tables (v3)
    lr = mixed_episodes(rng, per_format, dims)
    ds = tmp / "lerobot"
    half = per_format // 2
    for ep in lr[:half]:
        write_lerobot(ds / "data" / "chunk-000" / f"episode_{int(ep.episode):06d}.parquet", [ep])
    if lr[half:]:
        write_lerobot(ds / "data" / "chunk-001" / "file-000.parquet", lr[half:])
    write_lerobot_info(ds, 30.0, "so100")
    write_lerobot_v3_meta(ds, lr)  # metadata, not trajectories
    for ep in lr:
        ep.robot = "so100"
        chunk = "chunk-000" if int(ep.episode) < half else "chunk-001"
        ep.source_path = f"lerobot/data/{chunk}/{ep.source_path}"
    episodes += lr
    # robomimic: timestamps in one file, a recorded rate in the other
    rm = mixed_episodes(rng, per_format, dims)
    write_robomimic(tmp / "robomimic" / "demos_a.hdf5", rm[:half], timestamps=True)
    rm_rate = rm[half:]
    for ep in rm_rate:  # a recorded rate means exactly uniform samples
        ep.times = ep.times[0] + np.arange(ep.length) / ep.rate_hz
    write_robomimic(tmp / "robomimic" / "demos_b.hdf5", rm_rate, timestamps=False)
    for ep in rm:
        ep.source_path = f"robomimic/{ep.source_path}"
    for ep in rm_rate:  # the stage sees times relative to the first sample
        ep.times = ep.times - ep.times[0]
    episodes += rm
    # npz: single-episode files and one multi-episode file
    nz = mixed_episodes(rng, per_format, dims, robot="ur5")
    for ep in nz[:half]:
        write_npz(tmp / "npz" / f"traj_{int(ep.episode):03d}.npz", [ep])
    if nz[half:]:
        write_npz(tmp / "npz" / "batch.npz", nz[half:], multi=True)
    for ep in nz:
        ep.source_path = f"npz/{ep.source_path}"
    episodes += nz
    return read_tree(tmp), episodes


# ------------------------------------------------------------------------ bad corpus


BAD_KINDS = ("non_monotonic_time", "non_finite", "too_short", "missing_stream", "unreadable_file")


def bad_corpus(tmp: Path, rng: np.random.Generator, good: int = 12) -> tuple[dict[str, bytes], list[GenEpisode],
                                                                              dict[str, str]]:
    """``good`` valid npz episodes plus one bad trajectory per kind: returns the files,
    the good episodes, and ``<source>/<path> -> expected reason`` for the bad ones."""
    d = tmp / "mixed"
    goods = mixed_episodes(rng, good)
    for ep in goods:
        write_npz(d / f"good_{int(ep.episode):03d}.npz", [ep])
        ep.source_path = f"mixed/{ep.source_path}"
    expected: dict[str, str] = {}

    ep = make_episode(rng, "x", 100.0, 1.0)
    ep.times[40] = ep.times[38]  # goes back in time
    write_npz(d / "bad_order.npz", [ep])
    expected["mixed/bad_order.npz"] = "non_monotonic_time"

    ep = make_episode(rng, "x", 50.0, 1.0)
    ep.streams[ACTION][10, 1] = np.nan
    write_npz(d / "bad_nan.npz", [ep])
    expected["mixed/bad_nan.npz"] = "non_finite"

    ep = make_episode(rng, "x", 50.0, 0.0)
    ep.times, ep.streams = ep.times[:1], {k: v[:1] for k, v in ep.streams.items()}
    write_npz(d / "bad_short.npz", [ep])
    expected["mixed/bad_short.npz"] = "too_short"

    ep = make_episode(rng, "x", 50.0, 1.0, dims={STATE: 6})
    write_npz(d / "bad_missing.npz", [ep])
    expected["mixed/bad_missing.npz"] = "missing_stream"

    ep = make_episode(rng, "x", 50.0, 1.0)
    write_npz(d / "bad_truncated.npz", [ep])
    whole = (d / "bad_truncated.npz").read_bytes()
    (d / "bad_truncated.npz").write_bytes(whole[: len(whole) // 2])
    expected["mixed/bad_truncated.npz"] = "unreadable_file"

    # a parquet file cut short and an HDF5 file cut short, too
    lr = make_episode(rng, "7", 30.0, 1.0)
    write_lerobot(d / "bad_truncated.parquet", [lr])
    whole = (d / "bad_truncated.parquet").read_bytes()
    (d / "bad_truncated.parquet").write_bytes(whole[: len(whole) - 40])
    expected["mixed/bad_truncated.parquet"] = "unreadable_file"

    h5 = make_episode(rng, "0", 30.0, 1.0)
    write_robomimic(d / "bad_truncated.hdf5", [h5], state_key=STATE, action_key=ACTION)
    whole = (d / "bad_truncated.hdf5").read_bytes()
    (d / "bad_truncated.hdf5").write_bytes(whole[: len(whole) // 3])
    expected["mixed/bad_truncated.hdf5"] = "unreadable_file"
    return read_tree(tmp), goods, expected


# ---------------------------------------------------------------------- references


def expected_steps(times: np.ndarray, rate_hz: float) -> int:
    """Output frames covering a trajectory's span at ``rate_hz``, starting at its first sample."""
    return int(math.floor((float(times[-1]) - float(times[0])) * rate_hz + 1e-6)) + 1


def reference_resample(times: np.ndarray, values: np.ndarray, rate_hz: float) -> np.ndarray:
    """float64 linear interpolation onto ``times[0] + j / rate_hz``, ends held."""
    t = np.asarray(times, dtype=np.float64)
    grid = t[0] + np.arange(expected_steps(t, rate_hz), dtype=np.float64) / rate_hz
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    return np.stack([np.interp(grid, t, x[:, k]) for k in range(x.shape[1])], axis=1)


def stage_config(**overrides: Any) -> Any:
    """A PreprocessConfig for the tests: CPU, small batches, the given overrides."""
    from trajflow.config import PreprocessConfig

    base: dict[str, Any] = {"device": "cpu", "batch_size": 8, "read_workers": 2}
    base.update(overrides)
    return PreprocessConfig.model_validate(base)


def write_values(path: Path, root: Path, config: dict[str, Any], pushgateway_url: str = "") -> Path:
    """A rendered stage ConfigMap (``{global, config}``) for `trajflow preprocess --config`."""
    import yaml

    doc = {"global": {"runId": "test", "storage": {"type": "filesystem", "filesystem": {"path": str(root)}},
                      "metrics": {"pushgatewayUrl": pushgateway_url}},
           "config": config}
    path.write_text(yaml.safe_dump(doc))
    return path


def episodes_by_key(episodes: Iterable[GenEpisode]) -> dict[tuple[str, str], GenEpisode]:
    return {(ep.source_path, ep.episode): ep for ep in episodes}


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
