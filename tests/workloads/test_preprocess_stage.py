"""`trajflow preprocess` end to end: raw shard in every format -> fixed-rate shard."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from preprocess_data import (
    ACTION,
    STATE,
    bad_corpus,
    episodes_by_key,
    expected_steps,
    make_episode,
    mixed_format_dataset,
    npz_bytes,
    publish_raw_shard,
    reference_resample,
    stage_config,
    write_values,
)
from trajflow.errors import ConfigError, ExitCode, PermanentError, Terminated, TransientError
from trajflow.metrics import preprocess_metrics
from trajflow.preprocess.shards import list_shards, open_shard, report_key, shard_key
from trajflow.preprocess.stage import process_shard
from trajflow.storage import LocalStorage, manifest_key, read_manifest, write_manifest
from trajflow.train.data import open_shards

torch = pytest.importorskip("torch")

ROBOMIMIC = {"streams": ["obs/joint_pos", "actions"], "renames": {"obs/joint_pos": STATE, "actions": ACTION}}


def _sample(metrics, name, labels=None):
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    files, episodes = mixed_format_dataset(tmp / "src", np.random.default_rng(0), per_format=6)
    return files, episodes


def _check_against_reference(reader, episodes, rate, atol, rtol=0.0):
    by_key = episodes_by_key(episodes)
    assert len(reader.episodes) == len(episodes)
    for i, info in enumerate(reader.episodes):
        gen = by_key[(info.source.split("/", 2)[2], info.episode)]
        assert info.length == expected_steps(gen.times, rate)
        assert info.raw_length == gen.length
        assert info.start_time == pytest.approx(gen.times[0], abs=1e-9)
        assert info.original_rate_hz == pytest.approx(gen.rate_hz, rel=0.05)  # jitter averages out
        assert info.robot == gen.robot
        for stream in (STATE, ACTION):
            ref = reference_resample(gen.times, gen.streams[stream], rate)
            got = reader.episode_tensor(i, stream).float().numpy()
            assert got.shape == ref.shape
            np.testing.assert_allclose(got, ref, atol=atol, rtol=rtol, err_msg=f"{info.source} {info.episode} {stream}")


def test_a_lerobot_datasets_own_fps_wins_over_rate_hz(local_storage):
    """rateHz is for files with neither timestamps nor a rate: LeRobot's info.json fps is
    such a rate, as an npz or HDF5 rate attribute is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    n = 90  # 3 s at 30 fps, no timestamp column
    table = pa.table({"episode_index": np.zeros(n, np.int64), "frame_index": np.arange(n),
                      STATE: pa.array(rng.normal(size=(n, 6)).astype(np.float32).tolist()),
                      ACTION: pa.array(rng.normal(size=(n, 3)).astype(np.float32).tolist())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    files = {"lr/data/chunk-000/episode_000000.parquet": buf.getvalue(),
             "lr/meta/info.json": json.dumps({"fps": 30, "robot_type": "so100"}).encode(),
             "np/e.npz": npz_bytes(rate_hz=np.array(30.0), **{STATE: np.zeros((n, 6), np.float32),
                                                              ACTION: np.zeros((n, 3), np.float32)})}
    publish_raw_shard(local_storage, 0, files)
    process_shard(local_storage, 0, 1, stage_config(rate_hz=10.0, target_rate_hz=50.0))
    episodes = open_shard(local_storage.local_path(shard_key(0))).episodes
    assert [(e.original_rate_hz, e.length) for e in episodes] == [(30.0, 149), (30.0, 149)]  # 2.97 s at 50 Hz


@pytest.mark.parametrize("images", [True, False])
def test_a_lerobot_dataset_embedding_images_is_read_by_its_wanted_columns(storage, images):
    """LeRobot's *_image datasets keep PNG bytes in every frame: reading such a file whole
    moves hundreds of times the bytes of its states and actions. Its info.json says so
    (a feature of dtype image), and its files are read by the wanted columns only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    n = 60
    state = rng.normal(size=(n, 6)).astype(np.float32)
    pictures = [{"bytes": rng.bytes(20_000), "path": f"frame_{i:06d}.png"} for i in range(n)]
    table = pa.table({"episode_index": np.zeros(n, np.int64), "frame_index": np.arange(n),
                      "timestamp": (np.arange(n) / 30).astype(np.float32),
                      STATE: pa.array(state.tolist()), ACTION: pa.array(state[:, :3].tolist()),
                      "observation.image": pa.array(pictures)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    features = {STATE: {"dtype": "float32", "shape": [6]}, ACTION: {"dtype": "float32", "shape": [3]},
                "observation.image": {"dtype": "image" if images else "video", "shape": [96, 96, 3]}}
    data_key = "lr/data/chunk-000/episode_000000.parquet"
    publish_raw_shard(storage, 0, {data_key: buf.getvalue(),
                                   "lr/meta/info.json": json.dumps({"fps": 30, "features": features}).encode()})
    whole_reads: list[str] = []
    read_bytes = storage.read_bytes
    storage.read_bytes = lambda key: whole_reads.append(key) or read_bytes(key)
    process_shard(storage, 0, 1, stage_config(target_rate_hz=60.0))
    del storage.read_bytes
    assert (f"raw/00000/{data_key}" in whole_reads) is not images
    reader = open_shard(storage=storage, key=shard_key(0))
    assert [e.length for e in reader.episodes] == [119]
    np.testing.assert_allclose(reader.episode_tensor(0, STATE).float().numpy()[::2], state, atol=1e-4)


def test_float32_timestamps_at_the_datasets_own_fps_keep_every_frame(local_storage):
    """LeRobot writes timestamp = frame_index / fps in float32, which can end just short of
    k periods (99 / 30 -> 3.29999995): the last frame (often the goal state) must stay."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {}
    for e, n in enumerate(range(100, 250, 7)):
        state = np.repeat(np.arange(n, dtype=np.float32)[:, None], 6, axis=1)
        table = pa.table({"episode_index": np.full(n, e), "frame_index": np.arange(n),
                          "timestamp": (np.arange(n) / 30).astype(np.float32),
                          STATE: pa.array(state.tolist()), ACTION: pa.array(state[:, :3].tolist())})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        files[f"lr/data/chunk-000/episode_{e:06d}.parquet"] = buf.getvalue()
    publish_raw_shard(local_storage, 0, files)
    process_shard(local_storage, 0, 1, stage_config(target_rate_hz=30.0))
    reader = open_shard(local_storage.local_path(shard_key(0)))
    assert len(reader.episodes) == len(files)
    for i, info in enumerate(reader.episodes):
        assert info.length == info.raw_length, info.source
        got = reader.episode_tensor(i, STATE).float().numpy()
        np.testing.assert_allclose(got[:, 0], np.arange(info.raw_length), atol=1e-3)


def test_a_skipped_shard_reports_what_its_manifest_records(local_storage, mixed):
    """Its push replaces the shard's series: a rerun must not show a done shard at zero."""
    files, _ = mixed
    publish_raw_shard(local_storage, 0, files)
    first, again = preprocess_metrics(), preprocess_metrics()
    process_shard(local_storage, 0, 1, stage_config(sources={"robomimic": ROBOMIMIC}), first)
    assert process_shard(local_storage, 0, 1, stage_config(sources={"robomimic": ROBOMIMIC}), again).skipped
    for name in ("trajflow_preprocess_trajectories_total", "trajflow_preprocess_bytes_in_total",
                 "trajflow_preprocess_bytes_out_total"):
        assert _sample(again, name) == _sample(first, name) > 0, name
    assert _sample(again, "trajflow_stage_start_time_seconds") > 0
    # the gauges too, not zeros on the dashboards
    bandwidth = "trajflow_preprocess_bandwidth_bytes_per_second"
    assert _sample(again, bandwidth) == _sample(first, bandwidth) > 0
    assert _sample(again, "trajflow_preprocess_throughput_trajectories_per_second") > 0


def test_throughput_counts_the_episodes_written_as_during_the_run(local_storage, tmp_path):
    """One definition: episodes written per second since the shard began (as the writer sets
    it while the shard runs), not, at the end, every trajectory seen, bad ones included."""
    files, good, _ = bad_corpus(tmp_path / "src", np.random.default_rng(1))
    publish_raw_shard(local_storage, 0, files)
    metrics = preprocess_metrics()
    summary = process_shard(local_storage, 0, 1, stage_config(max_bad_fraction=0.5), metrics)
    assert summary.trajectories > summary.episodes == len(good)
    assert _sample(metrics, "trajflow_preprocess_throughput_trajectories_per_second") == \
        pytest.approx(summary.episodes / summary.seconds)


def test_a_shard_reports_progress_while_its_files_are_read(local_storage, mixed, caplog, monkeypatch):
    """In pods, nothing between a big shard's first and last line looks like a hang."""
    from trajflow.preprocess import stage

    files, _ = mixed
    publish_raw_shard(local_storage, 0, files)
    monkeypatch.setattr(stage, "PROGRESS_INTERVAL_S", 0.0)
    with caplog.at_level(logging.INFO, logger="trajflow.preprocess"):
        summary = process_shard(local_storage, 0, 1, stage_config(sources={"robomimic": ROBOMIMIC}), preprocess_metrics())
    lines = [r for r in caplog.records if hasattr(r, "progress_done")]
    total = len(files) - summary.ignored_files
    assert [r.progress_done for r in lines] == [*range(1, total + 1), total]  # each file, then the final line
    assert all(r.progress_total == total for r in lines) and lines[0].getMessage().startswith("shard 00000: 1/")


def test_a_file_without_episodes_is_quarantined_not_lost(local_storage):
    import h5py
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = io.BytesIO()
    pq.write_table(pa.table({"episode_index": pa.array([], pa.int64()), "timestamp": pa.array([], pa.float32()),
                             STATE: pa.array([], pa.list_(pa.float32(), 6)),
                             ACTION: pa.array([], pa.list_(pa.float32(), 3))}), empty)
    flat = io.BytesIO()
    with h5py.File(flat, "w") as f:
        f.create_group("data").create_dataset("demo_0", data=np.zeros(3))  # a dataset where a demo group belongs
    files = {"s/empty.parquet": empty.getvalue(), "s/flat.hdf5": flat.getvalue(),
             "s/good.npz": npz_bytes(**_npz_episode(np.random.default_rng(3)))}
    publish_raw_shard(local_storage, 0, files)
    process_shard(local_storage, 0, 1, stage_config(max_bad_fraction=1.0))
    report = json.loads(local_storage.read_bytes(report_key(0)))
    entries = {e["source"]: e for e in report["entries"]}
    assert report["written"] == 1 and set(entries) == {"raw/00000/s/empty.parquet", "raw/00000/s/flat.hdf5"}
    assert entries["raw/00000/s/empty.parquet"]["detail"] == "no episodes in this lerobot file"
    assert entries["raw/00000/s/flat.hdf5"]["reason"] == "unreadable_file"


def test_files_of_another_format_than_configured_are_named(local_storage, mixed, caplog):
    files, _ = mixed
    publish_raw_shard(local_storage, 0, files)
    with caplog.at_level(logging.WARNING):
        summary = process_shard(local_storage, 0, 1, stage_config(format="npz"))
    assert summary.episodes > 0  # the npz part is read
    warnings = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert any("lerobot file(s) of source 'lerobot' left out, its format being npz" in w for w in warnings), warnings
    assert any("robomimic file(s) of source 'robomimic' left out" in w for w in warnings), warnings
    assert not any("meta/" in w for w in warnings)  # LeRobot metadata is no trajectory file of any format


@pytest.mark.parametrize("rate", [50.0, 333.0])
def test_every_format_resamples_to_the_target_rate(local_storage, mixed, rate):
    files, episodes = mixed
    publish_raw_shard(local_storage, 0, files)
    metrics = preprocess_metrics()
    cfg = stage_config(target_rate_hz=rate, sources={"robomimic": ROBOMIMIC})
    summary = process_shard(local_storage, 0, 1, cfg, metrics)
    assert summary.episodes == len(episodes) == 18 and summary.bad == 0
    assert summary.ignored_files == 3  # lerobot/meta/ (info.json, v3 parquet tables) holds no trajectories
    reader = open_shard(local_storage.local_path(shard_key(0)))
    assert reader.rate_hz == rate and reader.dims == {STATE: 6, ACTION: 3}
    # file order (manifest keys sorted), then episode order within a file
    assert [e.source for e in reader.episodes] == sorted(e.source for e in reader.episodes)
    _check_against_reference(reader, episodes, rate, atol=2e-5)

    manifest = read_manifest(local_storage, "preprocess", 0)
    shard_item = next(it for it in manifest["items"] if it["kind"] == "shard")
    data = local_storage.read_bytes(shard_key(0))
    assert shard_item == {"key": shard_key(0), "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                          "kind": "shard"}
    assert manifest["episodes"] == reader.index["episodes"] and manifest["num_frames"] == reader.num_frames
    report = json.loads(local_storage.read_bytes(report_key(0)))
    assert report["quarantined"] == 0 and report["ignored_files"] == [
        "raw/00000/lerobot/meta/episodes/chunk-000/file-000.parquet", "raw/00000/lerobot/meta/info.json",
        "raw/00000/lerobot/meta/tasks.parquet"]

    assert _sample(metrics, "trajflow_preprocess_trajectories_total") == 18
    assert _sample(metrics, "trajflow_preprocess_bytes_in_total") == sum(len(b) for k, b in files.items()
                                                                           if "/meta/" not in k)
    assert _sample(metrics, "trajflow_preprocess_bytes_out_total") == len(data)
    assert _sample(metrics, "trajflow_preprocess_resample_seconds_count") == summary.batches >= 3
    assert _sample(metrics, "trajflow_preprocess_bandwidth_bytes_per_second") > 0


def test_a_target_rate_far_above_every_recorded_one_or_below_every_span_is_warned_about(local_storage, mixed, caplog):
    # recorded at 30-333 Hz: 600 Hz upsamples the fastest less than twice, 1000 Hz every one three times and more
    files, _ = mixed
    publish_raw_shard(local_storage, 0, files)

    def warnings(rate: float) -> list[str]:
        caplog.clear()
        if local_storage.exists(manifest_key("preprocess", 0)):
            local_storage.delete(manifest_key("preprocess", 0))
        with caplog.at_level(logging.WARNING):
            process_shard(local_storage, 0, 1, stage_config(target_rate_hz=rate, sources={"robomimic": ROBOMIMIC}))
        return [r.getMessage() for r in caplog.records if "targetRateHz" in r.getMessage()]

    assert warnings(600.0) == []
    [warning] = warnings(1000.0)
    assert re.search(r"shard 00000: targetRateHz 1000 is over 2 times the highest rate its episodes were recorded "
                     r"at \(33\d(\.\d+)? Hz\)", warning), warning
    # far below: episodes shorter than one output step are a single frame each
    [warning] = warnings(0.001)
    assert re.fullmatch(r"shard 00000: targetRateHz 0\.001 leaves (\d+) of its \1 episode\(s\) a single frame \(their "
                        r"span is under one output step of 1000 s\)", warning), warning


def test_output_round_trips_through_the_training_reader(local_storage, mixed):
    data_mod = pytest.importorskip("trajflow.train.data")
    files, episodes = mixed
    publish_raw_shard(local_storage, 0, files, shards=2)
    publish_raw_shard(local_storage, 1, {"npz/one.npz": npz_bytes(**_npz_episode(np.random.default_rng(9)))},
                      shards=2)
    for shard in (0, 1):
        process_shard(local_storage, shard, 2, stage_config(sources={"robomimic": ROBOMIMIC}))
    assert [e.shard for e in list_shards(local_storage)] == [0, 1]
    shard_set = data_mod.open_shards(local_storage, [STATE, ACTION])
    assert shard_set.rate_hz == 50.0 and shard_set.dims == {STATE: 6, ACTION: 3}
    assert len(shard_set.episodes) == len(episodes) + 1
    reader = shard_set.readers[0]
    ref = shard_set.episodes[4]
    np.testing.assert_array_equal(reader.array(ACTION)[ref.offset:ref.offset + ref.length], reader.episode(4, ACTION))


def _npz_episode(rng):
    ep = make_episode(rng, "one", 100.0, 1.0)
    return {"timestamps": ep.times, STATE: ep.streams[STATE].astype(np.float32),
            ACTION: ep.streams[ACTION].astype(np.float32)}


def _paused_npz(rng, duration_s, pause_s):
    """An npz episode of `duration_s` at 100 Hz with a pause of `pause_s` in its middle."""
    ep = make_episode(rng, "paused", 100.0, duration_s)
    times = ep.times.copy()
    times[len(times) // 2:] += pause_s
    return npz_bytes(timestamps=times, **{k: ep.streams[k].astype(np.float32) for k in (STATE, ACTION)})


def test_a_pause_filling_most_of_the_shard_is_warned_about_naming_max_gap_seconds(local_storage, caplog):
    """A recording paused for 10 minutes resamples to 30,000 frames of a straight line at
    50 Hz, the bulk of the shard: said so, with the setting that quarantines such episodes."""
    rng = np.random.default_rng(5)
    files = {f"npz/ep{i}.npz": npz_bytes(**_npz_episode(rng)) for i in range(3)}
    files["npz/paused.npz"] = _paused_npz(rng, 10.0, 600.0)
    slow = make_episode(rng, "slow", 2.0, 5.0)  # upsampled 25 times, but evenly: no pause
    files["npz/slow.npz"] = npz_bytes(timestamps=slow.times,
                                      **{k: slow.streams[k].astype(np.float32) for k in (STATE, ACTION)})
    publish_raw_shard(local_storage, 0, files)

    def warnings(**config: object) -> list[str]:
        caplog.clear()
        if local_storage.exists(manifest_key("preprocess", 0)):
            local_storage.delete(manifest_key("preprocess", 0))
        with caplog.at_level(logging.WARNING, logger="trajflow.preprocess"):
            process_shard(local_storage, 0, 1, stage_config(max_bad_fraction=0.5, **config))
        return [r.getMessage() for r in caplog.records if "maxGapSeconds" in r.getMessage()]

    [warning] = warnings()
    assert re.fullmatch(r"shard 00000: 1 episode\(s\) have a pause between two samples that resampling fills with "
                        r"more frames than they have samples, 9\d\.\d% of the shard's frames \(the widest: 600\.0\d* s "
                        r"after \d\.\d+ s in raw/00000/npz/paused\.npz episode paused, 30,000 frames\): set "
                        r"preprocessing\.config\.maxGapSeconds to quarantine such episodes", warning), warning
    quarantined = warnings(max_gap_seconds=60.0)  # the setting's own quarantine names it, and nothing else does
    assert len(quarantined) == 1 and "time_gap" in quarantined[0] and "more than maxGapSeconds 60" in quarantined[0]


def test_a_pause_filling_a_small_share_of_the_shard_is_not_warned_about(local_storage, caplog):
    rng = np.random.default_rng(7)
    long_one = make_episode(rng, "long", 100.0, 500.0)  # 25,000 frames at 50 Hz
    files = {"npz/paused.npz": _paused_npz(rng, 10.0, 25.0),  # 1,250 frames in its pause: under a tenth
             "npz/long.npz": npz_bytes(timestamps=long_one.times,
                                       **{k: long_one.streams[k].astype(np.float32) for k in (STATE, ACTION)})}
    publish_raw_shard(local_storage, 0, files)
    with caplog.at_level(logging.WARNING, logger="trajflow.preprocess"):
        process_shard(local_storage, 0, 1, stage_config())
    assert "maxGapSeconds" not in caplog.text


def test_an_episode_too_large_for_the_pods_memory_fails_the_shard_naming_why(local_storage, monkeypatch):
    """A pause upsampled to 1 kHz makes 2 million frames: in a pod of 64 MiB that is a clear
    permanent error before any allocation, not an allocator error retried to the same end."""
    from trajflow.preprocess import stage

    monkeypatch.setattr(stage, "memory_limit", lambda: 64 << 20)
    rng = np.random.default_rng(6)
    publish_raw_shard(local_storage, 0, {"npz/ep0.npz": npz_bytes(**_npz_episode(rng)),
                                         "npz/paused.npz": _paused_npz(rng, 1000.0, 1000.0)})
    with pytest.raises(PermanentError, match=r"^shard 00000: raw/00000/npz/paused\.npz episode \S+ resamples to "
                                             r"2,000,\d\d\d frames at targetRateHz 1000 \(\d+\.\d MiB\): its 100,000 "
                                             r"samples span 2000\.\d+ s, the widest gap 1000\.0\d* s after \d+\.\d+ s\. "
                                             r"Resampling "
                                             r"it needs about \d+\.\d MiB, more than the 64\.0 MiB this pod may use: "
                                             r"lower targetRateHz, set maxGapSeconds"):
        process_shard(local_storage, 0, 1, stage_config(target_rate_hz=1000.0))
    assert read_manifest(local_storage, "preprocess", 0) is None and not local_storage.exists(shard_key(0))


def test_episodes_too_long_for_float32_times_are_resampled_with_float64_ones(local_storage, caplog):
    """At 11 hours into an episode float32 steps by 3.9 ms, more than a 333 Hz sample step:
    its samples would merge. Such an episode comes out as with timeDtype float64; a short
    one is still resampled with float32 times."""
    rng = np.random.default_rng(8)
    times = np.concatenate([np.arange(20_100), 40_000 * 333 + np.arange(20_001)]) / 333
    long_one = {"timestamps": times, STATE: rng.standard_normal((times.size, 3)).cumsum(0).astype(np.float32),
                ACTION: rng.standard_normal((times.size, 2)).cumsum(0).astype(np.float32)}
    short_one = {"timestamps": times[:2_000] + 0.5 / 333, STATE: long_one[STATE][:2_000],
                 ACTION: long_one[ACTION][:2_000]}
    publish_raw_shard(local_storage, 0, {"npz/long.npz": npz_bytes(**long_one),
                                         "npz/short.npz": npz_bytes(**short_one)})

    def frames(time_dtype: str) -> dict[str, np.ndarray]:
        if local_storage.exists(manifest_key("preprocess", 0)):
            local_storage.delete(manifest_key("preprocess", 0))
        process_shard(local_storage, 0, 1, stage_config(target_rate_hz=7.0, time_dtype=time_dtype))
        reader = open_shard(local_storage.local_path(shard_key(0)))
        return {info.source.rsplit("/", 1)[1]: reader.episode_tensor(i, STATE).numpy() for i, info in
                enumerate(reader.episodes)}

    exact = frames("float64")
    with caplog.at_level(logging.INFO, logger="trajflow.preprocess"):
        fast = frames("float32")
    assert np.array_equal(fast["long.npz"], exact["long.npz"])
    assert not np.array_equal(fast["short.npz"], exact["short.npz"])  # float32 times where they suffice
    np.testing.assert_allclose(fast["short.npz"], exact["short.npz"], atol=1e-3)
    assert "shard 00000: 1 episode(s) resampled with float64 times: they are too long for timeDtype float32 to keep " \
           "their samples, or output frames, apart" in caplog.text


def test_an_output_grid_too_fine_for_float32_times_is_made_with_float64_ones(local_storage, caplog):
    """2 Hz samples over 2.3 hours are apart in float32, but a 1 kHz grid that far is not:
    its frames would repeat. That episode is resampled as with timeDtype float64."""
    rng = np.random.default_rng(9)
    times = np.arange(16_500) / 2.0
    arrays = {STATE: rng.standard_normal((times.size, 1)).cumsum(0).astype(np.float32),
              ACTION: rng.standard_normal((times.size, 1)).cumsum(0).astype(np.float32)}
    publish_raw_shard(local_storage, 0, {"npz/sparse.npz": npz_bytes(timestamps=times, **arrays)})

    def frames(time_dtype: str) -> np.ndarray:
        if local_storage.exists(manifest_key("preprocess", 0)):
            local_storage.delete(manifest_key("preprocess", 0))
        process_shard(local_storage, 0, 1, stage_config(target_rate_hz=1000.0, time_dtype=time_dtype))
        return open_shard(local_storage.local_path(shard_key(0))).episode_tensor(0, STATE).numpy()

    exact = frames("float64")
    with caplog.at_level(logging.INFO, logger="trajflow.preprocess"):
        assert np.array_equal(frames("float32"), exact)
    assert "1 episode(s) resampled with float64 times" in caplog.text


def test_bf16_shards_stay_within_bf16_tolerance(local_storage, mixed):
    files, episodes = mixed
    publish_raw_shard(local_storage, 0, files)
    process_shard(local_storage, 0, 1, stage_config(dtype="bfloat16", sources={"robomimic": ROBOMIMIC}))
    reader = open_shard(local_storage.local_path(shard_key(0)))
    assert reader.dtype == "bfloat16" and reader.tensor(ACTION).dtype == torch.bfloat16
    assert reader.array(ACTION).dtype == np.uint16
    # inputs and outputs both round to bf16 (8 significant bits): two half-ulps plus slack
    _check_against_reference(reader, episodes, 50.0, atol=1e-2, rtol=1.6e-2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_shards_are_rounded_once_on_the_cpu(tmp_path, dtype):
    """On the CPU no copy to a device is saved by packing in the shard dtype: the raw values
    are interpolated as they are and the result rounded once, whatever the batching."""
    from trajflow.preprocess.shards import as_float32

    rng = np.random.default_rng(3)
    files, eps = {}, []
    for i in range(12):
        ep = make_episode(rng, f"e{i:02d}", float(30.0 + 17 * i), 1.0)
        # large values: a half-precision ulp of the input is far beyond the interpolation's error
        ep.streams = {k: (v * 1000 + 5000).astype(np.float32).astype(np.float64) for k, v in ep.streams.items()}
        files[f"s/{ep.episode}.npz"] = npz_bytes(timestamps=ep.times, **{k: v.astype(np.float32)
                                                                         for k, v in ep.streams.items()})
        eps.append(ep)
    shards = []
    for batch_size in (1, 5, 64):
        storage = LocalStorage(tmp_path / f"batch-{batch_size}")
        publish_raw_shard(storage, 0, files)
        process_shard(storage, 0, 1, stage_config(dtype=dtype, batch_size=batch_size))
        shards.append(storage.read_bytes(shard_key(0)))
    assert shards[0] == shards[1] == shards[2]
    reader = open_shard(storage.local_path(shard_key(0)))
    for i, ep in enumerate(eps):
        for stream in (STATE, ACTION):
            ref = reference_resample(ep.times, ep.streams[stream], 50.0)
            once = torch.from_numpy(ref).float().to(getattr(torch, dtype)).double().numpy()
            got = as_float32(reader, stream, slice(reader.episodes[i].offset, reader.episodes[i].offset +
                                                   reader.episodes[i].length))
            # a nearest value of the shard dtype (ties up to the float32 interpolation's rounding)
            worse = np.abs(got - ref) > np.abs(once - ref) + 1e-6 * np.abs(ref)
            assert np.count_nonzero(worse) == 0, f"{ep.episode} {stream}: {got[worse]} for {ref[worse]}"


def test_bad_inputs_are_quarantined_and_the_rest_is_written(local_storage, tmp_path):
    files, good, expected = bad_corpus(tmp_path / "src", np.random.default_rng(1))
    publish_raw_shard(local_storage, 0, files)
    metrics = preprocess_metrics()
    summary = process_shard(local_storage, 0, 1, stage_config(max_bad_fraction=0.5), metrics)
    report = json.loads(local_storage.read_bytes(report_key(0)))
    got = {e["source"].split("/", 2)[2]: e["reason"] for e in report["entries"]}
    assert got == expected
    for entry in report["entries"]:
        assert entry["detail"]  # each reason says what exactly was wrong
    assert report["trajectories"] == len(good) + len(expected) and report["written"] == len(good)
    assert summary.quarantined == report["reasons"]
    for reason in set(expected.values()):
        assert _sample(metrics, "trajflow_preprocess_quarantined_total", {"reason": reason}) == \
            list(expected.values()).count(reason)
    reader = open_shard(local_storage.local_path(shard_key(0)))
    _check_against_reference(reader, good, 50.0, atol=2e-5)
    assert read_manifest(local_storage, "preprocess", 0)["quarantined"] == len(expected)


def test_too_many_bad_trajectories_fail_the_shard(local_storage, tmp_path, caplog):
    files, _, _ = bad_corpus(tmp_path / "src", np.random.default_rng(2), good=4)
    publish_raw_shard(local_storage, 0, files)
    with caplog.at_level(logging.WARNING, logger="trajflow.preprocess"), \
            pytest.raises(PermanentError, match=r"7 of 11 trajectories are bad .*maxBadFraction 5.0%.*report") as info:
        process_shard(local_storage, 0, 1, stage_config())
    # the first few named in the error itself (the report may lie where the on-call cannot read), each logged
    quarantined = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quarantined raw/00000/")]
    assert len(quarantined) == 7
    named = [q for q in quarantined if q.removeprefix("quarantined ") in str(info.value).split("; first: ", 1)[1]]
    assert len(named) == 3, (info.value, quarantined)
    assert read_manifest(local_storage, "preprocess", 0) is None
    assert not local_storage.exists(shard_key(0))
    report = json.loads(local_storage.read_bytes(report_key(0)))  # kept to debug the data
    assert report["quarantined"] == 7 and report["bad_fraction"] == pytest.approx(7 / 11)


def test_a_shard_without_trajectory_files_says_so(local_storage, caplog):
    """A format matching none of the raw files (CSV here) makes an empty shard, which is no
    error per shard (a shard may hold only a dataset's metadata): a warning names it."""
    publish_raw_shard(local_storage, 0, {"logs/ep0.csv": b"t,x\n0,1\n", "logs/ep1.csv": b"t,x\n0,2\n"})
    with caplog.at_level(logging.WARNING, logger="trajflow.preprocess"):
        summary = process_shard(local_storage, 0, 1, stage_config())
    assert summary.episodes == 0 and summary.ignored_files == 2
    assert any(r.getMessage().startswith("shard 00000: none of its 2 file(s) is a trajectory file preprocessing "
                                         "reads (e.g. raw/00000/logs/ep0.csv)") for r in caplog.records), caplog.text


def test_size_mismatch_and_missing_items_are_quarantined(local_storage):
    rng = np.random.default_rng(3)
    files = {f"npz/ep{i}.npz": npz_bytes(**_npz_episode(rng)) for i in range(3)}
    items = publish_raw_shard(local_storage, 0, files, sizes={"npz/ep1.npz": len(files["npz/ep1.npz"]) + 100})
    local_storage.delete(items[2]["key"])
    summary = process_shard(local_storage, 0, 1, stage_config(max_bad_fraction=1.0))
    assert summary.quarantined == {"missing_file": 1, "size_mismatch": 1} and summary.episodes == 1


def test_per_source_settings_time_key_rate_and_renames(local_storage):
    rng = np.random.default_rng(4)
    ep = make_episode(rng, "a", 40.0, 2.0)
    uniform = {"joints": ep.streams[STATE].astype(np.float32), "cmd": ep.streams[ACTION].astype(np.float32)}
    stamped = dict(uniform, clock=ep.times)
    publish_raw_shard(local_storage, 0, {"rated/x.npz": npz_bytes(**uniform), "stamped/y.npz": npz_bytes(**stamped)})
    cfg = stage_config(
        streams=["joints", "cmd"], renames={"joints": STATE, "cmd": ACTION},
        sources={"rated": {"rateHz": 40.0, "robot": "arm-a"}, "stamped": {"timeKey": "clock"}}, robot="fallback",
    )
    process_shard(local_storage, 0, 1, cfg)
    reader = open_shard(local_storage.local_path(shard_key(0)))
    assert [(e.source, e.robot, e.raw_length) for e in reader.episodes] == [
        ("raw/00000/rated/x.npz", "arm-a", ep.length), ("raw/00000/stamped/y.npz", "fallback", ep.length)]
    uniform_times = np.arange(ep.length) / 40.0
    np.testing.assert_allclose(reader.episode(0, STATE), reference_resample(uniform_times, uniform["joints"], 50.0),
                               atol=2e-5)
    np.testing.assert_allclose(reader.episode(1, ACTION), reference_resample(ep.times, stamped["cmd"], 50.0),
                               atol=2e-5)


def test_a_done_shard_is_skipped(local_storage, mixed):
    files, _ = mixed
    items = publish_raw_shard(local_storage, 0, files)
    process_shard(local_storage, 0, 1, stage_config(sources={"robomimic": ROBOMIMIC}))
    before = local_storage.read_bytes(shard_key(0))
    for it in items:  # nothing may be read again
        local_storage.delete(it["key"])
    summary = process_shard(local_storage, 0, 1, stage_config(sources={"robomimic": ROBOMIMIC}))
    assert summary.skipped and summary.episodes == 18 and summary.stale == []
    assert local_storage.read_bytes(shard_key(0)) == before


@pytest.mark.parametrize("setting, change", [({"min_length": 3}, "minLength 2 -> 3"),
                                             ({"max_gap_seconds": 30.0}, "maxGapSeconds None -> 30.0")])
def test_shards_of_other_settings_are_kept_with_a_warning_and_never_trained_on_together(local_storage, mixed,
                                                                                       caplog, setting, change):
    files, _ = mixed
    for shard in range(3):
        publish_raw_shard(local_storage, shard, files, shards=3)
    for shard in (0, 1):
        process_shard(local_storage, shard, 3, stage_config(sources={"robomimic": ROBOMIMIC}))
    # the run stopped after shard 1; the rerun changes a setting the shards' contents depend on
    changed = stage_config(sources={"robomimic": ROBOMIMIC}, **setting)
    with caplog.at_level(logging.WARNING, logger="trajflow"):
        kept = process_shard(local_storage, 0, 3, changed)
        made = process_shard(local_storage, 2, 3, changed)
    assert f"shard 00000 was made with other preprocessing.config ({change}); it is kept" in caplog.text
    # what the runner's summary reads from the shard's last log line
    assert kept.skipped and kept.to_json()["stale"] == [change] and made.stale == []
    refusal = r"resampled/_done/00002\.json: made with other preprocessing\.config than the shards before it " \
              rf"\({re.escape(change)}\)"
    with pytest.raises(PermanentError, match=refusal):
        open_shards(local_storage, ["observation.state"])
    # a first manifest from before the settings were recorded hides nothing of the others
    manifest = read_manifest(local_storage, "preprocess", 0)
    local_storage.write_bytes(manifest_key("preprocess", 0),
                              json.dumps({k: v for k, v in manifest.items() if k != "settings"}).encode())
    with pytest.raises(PermanentError, match=refusal):
        open_shards(local_storage, ["observation.state"])


def test_overrides_of_a_source_a_shard_does_not_hold_leave_the_shard_alone(local_storage, mixed, caplog):
    files, _ = mixed
    publish_raw_shard(local_storage, 0, {k: v for k, v in files.items() if k.startswith("lerobot/")}, shards=2)
    publish_raw_shard(local_storage, 1, {k: v for k, v in files.items() if not k.startswith("lerobot/")}, shards=2)
    for shard in (0, 1):
        process_shard(local_storage, shard, 2, stage_config(sources={"robomimic": ROBOMIMIC}))
    # the npz source gets a robot label: shard 1, which holds npz items, is made again with it
    labelled = stage_config(sources={"robomimic": ROBOMIMIC, "npz": {"robot": "arm"}})
    local_storage.delete(manifest_key("preprocess", 1))
    with caplog.at_level(logging.WARNING, logger="trajflow"):
        kept = process_shard(local_storage, 0, 2, labelled)
        process_shard(local_storage, 1, 2, labelled)
    assert kept.skipped and kept.stale == []
    assert "was made with other preprocessing.config" not in caplog.text
    assert len(open_shards(local_storage, ["observation.state"]).readers) == 2
    # the label on the npz items of shard 1 is what the config asks for
    robots = {(ep.source.split("/")[2], ep.robot) for ep in open_shard(storage=local_storage, key=shard_key(1)).episodes}
    assert ("npz", "arm") in robots and all(robot == "arm" for source, robot in robots if source == "npz")


def test_a_shard_whose_download_gained_items_is_made_again(local_storage, mixed, caplog):
    files, _ = mixed
    config = stage_config(sources={"robomimic": ROBOMIMIC})
    first = {k: v for k, v in files.items() if not k.startswith("npz/")}
    publish_raw_shard(local_storage, 0, first)
    assert process_shard(local_storage, 0, 1, config).episodes == 12
    # the same items under a new download manifest (a new plan of the same data): kept
    publish_raw_shard(local_storage, 0, first)
    assert process_shard(local_storage, 0, 1, config).skipped
    # new sources (or a new plan that found more objects): the shard holds the new data
    publish_raw_shard(local_storage, 0, files)
    with caplog.at_level(logging.WARNING, logger="trajflow"):
        summary = process_shard(local_storage, 0, 1, config)
    assert not summary.skipped and summary.episodes == 18
    assert "shard 00000 was made from other raw items than download shard 00000 holds now" in caplog.text
    assert read_manifest(local_storage, "preprocess", 0)["num_episodes"] == 18


def test_a_shard_is_made_only_from_the_download_of_the_expected_generation(local_storage, mixed):
    """Installed again with another dataset under the same run id, a preprocessing pod may
    start before the download pods have planned: the earlier dataset's download and done
    shard must not pass for this one's."""
    files, _ = mixed
    config = stage_config(sources={"robomimic": ROBOMIMIC})
    first = {k: v for k, v in files.items() if not k.startswith("npz/")}
    publish_raw_shard(local_storage, 0, first, generation="aaa")
    with pytest.raises(TransientError, match="download shard 00000 records generation 'aaa', not 'bbb' of the "
                                             "downloader.config in use"):
        process_shard(local_storage, 0, 1, config, download_generation="bbb")
    assert read_manifest(local_storage, "preprocess", 0) is None
    assert process_shard(local_storage, 0, 1, config, download_generation="aaa").episodes == 12
    made = read_manifest(local_storage, "preprocess", 0)
    assert made["download_generation"] == "aaa"
    shard_bytes = local_storage.read_bytes(shard_key(0))
    # the earlier dataset's done shard is not this one's, while its download is not redone
    with pytest.raises(TransientError, match="records generation 'aaa', not 'bbb'"):
        process_shard(local_storage, 0, 1, config, download_generation="bbb")
    assert read_manifest(local_storage, "preprocess", 0) == made
    # the new generation planned the same items: the shard is kept, and says whose it is now
    publish_raw_shard(local_storage, 0, first, generation="bbb")
    assert process_shard(local_storage, 0, 1, config, download_generation="bbb").skipped
    assert read_manifest(local_storage, "preprocess", 0) == {**made, "download_generation": "bbb"}
    assert local_storage.read_bytes(shard_key(0)) == shard_bytes
    # a done shard whose download is gone (raw data removed) stands for its own generation only
    local_storage.delete(manifest_key("download", 0))
    assert process_shard(local_storage, 0, 1, config, download_generation="bbb").skipped
    with pytest.raises(TransientError, match="shard 00000 was made from download generation 'bbb', and download shard "
                                             "00000 of this config's generation 'ccc' is not done"):
        process_shard(local_storage, 0, 1, config, download_generation="ccc")


@pytest.mark.parametrize("shards", [1, 2])
def test_a_download_redone_while_its_shard_is_made_leaves_nothing_written(local_storage, mixed, monkeypatch, shards):
    """A pod of a replaced Job still running beside the new Job's: the download shard it read
    was redone meanwhile (another shard count, or other items). Its shard must not replace
    the new one, nor its manifest say the shard is done."""
    from trajflow.preprocess.stage import ShardProcessor

    files, _ = mixed
    config = stage_config(sources={"robomimic": ROBOMIMIC})
    first = {k: v for k, v in files.items() if not k.startswith("npz/")}
    publish_raw_shard(local_storage, 0, first)
    check = ShardProcessor._check_bad_fraction

    def redone_meanwhile(self):
        publish_raw_shard(local_storage, 0, files if shards == 1 else first, shards=shards)
        check(self)

    monkeypatch.setattr(ShardProcessor, "_check_bad_fraction", redone_meanwhile)
    change = "with other items" if shards == 1 else "for 2 shards"
    with pytest.raises(TransientError, match=f"download shard 00000 changed while it was preprocessed .it was written "
                                             f"again {change}.: nothing was written"):
        process_shard(local_storage, 0, 1, config)
    assert read_manifest(local_storage, "preprocess", 0) is None and not local_storage.exists(shard_key(0))


def test_a_shard_made_before_generations_were_recorded_learns_its_download(local_storage, mixed):
    files, _ = mixed
    config = stage_config(sources={"robomimic": ROBOMIMIC})
    first = {k: v for k, v in files.items() if not k.startswith("npz/")}
    publish_raw_shard(local_storage, 0, first, generation="aaa")
    process_shard(local_storage, 0, 1, config)  # no generation expected: any download will do
    made = read_manifest(local_storage, "preprocess", 0)
    del made["download_generation"]
    local_storage.write_bytes(manifest_key("preprocess", 0), json.dumps(made).encode())
    # training waits for shards of its download's generation: the skip records it
    assert process_shard(local_storage, 0, 1, config, download_generation="aaa").skipped
    assert read_manifest(local_storage, "preprocess", 0) == {**made, "download_generation": "aaa"}
    # without the generation, and its download gone: not taken for the one expected
    local_storage.write_bytes(manifest_key("preprocess", 0), json.dumps(made).encode())
    raw_manifest = local_storage.read_bytes(manifest_key("download", 0))
    local_storage.delete(manifest_key("download", 0))
    with pytest.raises(TransientError, match="was made from a download it does not record, and download shard 00000 of this "):
        process_shard(local_storage, 0, 1, config, download_generation="aaa")
    local_storage.write_bytes(manifest_key("download", 0), raw_manifest)
    # older still, without the digest of its raw items: which download it came from is unknown
    del made["raw_digest"]
    local_storage.write_bytes(manifest_key("preprocess", 0), json.dumps(made).encode())
    summary = process_shard(local_storage, 0, 1, config, download_generation="aaa")
    assert not summary.skipped and summary.episodes == 12
    assert read_manifest(local_storage, "preprocess", 0)["download_generation"] == "aaa"


def test_a_torn_manifest_is_replaced_by_making_the_shard_again(local_storage, mixed, caplog):
    files, _ = mixed
    publish_raw_shard(local_storage, 0, files)
    config = stage_config(sources={"robomimic": ROBOMIMIC})
    process_shard(local_storage, 0, 1, config)
    before, key = local_storage.read_bytes(shard_key(0)), manifest_key("preprocess", 0)
    manifest = local_storage.read_bytes(key)
    local_storage.write_bytes(key, manifest[: len(manifest) // 2])
    with caplog.at_level(logging.WARNING, logger="trajflow"):
        summary = process_shard(local_storage, 0, 1, config)
    assert not summary.skipped and summary.episodes == 18
    assert "resampled/_done/00000.json: corrupt manifest" in caplog.text
    assert local_storage.read_bytes(shard_key(0)) == before
    assert read_manifest(local_storage, "preprocess", 0)["num_episodes"] == 18


def test_a_torn_download_manifest_is_retryable_and_named(local_storage, mixed):
    publish_raw_shard(local_storage, 0, mixed[0])
    local_storage.write_bytes(manifest_key("download", 0), b'{"version": 1, "ite')
    with pytest.raises(TransientError, match=r"raw/_done/00000.json: corrupt manifest: .*rerun download shard 00000"):
        process_shard(local_storage, 0, 1, stage_config(sources={"robomimic": ROBOMIMIC}))


def _processed(root, files, config, kind=LocalStorage):
    """A storage at ``root`` holding ``files`` as raw shard 0, processed with ``config``."""
    storage = kind(root)
    publish_raw_shard(storage, 0, files)
    process_shard(storage, 0, 1, config)
    return storage


def test_read_ahead_is_bounded_by_the_files_bytes_one_file_at_least():
    from trajflow.preprocess.stage import ordered_map

    sizes = [30, 50, 10, 200, 20, 20, 20, 20, 60]
    items = [(f"f{i}", size) for i, size in enumerate(sizes)]

    def run(**bounds):
        """The results, and at each hand-over the other files started and not yet handed over."""
        lock, started, ahead = threading.Lock(), [], []

        def read(item):
            with lock:
                started.append(item)
            time.sleep(0.01)
            return item

        results = []
        for item in ordered_map(read, items, workers=4, lookahead=8, **bounds):
            with lock:
                results.append(item)
                ahead.append([it for it in started if it not in results])
        return results, ahead

    results, ahead = run(cost=lambda it: it[1], budget=100)
    assert results == items
    for others in ahead:  # within the budget, or one file alone that exceeds it (f3 is read too)
        assert sum(size for _, size in others) <= 100 or len(others) == 1, others
    # the count alone lets more bytes ahead: the bound above binds
    results, ahead = run()
    assert results == items and max(sum(size for _, size in others) for others in ahead) > 100


@pytest.mark.parametrize("stop", [Terminated(15), OSError(5, "the writer's disk failed")])
def test_a_stop_or_an_error_does_not_wait_for_reads_in_flight(stop):
    """A SIGTERM (or an error) while reads are stalled (a GET of minutes) goes on at once: the
    reads are left to end on their own, on daemon threads that do not hold the process up at
    its exit, so the stage pushes its last metrics within the pod's grace period."""
    from trajflow.preprocess.stage import ordered_map

    release = threading.Event()
    safety = threading.Timer(60, release.set)  # unblocks the stalled reads whatever happens
    safety.daemon = True
    safety.start()
    reading = []

    def read(item):
        if item:
            reading.append(threading.current_thread())
            release.wait()
        return item

    try:
        with pytest.raises(type(stop)):
            for _ in ordered_map(read, range(4), workers=3, lookahead=4):
                while len(reading) < 3:
                    time.sleep(0.01)
                raise stop
        assert not release.is_set(), "the stop waited for the stalled reads"
        assert all(thread.daemon and thread.is_alive() for thread in reading)
    finally:
        release.set()
        safety.cancel()
    for thread in reading:
        thread.join(timeout=10)
        assert not thread.is_alive()  # each ends with its read


def test_a_read_ahead_of_one_file_changes_no_byte(tmp_path, mixed, monkeypatch):
    from trajflow.preprocess import stage

    files, _ = mixed
    costs = []
    ordered_map = stage.ordered_map

    def one_file_ahead(fn, items, workers, lookahead, cost, budget, held, name):
        assert budget == 1024 << 20  # the config's readAheadMib
        items = list(items)
        costs.append({w.key.split("/", 2)[2]: cost(w) for w in items})  # raw/<shard>/<file>
        return ordered_map(fn, items, workers, lookahead, cost=cost, budget=1, held=held, name=name)  # every file alone

    storage = _processed(tmp_path / "ahead", files, stage_config(read_workers=2, sources={"robomimic": ROBOMIMIC}),
                         LocalStorage)
    monkeypatch.setattr(stage, "ordered_map", one_file_ahead)
    alone = _processed(tmp_path / "alone", files, stage_config(read_workers=2, sources={"robomimic": ROBOMIMIC}),
                       LocalStorage)
    assert alone.read_bytes(shard_key(0)) == storage.read_bytes(shard_key(0))
    # before any file is read, each costs its size, HDF5 (read by ranges) too
    (cost,) = costs
    assert cost == {name: len(files[name]) for name in cost}
    assert any(name.endswith(".hdf5") for name in cost)


def test_a_finished_read_counts_what_its_result_holds_until_it_is_handed_over():
    """With `held`, a result waiting for the consumer counts against the budget by what it
    holds, not by the estimate it started with: no further file is read past the budget."""
    from trajflow.preprocess.stage import ordered_map

    second_done, started = threading.Event(), []
    estimate, holds = {0: 40, 1: 40, 2: 40, 3: 40}, {0: 5, 1: 90, 2: 5, 3: 5}

    def read(item):
        started.append(item)
        if item == 0:  # handed over only once item 1 has finished and holds 90
            second_done.wait(5)
            time.sleep(0.2)
        if item == 1:
            second_done.set()
        return item

    def run(**bounds):
        started.clear()
        second_done.clear()
        handed = ordered_map(read, range(4), workers=4, lookahead=8, cost=estimate.get, budget=100, **bounds)
        assert next(handed) == 0
        time.sleep(0.2)  # for any read started as item 0 was handed over
        ahead = list(started)
        assert list(handed) == [1, 2, 3]
        return ahead

    # 90 held by item 1 and the 40 item 2 would cost exceed 100: item 2 waits for item 1's hand-over
    assert run(held=lambda item, result: holds[item]) == [0, 1]
    # by the estimates alone, 40 + 40 fit: item 2 starts at once
    assert run() == [0, 1, 2]


def test_files_read_in_part_are_charged_what_the_earlier_ones_held_per_byte():
    from trajflow.preprocess.readers import FileResult, Quarantined, RawEpisode
    from trajflow.preprocess.stage import _ReadAhead, _Work

    def work(fmt, size, source="s", whole_allowed=True):  # the reading settings play no part
        return _Work(key=f"raw/00000/{source}/f.{fmt}", size=size, format=fmt, spec=None, robot_hint="",
                     whole_allowed=whole_allowed)

    def result(frames):
        episode = RawEpisode(source="s", episode="e", robot="", start_time=0.0, times=np.arange(frames, dtype=np.float64),
                             frames=np.zeros((frames, 3), np.float32), dims={"obs": 3})
        return FileResult(key="k", size=1, outcomes=[episode, Quarantined("s", "bad", "too_short", "")])

    ahead = _ReadAhead()
    hdf5, npz = work("hdf5", 8000), work("npz", 3000)
    assert ahead.estimate(hdf5) == 8000 and ahead.estimate(npz) == 3000  # nothing read yet: their sizes
    # a file lost whole, or without episodes, teaches nothing: the next is not free
    lost = FileResult(key="k", size=0, outcomes=[Quarantined("s", "", "truncated", "cut")])
    assert ahead.held(hdf5, lost) == 0 and ahead.held(hdf5, FileResult(key="k", size=8000)) == 0
    assert ahead.estimate(work("hdf5", 4000)) == 4000
    assert ahead.held(hdf5, result(100)) == 100 * (8 + 12)  # float64 times, three float32 values a frame
    assert ahead.held(npz, result(1000)) == 1000 * 20  # a file read whole teaches nothing about the others
    assert ahead.estimate(work("hdf5", 4000)) == 1000  # 2000 held of 8000 bytes
    assert ahead.estimate(npz) == 3000
    # another format, or another source, yields its own share of its bytes
    assert ahead.estimate(work("parquet", 4000, whole_allowed=False)) == 4000
    assert ahead.estimate(work("hdf5", 4000, source="images")) == 4000


def test_read_workers_follow_the_cpu_budget_and_never_change_the_bytes(tmp_path, mixed, monkeypatch):
    from trajflow.preprocess import stage

    files, _ = mixed
    used = []
    ordered_map = stage.ordered_map

    def recording(fn, items, workers, lookahead, **bounds):
        used.append(workers)
        return ordered_map(fn, items, workers, lookahead, **bounds)

    monkeypatch.setattr(stage, "ordered_map", recording)
    monkeypatch.setattr(stage, "cpu_budget", lambda: 6)  # a pod limited to 6 CPUs
    class OverTheNetwork(LocalStorage):  # what object storage looks like to the stage
        def local_path(self, key):
            return None

    shards = []
    for read_workers, kind in ((0, LocalStorage), (1, LocalStorage), (0, OverTheNetwork)):
        storage = _processed(tmp_path / f"workers-{read_workers}-{kind.__name__}", files,
                             stage_config(read_workers=read_workers, sources={"robomimic": ROBOMIMIC}), kind)
        shards.append(storage.read_bytes(shard_key(0)))
    # npz and HDF5 hold the GIL: local files are read on the main thread, remote ones by
    # half the budget (their network waits overlap)
    assert used == [0, 1, 3]
    assert shards[0] == shards[1] == shards[2]
    parquet = {k: v for k, v in files.items() if k.endswith(".parquet")}
    storage = LocalStorage(tmp_path / "parquet")
    publish_raw_shard(storage, 0, parquet)
    process_shard(storage, 0, 1, stage_config(read_workers=0))
    assert used[-1] == 6  # parquet decodes with the GIL released: a thread per CPU
    monkeypatch.setattr(stage, "cpu_budget", lambda: 96)  # no CPU limit: the whole node
    storage = LocalStorage(tmp_path / "parquet-96")
    publish_raw_shard(storage, 0, parquet)
    process_shard(storage, 0, 1, stage_config(read_workers=0))
    assert used[-1] == 16


def test_a_manifest_without_sizes_gives_the_same_shard(tmp_path, mixed, monkeypatch):
    from trajflow.storage import manifest_key

    files, _ = mixed
    config = stage_config(sources={"robomimic": ROBOMIMIC})
    sized = _processed(tmp_path / "sized", files, config)
    unsized = LocalStorage(tmp_path / "unsized")
    publish_raw_shard(unsized, 0, files)
    doc = json.loads(unsized.read_bytes(manifest_key("download", 0)))
    doc["items"] = [item["key"] for item in doc["items"]]  # bare keys: the size comes from the file
    unsized.write_bytes(manifest_key("download", 0), json.dumps(doc).encode())
    whole = []
    read_bytes = LocalStorage.read_bytes
    monkeypatch.setattr(LocalStorage, "read_bytes", lambda self, key: whole.append(key) or read_bytes(self, key))
    process_shard(unsized, 0, 1, config)
    assert unsized.read_bytes(shard_key(0)) == sized.read_bytes(shard_key(0))
    assert any(k.endswith(".npz") for k in whole) and not any(k.endswith(".hdf5") for k in whole)


def test_the_writer_thread_a_gpu_uses_writes_the_same_bytes_and_hands_back_its_errors(tmp_path, mixed, monkeypatch):
    from trajflow.preprocess import stage
    from trajflow.preprocess.shards import ShardWriter

    files, _ = mixed
    config = stage_config(sources={"robomimic": ROBOMIMIC})
    inline = _processed(tmp_path / "inline", files, config)
    threads = []
    init = stage._OrderedWriter.__init__

    def threaded(self, *args, threaded):  # on the CPU too, as on a GPU
        init(self, *args, threaded=True)
        threads.append(self.thread)

    monkeypatch.setattr(stage._OrderedWriter, "__init__", threaded)
    on_thread = _processed(tmp_path / "thread", files, config)
    assert threads and threads[0] is not None and not threads[0].is_alive()
    assert on_thread.read_bytes(shard_key(0)) == inline.read_bytes(shard_key(0))

    add = ShardWriter.add
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")  # the disk failing under the writer thread
        return add(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "add", failing)
    broken = LocalStorage(tmp_path / "broken")
    publish_raw_shard(broken, 0, files)
    with pytest.raises(TransientError, match="storage error: OSError"):
        process_shard(broken, 0, 1, config)
    assert not threads[-1].is_alive()
    assert read_manifest(broken, "preprocess", 0) is None and not broken.exists(shard_key(0))


def test_a_shard_whose_index_outgrows_a_safetensors_header_is_refused_not_published(tmp_path, mixed, monkeypatch):
    """Hundreds of thousands of tiny episodes: a shard over the header limit would be done,
    and unreadable by training and by the safetensors library."""
    from trajflow.preprocess import shards

    files, _ = mixed
    config = stage_config(sources={"robomimic": ROBOMIMIC})
    storage = LocalStorage(tmp_path / "many")
    publish_raw_shard(storage, 0, files)
    monkeypatch.setattr(shards, "MAX_HEADER_BYTES", 2000)  # a few episodes' index
    with pytest.raises(PermanentError, match=r"the index of this shard's \d+ episodes takes .* MB, more than the 0 MB "
                                             r"a safetensors header may: use more shards"):
        process_shard(storage, 0, 1, config)
    assert read_manifest(storage, "preprocess", 0) is None and not storage.exists(shard_key(0))


@pytest.mark.parametrize("failing", ["report.json", "_done/"])
def test_a_full_disk_at_the_report_or_manifest_is_a_storage_error_and_no_manifest(tmp_path, mixed, monkeypatch,
                                                                                   failing):
    import errno

    files, _ = mixed
    config = stage_config(sources={"robomimic": ROBOMIMIC})
    storage = LocalStorage(tmp_path / "full")
    publish_raw_shard(storage, 0, files)
    write_bytes = LocalStorage.write_bytes

    def full(self, key, data, *args, **kwargs):
        if failing in key:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.root / key))
        return write_bytes(self, key, data, *args, **kwargs)

    monkeypatch.setattr(LocalStorage, "write_bytes", full)
    with pytest.raises(TransientError, match="storage error: OSError: .*No space left on device"):
        process_shard(storage, 0, 1, config)
    assert read_manifest(storage, "preprocess", 0) is None


def test_files_read_whole_are_prefetched_a_bounded_window_ahead(tmp_path, mixed, monkeypatch):
    from trajflow.preprocess import stage

    files, _ = mixed
    events: list[tuple[str, str]] = []

    class Recording(LocalStorage):
        def prefetch(self, key):
            events.append(("prefetch", key))
            super().prefetch(key)

    ordered_map = stage.ordered_map

    def recording_map(fn, items, workers, lookahead, **bounds):
        def pulled():
            for w in items:
                events.append(("handed", w.key))  # to the readers
                yield w
        return ordered_map(fn, pulled(), workers, lookahead, **bounds)

    whole = sorted(k for k in files if k.endswith((".npz", ".parquet")) and "/meta/" not in k)  # trajectories
    big = max(whole, key=lambda k: len(files[k]))
    window = max(len(files[k]) for k in whole if k != big)  # every file read whole fits, but the largest
    monkeypatch.setattr(stage, "_PREFETCH_BYTES", window)
    monkeypatch.setattr(stage, "ordered_map", recording_map)
    storage = Recording(tmp_path / "root")
    items = publish_raw_shard(storage, 0, files)
    process_shard(storage, 0, 1, stage_config(read_workers=1, sources={"robomimic": ROBOMIMIC}))
    size = {it["key"]: it["size"] for it in items}
    keys = {k: f"raw/00000/{k}" for k in files}
    hinted_keys = [k for kind, k in events if kind == "prefetch"]
    assert hinted_keys == [keys[k] for k in whole if k != big]  # not HDF5 (read in part), nor one past the window
    assert sum(size[k] for k in hinted_keys) > 2 * window  # so that the bound below can fail
    hinted, handed = set(), set()
    for kind, key in events:
        (hinted if kind == "prefetch" else handed).add(key)
        if kind == "handed" and key in hinted_keys:
            assert key in hinted  # asked for before the readers get it
        assert sum(size[k] for k in hinted - handed) < 2 * window  # the window, plus the file that crossed it


def test_a_smaller_shard_count_redoes_the_shards_and_drops_the_others(local_storage, mixed):
    files, episodes = mixed
    names = sorted(files)
    halves = [{k: files[k] for k in names[::2]}, {k: files[k] for k in names[1::2]}]
    cfg = stage_config(sources={"robomimic": ROBOMIMIC})
    for shard, part in enumerate(halves):
        publish_raw_shard(local_storage, shard, part, shards=2)
        process_shard(local_storage, shard, 2, cfg)
    assert [e.shard for e in list_shards(local_storage)] == [0, 1]

    # the downloader re-shards everything into one shard: shard 1's output must not be read again
    local_storage.delete(manifest_key("download", 1))
    publish_raw_shard(local_storage, 0, files, shards=1)
    summary = process_shard(local_storage, 0, 1, cfg)
    assert not summary.skipped and summary.episodes == len(episodes)
    assert [(e.shard, read_manifest(local_storage, "preprocess", e.shard)["shards"])
            for e in list_shards(local_storage)] == [(0, 1)]
    # nor take room: its shard and report are gone with its manifest
    assert sorted(i.key for i in local_storage.list("resampled/")) == sorted(
        [manifest_key("preprocess", 0), report_key(0), shard_key(0)])


def test_a_pod_of_another_shard_count_waits_and_touches_nothing(local_storage, mixed):
    files, _ = mixed
    names = sorted(files)
    cfg = stage_config(sources={"robomimic": ROBOMIMIC})
    for shard in range(4):
        publish_raw_shard(local_storage, shard, {k: files[k] for k in names[shard::4]}, shards=4)
        process_shard(local_storage, shard, 4, cfg)
    before = {s: local_storage.read_bytes(manifest_key("preprocess", s)) for s in range(4)}
    # a leftover pod (or a local run) that still believes in 2 shards
    with pytest.raises(TransientError, match=r"download shard 00000 was written for 4 shards, this run has 2"):
        process_shard(local_storage, 0, 2, cfg)
    assert {s: local_storage.read_bytes(manifest_key("preprocess", s)) for s in range(4)} == before


def test_download_not_done_is_retryable(local_storage):
    with pytest.raises(TransientError, match=r"download shard 00000 is not done .*raw/_done/00000.json"):
        process_shard(local_storage, 0, 1, stage_config())
    assert TransientError.exit_code == ExitCode.TRANSIENT


def test_s3_root_gives_the_same_bytes_as_a_filesystem_root(s3_storage, local_storage, mixed, tmp_path):
    files, episodes = mixed
    cfg = stage_config(sources={"robomimic": ROBOMIMIC})
    for st in (s3_storage, local_storage):
        publish_raw_shard(st, 0, files)
        process_shard(st, 0, 1, cfg)
    assert s3_storage.read_bytes(shard_key(0)) == local_storage.read_bytes(shard_key(0))
    reader = open_shard(storage=s3_storage, key=shard_key(0), cache_dir=tmp_path / "cache")
    _check_against_reference(reader, episodes, 50.0, atol=2e-5)


def test_a_killed_runs_upload_of_the_shard_is_aborted_and_no_other_shards(s3_storage, mixed, monkeypatch):
    """An upload a killed pod began is never visible, but stored and billed until aborted.
    Shard 0 also aborts those of shard numbers this count lacks; a young upload may be a
    live writer's."""
    from trajflow.preprocess import stage

    files, _ = mixed
    publish_raw_shard(s3_storage, 0, files, shards=2)
    client = s3_storage.client

    def uploads() -> list[str]:
        listed = client.list_multipart_uploads(Bucket=s3_storage.bucket, Prefix=f"{s3_storage.prefix}/")
        return sorted(u["Key"][len(s3_storage.prefix) + 1:] for u in listed.get("Uploads", []))

    for key in (shard_key(0), shard_key(1), shard_key(2)):
        client.create_multipart_upload(Bucket=s3_storage.bucket, Key=f"{s3_storage.prefix}/{key}")
    config = stage_config(sources={"robomimic": ROBOMIMIC})
    process_shard(s3_storage, 0, 2, config)
    assert uploads() == [shard_key(0), shard_key(1), shard_key(2)]
    monkeypatch.setattr(stage, "STALE_UPLOAD_S", 0.0)
    s3_storage.delete(manifest_key("preprocess", 0))
    process_shard(s3_storage, 0, 2, config)
    assert uploads() == [shard_key(1)]
    assert read_manifest(s3_storage, "preprocess", 0) is not None


def test_hdf5_on_s3_is_read_by_ranges_not_whole(s3_storage, tmp_path, monkeypatch):
    """A robomimic file of images nobody selected costs its selected datasets, not its
    size; a store failing under h5py is a storage error, not a bad file."""
    import h5py

    from preprocess_data import write_robomimic

    from trajflow.preprocess import readers

    rng = np.random.default_rng(8)
    episodes = [make_episode(rng, str(i), rate, 2.0) for i, rate in enumerate((30.0, 100.0))]
    path = tmp_path / "demos.hdf5"
    write_robomimic(path, episodes)
    with h5py.File(path, "a") as f:  # camera frames, which the config does not select
        f["data/demo_0/obs"].create_dataset("agentview_image", data=rng.integers(0, 255, (200, 128, 128, 3), np.uint8))
    raw = path.read_bytes()
    assert len(raw) > 9_000_000
    publish_raw_shard(s3_storage, 0, {"robomimic/demos.hdf5": raw})
    monkeypatch.setattr(readers, "RANGED_READ_ABOVE", 1 << 20)  # files above 1 MiB by ranges
    read_bytes = type(s3_storage).read_bytes
    monkeypatch.setattr(type(s3_storage), "read_bytes",
                        lambda self, key: pytest.fail(f"{key} read whole") if key.endswith(".hdf5") else read_bytes(self, key))
    fetched = []
    read_range = type(s3_storage).read_range
    monkeypatch.setattr(type(s3_storage), "read_range",
                        lambda self, key, start, end=None: fetched.append(end - start) or read_range(self, key, start, end))
    summary = process_shard(s3_storage, 0, 1, stage_config(sources={"robomimic": ROBOMIMIC}))
    assert summary.episodes == 2
    assert sum(fetched) < len(raw) / 4  # the image dataset was never read

    s3_storage.delete(manifest_key("preprocess", 0))

    def failing(self, key, start, end=None):
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(type(s3_storage), "read_range", failing)
    with pytest.raises(TransientError, match="storage error: ConnectionResetError"):
        process_shard(s3_storage, 0, 1, stage_config(sources={"robomimic": ROBOMIMIC}))


def test_a_store_failing_under_h5py_exits_with_the_storage_error_code(tmp_path, mixed):
    """The error kept from a ranged read under h5py must not live on in a reference cycle
    until the interpreter's exit, which freed h5py objects after h5py (SIGSEGV, 139)."""
    import subprocess
    import sys

    files, _ = mixed
    publish_raw_shard(LocalStorage(tmp_path / "root"), 0, {k: v for k, v in files.items() if k.startswith("robomimic/")})
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from preprocess_data import stage_config
from trajflow.errors import TrajflowError
from trajflow.preprocess import readers
from trajflow.preprocess.stage import process_shard
from trajflow.storage import LocalStorage

readers.RANGED_READ_ABOVE = 0  # every file by ranges

class Remote(LocalStorage):  # an object store: no local paths, ranged reads that fail
    def local_path(self, key):
        return None
    def read_range(self, key, start, end=None):
        raise ConnectionResetError(104, "Connection reset by peer")

try:
    process_shard(Remote({str(tmp_path / "root")!r}), 0, 1, stage_config(sources={{"robomimic": {ROBOMIMIC!r}}}))
except TrajflowError as exc:
    print(exc)
    sys.exit(int(exc.exit_code))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == ExitCode.TRANSIENT, result.stdout + result.stderr
    assert "storage error: ConnectionResetError" in result.stdout


def test_triton_backend_in_the_stage(local_storage):
    """The stage drives the Triton kernel the same way on CUDA; here through its interpreter."""
    pytest.importorskip("triton")
    rng = np.random.default_rng(6)
    eps = [make_episode(rng, str(i), rate, 0.5) for i, rate in enumerate((30.0, 333.0, 125.0))]
    files = {f"npz/e{i}.npz": npz_bytes(timestamps=e.times, **{STATE: e.streams[STATE].astype(np.float32),
                                                                ACTION: e.streams[ACTION].astype(np.float32)})
             for i, e in enumerate(eps)}
    publish_raw_shard(local_storage, 0, files)
    process_shard(local_storage, 0, 1, stage_config(backend="triton", batch_size=2))
    reader = open_shard(local_storage.local_path(shard_key(0)))
    for i, e in enumerate(eps):
        ref = reference_resample(e.times, e.streams[ACTION].astype(np.float32), 50.0)
        np.testing.assert_allclose(reader.episode(i, ACTION), ref, atol=2e-5)


@pytest.mark.gpu
def test_cuda_matches_the_cpu_result(tmp_path, mixed):
    files, episodes = mixed
    results = {}
    for device in ("cpu", "cuda"):
        st = LocalStorage(tmp_path / device)
        publish_raw_shard(st, 0, files)
        process_shard(st, 0, 1, stage_config(device=device, sources={"robomimic": ROBOMIMIC}))
        results[device] = open_shard(st.local_path(shard_key(0)))
    _check_against_reference(results["cuda"], episodes, 50.0, atol=2e-5)
    assert results["cuda"].index["episodes"] == results["cpu"].index["episodes"]


# ------------------------------------------------------------------- the command


def _cli(values: Path, env_extra: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    env = dict(os.environ, JOB_COMPLETION_INDEX="0", TRAJFLOW_SHARDS="1", TRAJFLOW_LOG_FORMAT="json",
               TRAJFLOW_LOG_LEVEL="DEBUG", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "trajflow.cli", "preprocess", "--config", str(values)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _many_small_episodes(count: int) -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    return {f"npz/e{i:04d}.npz": npz_bytes(**_npz_episode(rng)) for i in range(count)}


def test_killed_mid_shard_leaves_nothing_and_the_rerun_is_identical(tmp_path):
    files = _many_small_episodes(240)
    config = {"device": "cpu", "batchSize": 1, "readWorkers": 1, "sortWindowBatches": 1}
    roots = {}
    for name in ("killed", "clean"):
        roots[name] = tmp_path / name
        publish_raw_shard(LocalStorage(roots[name] / "test"), 0, files)
    killed_values = write_values(tmp_path / "killed.yaml", roots["killed"], config)

    proc = _cli(killed_values)
    written = 0
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # the writer logs each batch it has spooled
        if '"batch ' in line and "written" in line:
            written += 1
            if written == 5:
                proc.send_signal(signal.SIGKILL)
                break
        assert time.monotonic() < deadline, "the stage never reported a written batch"
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the stage finished before it could be killed mid-shard"
    killed = LocalStorage(roots["killed"] / "test")
    assert read_manifest(killed, "preprocess", 0) is None
    assert not killed.exists(shard_key(0))  # no partial shard under its name
    assert [i.key for i in killed.list("resampled")] == []

    rerun = _cli(killed_values)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    # an uninterrupted run with other batching and threads, in this process
    process_shard(LocalStorage(roots["clean"] / "test"), 0, 1,
                  stage_config(batch_size=64, read_workers=3, sort_window_batches=2))
    # same bytes, whatever the batching, threads, or the interruption
    assert killed.read_bytes(shard_key(0)) == LocalStorage(roots["clean"] / "test").read_bytes(shard_key(0))
    assert killed.read_bytes(report_key(0)) == LocalStorage(roots["clean"] / "test").read_bytes(report_key(0))


def test_sigterm_stops_the_shard_with_a_final_push(tmp_path, pushgateway):
    """SIGTERM (the kubelet, `trajflow run`) unwinds like Ctrl-C: nothing is published and
    the last push says the shard ended without success, so no panel shows it running."""
    root = tmp_path / "root"
    publish_raw_shard(LocalStorage(root / "test"), 0, _many_small_episodes(240))
    values = write_values(tmp_path / "v.yaml", root, {"device": "cpu", "batchSize": 1, "readWorkers": 1,
                                                      "sortWindowBatches": 1}, pushgateway_url=pushgateway.url)
    proc = _cli(values)
    assert proc.stderr is not None
    for line in proc.stderr:
        if '"batch ' in line and "written" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by signal 15" in err and "Traceback" not in err
    assert read_manifest(LocalStorage(root / "test"), "preprocess", 0) is None
    pushed = {s.name: s.value for f in text_string_to_metric_families(pushgateway.metrics_text()) for s in f.samples
              if s.labels.get("stage") == "preprocess"}
    assert pushed["trajflow_stage_end_time_seconds"] > 0 and pushed["trajflow_stage_success"] == 0
    assert pushed["trajflow_stage_interrupted"] == 1  # not failed: the failed-shard alert leaves it alone


def test_exit_codes_follow_the_pod_failure_policy(tmp_path):
    root = tmp_path / "root"
    storage = LocalStorage(root / "test")
    missing = _cli(write_values(tmp_path / "a.yaml", root, {"device": "cpu"}))
    _, err = missing.communicate(timeout=120)
    assert missing.returncode == ExitCode.TRANSIENT and "download shard 00000 is not done" in err

    files, _, _ = bad_corpus(tmp_path / "src", np.random.default_rng(8), good=2)
    publish_raw_shard(storage, 0, files)
    bad = _cli(write_values(tmp_path / "b.yaml", root, {"device": "cpu"}))
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == ExitCode.PERMANENT and "trajectories are bad" in err

    config_error = _cli(write_values(tmp_path / "c.yaml", root, {"targetRateHz": -1}))
    _, err = config_error.communicate(timeout=120)
    assert config_error.returncode == ExitCode.CONFIG and "targetRateHz" in err
    assert read_manifest(storage, "preprocess", 0) is None
    assert manifest_key("preprocess", 0) == "resampled/_done/00000.json"


def test_a_shard_failed_for_good_is_recorded_for_training_until_its_next_attempt(local_storage, tmp_path):
    from trajflow.config import GlobalConfig, StageSettings
    from trajflow.preprocess.stage import run_shard
    from trajflow.storage.manifest import read_failure

    files, _, _ = bad_corpus(tmp_path / "src", np.random.default_rng(2), good=4)
    publish_raw_shard(local_storage, 0, files)
    settings = StageSettings(GlobalConfig.model_validate({"runId": "pp"}), stage_config(), 0, 1)
    with pytest.raises(PermanentError) as info:
        run_shard(settings, storage=local_storage)
    record = read_failure(local_storage, "preprocess", 0)
    assert record is not None and record["error"] == str(info.value) and record["shards"] == 1

    settings = StageSettings(GlobalConfig.model_validate({"runId": "pp"}), stage_config(max_bad_fraction=1.0), 0, 1)
    run_shard(settings, storage=local_storage)
    assert read_failure(local_storage, "preprocess", 0) is None and read_manifest(local_storage, "preprocess", 0)


def test_metrics_are_pushed_per_shard(local_storage, mixed, pushgateway, monkeypatch):
    from trajflow.config import GlobalConfig, StageSettings
    from trajflow.metrics import Pusher
    from trajflow.preprocess.stage import run_shard

    files, _ = mixed
    publish_raw_shard(local_storage, 0, files)
    glob = GlobalConfig.model_validate({"runId": "pp", "metrics": {"pushgatewayUrl": pushgateway.url}})
    settings = StageSettings(glob, stage_config(sources={"robomimic": ROBOMIMIC}), 0, 1)
    summary = run_shard(settings, storage=local_storage)
    pushed = {}
    for family in text_string_to_metric_families(pushgateway.metrics_text()):
        for sample in family.samples:
            if sample.labels.get("stage") == "preprocess":
                assert (sample.labels["run"], sample.labels["shard"]) == ("pp", "0")
                pushed[(sample.name, sample.labels.get("reason", sample.labels.get("le", "")))] = sample.value
    assert pushed[("trajflow_preprocess_trajectories_total", "")] == 18
    assert pushed[("trajflow_preprocess_bytes_out_total", "")] == summary.bytes_out
    assert pushed[("trajflow_preprocess_bytes_in_total", "")] == summary.bytes_in
    assert pushed[("trajflow_preprocess_resample_seconds_count", "")] == summary.batches
    assert pushed[("trajflow_stage_success", "")] == 1
    assert pushed[("trajflow_preprocess_throughput_trajectories_per_second", "")] > 0

    # a rerun of the done shard: every push holds its figures and a start time, so its
    # counters never drop to zero (a reset that rate() would count again)
    snapshots = []
    real_push = Pusher.push

    def recording_push(self):
        snapshots.append({s.name: s.value for f in self.metrics.registry.collect() for s in f.samples})
        return real_push(self)

    monkeypatch.setattr(Pusher, "push", recording_push)
    assert run_shard(settings, storage=local_storage).skipped
    assert snapshots and all(v["trajflow_preprocess_trajectories_total"] == 18 for v in snapshots)
    assert all(v["trajflow_stage_start_time_seconds"] > 0 for v in snapshots)


def test_streams_are_aligned_across_sources_and_other_widths_quarantined(local_storage):
    rng = np.random.default_rng(10)
    a, b, c = (make_episode(rng, n, 60.0, 1.0, dims=d) for n, d in
               (("a", None), ("b", None), ("c", {STATE: 7, ACTION: 3})))
    files = {
        "one/a.npz": npz_bytes(timestamps=a.times, **{STATE: a.streams[STATE], ACTION: a.streams[ACTION]}),
        "two/b.npz": npz_bytes(t=b.times, act=b.streams[ACTION], obs=b.streams[STATE]),
        "two/c.npz": npz_bytes(t=c.times, act=c.streams[ACTION], obs=c.streams[STATE]),
    }
    publish_raw_shard(local_storage, 0, files)
    cfg = stage_config(max_bad_fraction=0.5,
                       sources={"two": {"streams": ["act", "obs"], "renames": {"act": ACTION, "obs": STATE}}})
    summary = process_shard(local_storage, 0, 1, cfg)
    assert summary.quarantined == {"shape_mismatch": 1}
    reader = open_shard(local_storage.local_path(shard_key(0)))
    assert reader.dims == {STATE: 6, ACTION: 3} and [e.episode for e in reader.episodes] == ["a", "b"]
    for i, ep in enumerate((a, b)):
        for stream in (STATE, ACTION):
            np.testing.assert_allclose(reader.episode(i, stream), reference_resample(ep.times, ep.streams[stream], 50.0),
                                       atol=2e-5)



def test_a_source_of_other_widths_fails_the_shard_even_under_max_bad_fraction(local_storage):
    """Two robots in one dataset: each shard's vote would keep its majority's widths and set
    the other source aside, shards of 14 and of 7 wide states would all be done, and training
    would refuse them only after every shard is computed."""
    rng = np.random.default_rng(15)

    def episodes(source, count, width):
        eps = [make_episode(rng, f"e{i:02d}", 50.0, 1.0, dims={STATE: width, ACTION: 3}) for i in range(count)]
        return {f"{source}/{ep.episode}.npz": npz_bytes(timestamps=ep.times, **ep.streams) for ep in eps}

    shards = [{**episodes("aloha", 16, 14), **episodes("franka", 2, 7)},
              {**episodes("aloha", 2, 14), **episodes("franka", 40, 7)}]
    for shard, files in enumerate(shards):
        publish_raw_shard(local_storage, shard, files, shards=2)
    for shard, (source, theirs, kept) in enumerate([("franka", 7, 14), ("aloha", 14, 7)]):
        with pytest.raises(PermanentError) as info:
            process_shard(local_storage, shard, 2, stage_config(max_bad_fraction=0.1))
        message = str(info.value)
        assert f"source {source!r}" in message and f"{{'{STATE}': {kept}, '{ACTION}': 3}}" in message, message
        assert f"{{'{STATE}': {theirs}, '{ACTION}': 3}}" in message, message
        assert "preprocess the sources separately" in message and "renames" in message, message
        assert read_manifest(local_storage, "preprocess", shard) is None and not local_storage.exists(shard_key(shard))
        report = json.loads(local_storage.read_bytes(report_key(shard)))  # kept to debug the data
        assert report["reasons"] == {"shape_mismatch": 2}


def test_one_odd_episode_of_a_source_is_quarantined_not_the_shard_failed(local_storage):
    """A source with a single episode in the shard, of other widths: a bad recording as far as
    anyone can tell, within maxBadFraction."""
    rng = np.random.default_rng(16)
    eps = [make_episode(rng, f"e{i:02d}", 50.0, 1.0, dims={STATE: 14, ACTION: 3}) for i in range(20)]
    files = {f"aloha/{ep.episode}.npz": npz_bytes(timestamps=ep.times, **ep.streams) for ep in eps}
    odd = make_episode(rng, "odd", 50.0, 1.0, dims={STATE: 15, ACTION: 3})
    files["extra/odd.npz"] = npz_bytes(timestamps=odd.times, **odd.streams)
    publish_raw_shard(local_storage, 0, files)
    summary = process_shard(local_storage, 0, 1, stage_config(max_bad_fraction=0.1))
    assert summary.quarantined == {"shape_mismatch": 1} and summary.episodes == 20


@pytest.mark.parametrize("sort_window_mib", [1, 16])
def test_one_odd_episode_read_first_is_the_one_set_aside(local_storage, sort_window_mib):
    rng = np.random.default_rng(12)
    # 40 s at 1 kHz: 1.6 MiB decoded, more than a 1 MiB sort window holds
    odd = make_episode(rng, "odd", 1000.0, 40.0, dims={STATE: 7, ACTION: 3})
    good = [make_episode(rng, f"e{i:02d}", 60.0, 1.0) for i in range(20)]
    files = {f"s/{ep.episode}.npz": npz_bytes(timestamps=ep.times, **ep.streams) for ep in [odd, *good]}
    files["s/0_odd.npz"] = files.pop("s/odd.npz")  # read first
    publish_raw_shard(local_storage, 0, files)
    # batches of two: the vote is not one batch's, nor one sort window's
    cfg = stage_config(max_bad_fraction=0.1, batch_size=2, sort_window_batches=1, sort_window_mib=sort_window_mib)
    summary = process_shard(local_storage, 0, 1, cfg)
    assert summary.quarantined == {"shape_mismatch": 1} and summary.episodes == 20
    report = json.loads(local_storage.read_bytes(report_key(0)))
    assert [e["episode"] for e in report["entries"]] == ["0_odd"]
    reader = open_shard(local_storage.local_path(shard_key(0)))
    assert reader.dims == {STATE: 6, ACTION: 3} and [e.episode for e in reader.episodes] == [f"e{i:02d}" for i in range(20)]


def test_an_odd_episode_past_the_vote_s_byte_cap_does_not_decide_alone(local_storage, monkeypatch):
    from trajflow.preprocess import stage

    monkeypatch.setattr(stage, "_VOTE_BYTES", 1)  # the first episode alone passes the cap
    rng = np.random.default_rng(14)
    eps = [make_episode(rng, "0_odd", 100.0, 2.0, dims={STATE: 7, ACTION: 3}),
           *(make_episode(rng, f"e{i}", 60.0, 1.0) for i in range(4))]
    publish_raw_shard(local_storage, 0, {f"s/{ep.episode}.npz": npz_bytes(timestamps=ep.times, **ep.streams)
                                         for ep in eps})
    summary = process_shard(local_storage, 0, 1, stage_config(max_bad_fraction=0.25))
    assert summary.quarantined == {"shape_mismatch": 1} and summary.episodes == 4


@pytest.mark.parametrize("cpu_threads, expected", [(0, 3), (2, 2)])
def test_torch_threads_follow_the_pod_s_cpus_not_the_node_s(local_storage, monkeypatch, cpu_threads, expected):
    import torch

    from trajflow.preprocess import stage

    monkeypatch.setattr(stage, "cpu_budget", lambda: 3)  # the pod's CPU limit, not the node's cores
    seen = []
    launch = stage._Resampler.launch

    def spy(self, *args):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return launch(self, *args)

    monkeypatch.setattr(stage._Resampler, "launch", spy)
    before = torch.get_num_threads()
    rng = np.random.default_rng(15)
    publish_raw_shard(local_storage, 0, {f"s/e{i}.npz": npz_bytes(timestamps=ep.times, **ep.streams)
                                         for i, ep in enumerate(make_episode(rng, f"e{i}", 60.0, 1.0) for i in range(3))})
    process_shard(local_storage, 0, 1, stage_config(cpu_threads=cpu_threads))
    assert seen and set(seen) == {expected}
    assert torch.get_num_threads() == before  # the caller's setting comes back


def test_the_widths_vote_does_not_depend_on_the_sort_window(tmp_path):
    # the first four episodes read are 7 wide, the eight after them 6 wide: the majority of
    # the first episodes decides, however many a sort window holds
    rng = np.random.default_rng(13)
    eps = [make_episode(rng, f"e{i:02d}", 1000.0, 8.0, dims={STATE: 7 if i < 4 else 6, ACTION: 3}) for i in range(12)]
    files = {f"s/{ep.episode}.npz": npz_bytes(timestamps=ep.times, **ep.streams) for ep in eps}
    shards = []
    for mib in (1, 16):
        storage = LocalStorage(tmp_path / f"window-{mib}")
        publish_raw_shard(storage, 0, files)
        summary = process_shard(storage, 0, 1, stage_config(max_bad_fraction=0.5, sort_window_mib=mib))
        assert summary.quarantined == {"shape_mismatch": 4} and summary.episodes == 8
        shards.append(storage.read_bytes(shard_key(0)))
    assert shards[0] == shards[1]


@pytest.mark.parametrize("dataset", ["lr", "data/pusht"])  # the second in a folder that is also called data
def test_lerobot_info_in_another_shard_names_the_robot(local_storage, tmp_path, dataset, caplog):
    from preprocess_data import read_tree, write_lerobot, write_lerobot_info

    ep = make_episode(np.random.default_rng(11), "0", 30.0, 1.0)
    write_lerobot(tmp_path / "src" / dataset / "data" / "chunk-000" / "episode_000000.parquet", [ep],
                  with_timestamps=False)
    write_lerobot_info(tmp_path / "src" / dataset, 30.0, "koch")
    files = read_tree(tmp_path / "src")
    data_key, info_key = f"{dataset}/data/chunk-000/episode_000000.parquet", f"{dataset}/meta/info.json"
    publish_raw_shard(local_storage, 0, {data_key: files[data_key]}, shards=2)
    cfg = stage_config(robot="unknown", max_bad_fraction=1.0)
    process_shard(local_storage, 0, 2, cfg)  # no plan, no info: no timestamps and no rate to use
    assert json.loads(local_storage.read_bytes(report_key(0)))["reasons"] == {"missing_time": 1}
    empty = open_shard(local_storage.local_path(shard_key(0)))  # every trajectory bad, but allowed: an empty shard
    assert len(empty) == 0 and empty.dims == {STATE: 0, ACTION: 0}

    local_storage.delete(manifest_key("preprocess", 0))
    from trajflow.plan import Item, load_or_create_plan, shard_items

    plan = load_or_create_plan(local_storage, 2, "g", lambda: [Item(data_key, 1), Item(info_key, 1)])
    assert [[i.key for i in shard_items(local_storage, plan, j)] for j in (0, 1)] == [[data_key], [info_key]]
    # the plan puts info.json in download shard 1, not done yet: no guessing the rate meanwhile
    with pytest.raises(TransientError, match=r"meta/info.json is not downloaded yet.*download shard 00001"):
        process_shard(local_storage, 0, 2, cfg)
    assert not local_storage.exists(manifest_key("preprocess", 0))
    later = threading.Timer(0.3, lambda: publish_raw_shard(local_storage, 1, {info_key: files[info_key]}, shards=2))
    later.start()
    try:
        with caplog.at_level(logging.INFO, logger="trajflow.preprocess"):
            process_shard(local_storage, 0, 2, cfg, wait_s=60)  # waits for it, and says so
    finally:
        later.join()
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting up to")]
    assert len(waiting) == 1 and f"for download shard 00001, which holds raw/00001/{info_key}" in waiting[0], waiting
    (info,) = open_shard(local_storage.local_path(shard_key(0))).episodes
    assert info.robot == "koch" and info.original_rate_hz == pytest.approx(30.0)  # fps from info.json

    local_storage.delete(manifest_key("preprocess", 0))
    local_storage.delete(f"raw/00001/{info_key}")  # shard 1 done without it: nothing to wait for
    process_shard(local_storage, 0, 2, cfg)
    assert json.loads(local_storage.read_bytes(report_key(0)))["reasons"] == {"missing_time": 1}


def test_a_wait_for_a_datasets_info_ends_when_its_download_shard_failed_for_good(local_storage, monkeypatch):
    import trajflow.storage.wait as wait_module
    from trajflow.plan import Item, load_or_create_plan
    from trajflow.storage.manifest import record_failure
    from trajflow.storage.wait import UpstreamFailed

    data_key, info_key = "lr/data/chunk-000/episode_000000.parquet", "lr/meta/info.json"
    load_or_create_plan(local_storage, 2, "g", lambda: [Item(data_key, 1), Item(info_key, 1)])
    publish_raw_shard(local_storage, 0, {data_key: b"not read"}, shards=2, generation="g")
    monkeypatch.setenv("TRAJFLOW_RERUN", "0")  # the download pod's attempt, which the release still names
    record_failure(local_storage, "download", 1, 2, "g", "1 item(s) failed permanently: lr/meta/info.json: 403")
    monkeypatch.delenv("TRAJFLOW_RERUN")
    local_storage.write_bytes("dataset.yaml", json.dumps({"config": {}, "shards": 2, "reruns": {
        "downloader": 0, "preprocessing": 0}}).encode())  # the dataset ConfigMap as the chart mounts it
    monkeypatch.setenv("TRAJFLOW_DATASET_CONFIG", str(local_storage.local_path("dataset.yaml")))
    cfg = stage_config(robot="unknown", max_bad_fraction=1.0)
    with pytest.raises(TransientError, match=r"download shard 00001, which holds it, is not done \(.*\); download "
                                             r"shard 1 failed for good: 1 item\(s\) failed permanently: "
                                             r"lr/meta/info.json: 403: fix that, then raise downloader.rerun"):
        process_shard(local_storage, 0, 2, cfg, download_generation="g")
    monkeypatch.setattr(wait_module, "FAILED_UPSTREAM_GRACE_S", 0.5)
    with pytest.raises(UpstreamFailed, match=r"download shard 1 failed for good: .*downloader.rerun was not raised in "):
        process_shard(local_storage, 0, 2, cfg, wait_s=600, download_generation="g")
    assert not local_storage.exists(manifest_key("preprocess", 0))


def test_the_plan_header_names_the_part_holding_a_datasets_info_file(local_storage, monkeypatch):
    """A pod reads the one plan part holding its dataset's meta/info.json, not every part of
    a plan that may be hundreds of MB; a plan made before that index is searched part by part."""
    import trajflow.preprocess.stage as stage_module
    from trajflow.plan import Item, load_or_create_plan, shard_items
    from trajflow.storage import PLAN_KEY, shard_name

    data_key, info_key = "lr/data/chunk-000/episode_000000.parquet", "lr/meta/info.json"
    info = json.dumps({"fps": 30, "robot_type": "koch"}).encode()
    fillers = [Item(f"other/f{i:02d}.bin", 1000 + i) for i in range(40)]
    plan = load_or_create_plan(local_storage, 8, "g", lambda: [Item(data_key, 5000), Item(info_key, len(info)), *fillers])
    where = {it.key: j for j in range(8) for it in shard_items(local_storage, plan, j)}
    assert plan["info_files"] == {info_key: where[info_key]} and 0 < where[info_key] != where[data_key]
    publish_raw_shard(local_storage, where[info_key], {info_key: info}, shards=8)
    reads: list[int] = []
    read_part = stage_module.shard_item_docs
    monkeypatch.setattr(stage_module, "shard_item_docs", lambda st, pl, j: reads.append(j) or read_part(st, pl, j))
    keys = [f"raw/{shard_name(where[data_key])}/{data_key}"]
    hints = stage_module.dataset_hints(local_storage, keys, where[data_key], 8)
    assert list(hints.values()) == [("koch", 30.0, False)] and reads == [where[info_key]]
    # a plan in use from before the index: every part up to the one holding it is read
    old = {k: v for k, v in plan.items() if k != "info_files"}
    local_storage.write_bytes(PLAN_KEY, json.dumps(old).encode())
    reads.clear()
    assert list(stage_module.dataset_hints(local_storage, keys, where[data_key], 8).values()) == [("koch", 30.0, False)]
    assert reads == list(range(where[info_key] + 1))


def test_an_earlier_datasets_info_in_another_shard_is_not_taken_for_this_ones(local_storage, tmp_path):
    """Installed again over a run root holding an earlier revision of the dataset: the info
    file at the planned path counts once the downloader has verified it for this plan."""
    from preprocess_data import read_tree, write_lerobot, write_lerobot_info

    from trajflow.download.verify import Record, item_fingerprint, write_record
    from trajflow.plan import Item, load_or_create_plan

    ep = make_episode(np.random.default_rng(11), "0", 30.0, 1.0)
    write_lerobot(tmp_path / "src" / "lr" / "data" / "chunk-000" / "episode_000000.parquet", [ep], with_timestamps=False)
    write_lerobot_info(tmp_path / "src" / "lr", 30.0, "koch")
    files = read_tree(tmp_path / "src")
    data_key, info_key = "lr/data/chunk-000/episode_000000.parquet", "lr/meta/info.json"
    info = Item(info_key, len(files[info_key]), "https://hub.example/lr/meta/info.json")
    load_or_create_plan(local_storage, 2, "bbb", lambda: [Item(data_key, len(files[data_key])), info])
    publish_raw_shard(local_storage, 0, {data_key: files[data_key]}, shards=2, generation="bbb")
    # the earlier revision's info file and its done download shard, of the earlier generation
    publish_raw_shard(local_storage, 1, {info_key: json.dumps({"fps": 50, "robot_type": "old"}).encode()}, shards=2,
                      generation="aaa")
    cfg = stage_config(robot="unknown", max_bad_fraction=1.0)
    with pytest.raises(TransientError, match=r"meta/info.json is not downloaded yet.*download shard 00001"):
        process_shard(local_storage, 0, 2, cfg, download_generation="bbb")
    assert not local_storage.exists(manifest_key("preprocess", 0))
    # this plan's copy, verified: read though its shard is not done yet
    location = f"raw/00001/{info_key}"
    local_storage.write_bytes(location, files[info_key])
    digest = hashlib.sha256(files[info_key]).hexdigest()
    write_record(local_storage, Record(item=info_key, fingerprint=item_fingerprint(info, gunzip=False),
                                       location=location, size=info.size, sha256=digest, source_size=info.size,
                                       source_sha256=digest))
    process_shard(local_storage, 0, 2, cfg, download_generation="bbb")
    (made,) = open_shard(local_storage.local_path(shard_key(0))).episodes
    assert made.robot == "koch" and made.original_rate_hz == pytest.approx(30.0)
    # its shard done without it (a missing item of an optional source): an earlier file there is not read
    local_storage.delete(manifest_key("preprocess", 0))
    local_storage.delete(f"raw/.trajflow-verified/{info_key}.json")
    local_storage.write_bytes(location, json.dumps({"fps": 50, "robot_type": "old"}).encode())
    write_manifest(local_storage, "download", 1, 2, [], generation="bbb")
    process_shard(local_storage, 0, 2, cfg, download_generation="bbb")
    assert json.loads(local_storage.read_bytes(report_key(0)))["reasons"] == {"missing_time": 1}


def test_the_downloader_verifies_every_planned_item_as_preprocessing_looks_for_it(local_storage, tmp_path):
    """Preprocessing takes a LeRobot info file in another shard's directory on the strength of
    the downloader's verification record: every item the real downloader places has one that
    matches its plan entry, with and without gunzip, and after a re-shard moves the files."""
    from trajflow.config import DownloadConfig
    from trajflow.download.shard import ShardDownloader
    from trajflow.plan import read_plan_in_use, shard_item_docs
    from trajflow.preprocess.stage import _verified_for_plan
    from trajflow.storage import shard_name

    src = tmp_path / "src"
    (src / "lr" / "meta").mkdir(parents=True)
    (src / "lr" / "data").mkdir(parents=True)
    (src / "lr" / "meta" / "info.json").write_text(json.dumps({"fps": 30, "robot_type": "koch"}))
    for i in range(5):
        (src / "lr" / "data" / f"e{i}.parquet").write_bytes(b"x" * 1000 * (i + 1))
    for gunzip in (False, True):
        storage = local_storage.child(f"gunzip-{gunzip}")
        config = DownloadConfig.model_validate({"sources": [{"type": "file", "name": "ds", "path": str(src)}],
                                                "gunzip": gunzip})
        for shards in (2, 3):
            for shard in range(shards):
                assert ShardDownloader(storage, config, shard, shards).run().exit_code == 0
            plan = read_plan_in_use(storage)
            planned = [(f"raw/{shard_name(j)}/{item['key']}", item) for j in range(shards)
                       for item in shard_item_docs(storage, plan, j)]
            assert len(planned) == 6
            assert all(_verified_for_plan(storage, key, item) for key, item in planned), (gunzip, shards)


def test_run_shards_takes_each_shard_when_its_download_is_done(local_storage):
    import threading

    from trajflow.config import GlobalConfig, StageSettings
    from trajflow.errors import WaitTimeout
    from trajflow.preprocess.stage import run_shards

    rng = np.random.default_rng(12)
    publish_raw_shard(local_storage, 0, {"npz/a.npz": npz_bytes(**_npz_episode(rng))}, shards=2)
    late = threading.Timer(0.5, publish_raw_shard, (local_storage, 1, {"npz/b.npz": npz_bytes(**_npz_episode(rng))}, 2))
    late.start()
    settings = StageSettings(GlobalConfig(), stage_config(), 0, 2)
    try:
        summaries = run_shards(settings, [0, 1], wait_timeout_s=60, storage=local_storage, poll_s=0.1)
    finally:
        late.cancel()
    assert [(s.shard, s.episodes, s.skipped) for s in summaries] == [(0, 1, False), (1, 1, False)]
    assert read_manifest(local_storage, "preprocess", 1)["shards"] == 2
    with pytest.raises(WaitTimeout, match=r"download shard\(s\) \[2\]"):
        run_shards(StageSettings(GlobalConfig(), stage_config(), 0, 3), [2], wait_timeout_s=0.3, storage=local_storage,
                   poll_s=0.1)
    with pytest.raises(ConfigError, match=r"shard 2 is not one of this run's 2 shards \(0-1\)"):
        run_shards(settings, [1, 2], wait_timeout_s=60, storage=local_storage, poll_s=0.1)  # would wait forever


def test_run_shards_waits_for_a_download_of_its_own_shard_count(local_storage):
    from trajflow.config import GlobalConfig, StageSettings
    from trajflow.errors import WaitTimeout
    from trajflow.preprocess.stage import run_shards

    rng = np.random.default_rng(13)
    publish_raw_shard(local_storage, 0, {"npz/a.npz": npz_bytes(**_npz_episode(rng))}, shards=4)  # an older plan
    settings = StageSettings(GlobalConfig(), stage_config(), 0, 2)
    with pytest.raises(WaitTimeout, match=r"download shard\(s\) \[0\] .*\(0: records shards=4 \(expected 2\)\)"):
        run_shards(settings, [0], wait_timeout_s=0.3, storage=local_storage, poll_s=0.1)
    assert read_manifest(local_storage, "preprocess", 0) is None
    # and of the generation the downloader's config gives
    publish_raw_shard(local_storage, 0, {"npz/a.npz": npz_bytes(**_npz_episode(rng))}, shards=2, generation="aaa")
    expecting = StageSettings(GlobalConfig(), stage_config(), 0, 2, download_generation="bbb")
    with pytest.raises(WaitTimeout, match=r"\(0: records generation='aaa' \(expected 'bbb'\)\)"):
        run_shards(expecting, [0], wait_timeout_s=0.3, storage=local_storage, poll_s=0.1)
    assert read_manifest(local_storage, "preprocess", 0) is None
    assert run_shards(settings, [0], wait_timeout_s=0.3, storage=local_storage, poll_s=0.1)[0].episodes == 1


# ---- malformed files: quarantined with a reason, never a crash of the shard


def _malformed(kind: str, tmp_path: Path) -> tuple[str, bytes]:
    """One malformed trajectory file of ``kind``: (name, bytes)."""
    import h5py
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 20
    t = np.arange(n) / 50.0
    state, action = np.ones((n, 3), np.float32), np.ones((n, 2), np.float32)

    def parquet(**cols: object) -> bytes:
        base = {"episode_index": pa.array(np.zeros(n, np.int64)), "frame_index": pa.array(np.arange(n)),
                "timestamp": pa.array(t.astype(np.float32)), STATE: pa.array(state.tolist()),
                ACTION: pa.array(action.tolist())}
        buf = io.BytesIO()
        pq.write_table(pa.table({**base, **cols}), buf)
        return buf.getvalue()

    def hdf5(times: np.ndarray) -> bytes:
        path = tmp_path / "bad.h5"
        with h5py.File(path, "w") as f:
            g = f.create_group("data/demo_0")
            g.create_dataset(STATE, data=state)
            g.create_dataset(ACTION, data=action)
            g.create_dataset("timestamps", data=times)
        return path.read_bytes()

    inner_null = action.tolist()
    inner_null[3][1] = None
    return {
        "npz_string_times": lambda: ("bad.npz", npz_bytes(timestamps=np.array(["n/a"] * n), **{STATE: state,
                                                                                                ACTION: action})),
        "hdf5_string_times": lambda: ("bad.h5", hdf5(np.array([b"x"] * n))),
        "hdf5_compound_times": lambda: ("bad.h5", hdf5(np.zeros(n, dtype=[("sec", "i8"), ("nsec", "i8")]))),
        "parquet_null_inside_a_list": lambda: ("bad.parquet", parquet(**{ACTION: pa.array(inner_null)})),
        "parquet_null_episode_index": lambda: ("bad.parquet", parquet(
            episode_index=pa.array([0] * 5 + [None] + [0] * 14, pa.int64()))),
        "parquet_string_episode_index": lambda: ("bad.parquet", parquet(episode_index=pa.array(["a"] * n))),
        "parquet_empty_time_lists": lambda: ("bad.parquet", parquet(
            timestamp=pa.array([[]] * n, pa.list_(pa.float32())))),
    }[kind]()


@pytest.mark.parametrize("kind, reason, detail", [
    ("npz_string_times", "shape_mismatch", "timestamps have non-numeric dtype <U3"),
    ("hdf5_string_times", "shape_mismatch", "timestamps have non-numeric dtype |S1"),
    ("hdf5_compound_times", "shape_mismatch", "timestamps have non-numeric dtype"),
    ("parquet_null_inside_a_list", "non_finite", "action[3, 1] is nan"),
    ("parquet_null_episode_index", "shape_mismatch", "'episode_index' must hold whole numbers without nulls"),
    ("parquet_string_episode_index", "shape_mismatch", "'episode_index' must hold whole numbers without nulls"),
    ("parquet_empty_time_lists", "shape_mismatch", "'timestamp' holds 0 values per row, not one"),
])
def test_malformed_files_are_quarantined_not_a_crash(local_storage, tmp_path, kind, reason, detail):
    rng = np.random.default_rng(4)
    files = {f"src/good_{i}.npz": npz_bytes(**_npz_episode(rng)) for i in range(9)}
    name, data = _malformed(kind, tmp_path)
    files[f"src/{name}"] = data
    publish_raw_shard(local_storage, 0, files)
    summary = process_shard(local_storage, 0, 1, stage_config(max_bad_fraction=0.2))
    assert summary.episodes == 9 and summary.quarantined == {reason: 1}
    (entry,) = json.loads(local_storage.read_bytes(report_key(0)))["entries"]
    assert entry["source"].endswith(name) and detail in entry["detail"]


@pytest.mark.parametrize("error, reason", [
    (RuntimeError("Unable to get group info (wrong B-tree signature)"), "unreadable_file"),
    (TypeError("cannot use a string pattern on a bytes-like object"), "unreadable_file"),
    (OSError("Can't synchronously read data (address of object past end of allocation)"), "unreadable_file"),
    (OSError(errno.EIO, "Input/output error"), None),  # the storage failing: retried
])
def test_a_reader_failing_unexpectedly_quarantines_the_file_but_io_errors_stay_storage_errors(
        local_storage, monkeypatch, error, reason):
    from trajflow.preprocess import readers

    rng = np.random.default_rng(5)
    files = {f"src/good_{i}.npz": npz_bytes(**_npz_episode(rng)) for i in range(9)}
    files["src/bad.h5"] = b"not read"
    publish_raw_shard(local_storage, 0, files)

    def failing(*args):
        raise error

    monkeypatch.setitem(readers.READERS, "robomimic", failing)
    config = stage_config(max_bad_fraction=0.2)
    if reason is None:
        with pytest.raises(TransientError, match="storage error: OSError: .*Input/output error"):
            process_shard(local_storage, 0, 1, config)
        return
    summary = process_shard(local_storage, 0, 1, config)
    assert summary.episodes == 9 and summary.quarantined == {reason: 1}
    (entry,) = json.loads(local_storage.read_bytes(report_key(0)))["entries"]
    assert entry["detail"] == f"cannot parse the file: {type(error).__name__}: {error}"


def test_values_beyond_a_half_precision_dtype_are_quarantined_not_stored_as_inf(local_storage):
    rng = np.random.default_rng(6)
    files = {f"src/ep{i}.npz": npz_bytes(**_npz_episode(rng)) for i in range(4)}
    edge = _npz_episode(rng)
    edge[STATE][:, 1] = 65510.0  # above float16's largest value, 65504, but it rounds down to it
    files["src/edge.npz"] = npz_bytes(**edge)
    big = _npz_episode(rng)
    big[STATE][7, 2] = 70000.0  # encoder counts, say: rounds to inf in float16
    files["src/big.npz"] = npz_bytes(**big)
    publish_raw_shard(local_storage, 0, files)
    summary = process_shard(local_storage, 0, 1, stage_config(dtype="float16", max_bad_fraction=0.5))
    assert summary.episodes == 5 and summary.quarantined == {"non_finite": 1}
    (entry,) = json.loads(local_storage.read_bytes(report_key(0)))["entries"]
    assert entry["source"].endswith("big.npz")
    assert entry["detail"].startswith(f"{STATE}[7, 2] = 70000 rounds to inf in float16 (from +-65520 on)")
    reader = open_shard(local_storage.local_path(shard_key(0)))
    for i in range(len(reader.episodes)):
        assert torch.isfinite(reader.episode_tensor(i, STATE).float()).all()


def test_lerobot_metadata_is_told_by_the_nearest_meta_or_data_directory():
    from trajflow.preprocess.stage import _is_lerobot_metadata

    assert _is_lerobot_metadata("raw/00000/lr/meta/tasks.parquet", "lerobot")
    assert _is_lerobot_metadata("raw/00000/lr/pusht/meta/episodes/chunk-000/file-000.parquet", "lerobot")
    # a dataset kept in a folder that happens to be called meta is data
    assert not _is_lerobot_metadata("raw/00000/lr/meta/pusht/data/chunk-000/episode_000000.parquet", "lerobot")
    assert not _is_lerobot_metadata("raw/00000/lr/episode_000000.parquet", "lerobot")
    assert not _is_lerobot_metadata("raw/00000/src/meta/e0.npz", "npz")


def test_only_os_errors_with_an_errno_are_storage_errors():
    from trajflow.storage.wait import is_storage_error

    assert is_storage_error(OSError(errno.EIO, "Input/output error"))
    assert is_storage_error(ConnectionResetError()) and is_storage_error(TimeoutError())
    # h5py's complaint about the bytes of a file, not the storage failing
    assert not is_storage_error(OSError("Can't synchronously read data (address of object past end of allocation)"))
    assert not is_storage_error(FileNotFoundError(errno.ENOENT, "gone"))
    # botocore's timeouts are errno-less OSErrors, and storage errors all the same
    from botocore.exceptions import ReadTimeoutError

    timeout = ReadTimeoutError(endpoint_url="http://127.0.0.1:1/bucket")
    assert isinstance(timeout, OSError) and timeout.errno is None and is_storage_error(timeout)


def test_a_lost_file_of_many_episodes_counts_by_its_bytes_against_max_bad_fraction(local_storage):
    def multi(rng):
        return npz_bytes(**{f"e{i}/{k}": v for i in range(20) for k, v in _npz_episode(rng).items()})

    rng = np.random.default_rng(7)
    whole = multi(rng)
    # one unreadable file is 1 bad trajectory of 21 (4.8% <= 5%), but it held half the episodes
    publish_raw_shard(local_storage, 0, {"src/a.npz": multi(rng), "src/b.npz": whole[: len(whole) - 100]})
    with pytest.raises(PermanentError, match=r"files lost whole hold 50\.0% of the trajectory bytes > "
                                             r"maxBadFraction 5\.0% \(unreadable_file: 1\)"):
        process_shard(local_storage, 0, 1, stage_config())
    assert read_manifest(local_storage, "preprocess", 0) is None


def test_a_run_root_on_a_read_only_volume_is_a_config_error(local_storage, monkeypatch):
    import errno

    rng = np.random.default_rng(3)
    ep = make_episode(rng, "e0", 60.0, 1.0)
    publish_raw_shard(local_storage, 0, {"s/e0.npz": npz_bytes(timestamps=ep.times, **ep.streams)})

    def read_only(key: str):  # type: ignore[no-untyped-def]
        raise OSError(errno.EROFS, "Read-only file system", str(local_storage.local_path(key)))

    monkeypatch.setattr(local_storage, "writer", read_only)
    with pytest.raises(ConfigError, match="the volume is mounted read-only"):  # exit 2: no retry helps
        process_shard(local_storage, 0, 1, stage_config())


def test_a_file_takes_the_hint_of_the_deepest_dataset_holding_it():
    from trajflow.preprocess.stage import _hint_for

    hints = {"raw/00000/a/": ("outer", 30.0), "raw/00000/a/b/": ("inner", 50.0)}
    assert _hint_for("raw/00000/a/b/data/chunk-000/e.parquet", hints) == ("inner", 50.0)
    assert _hint_for("raw/00000/a/data/e.parquet", hints) == ("outer", 30.0)
    assert _hint_for("raw/00000/ab/data/e.parquet", hints) == ("", None, False)  # a name starting like a dataset's
    assert _hint_for("raw/00000/c/e.parquet", hints) == ("", None, False)
