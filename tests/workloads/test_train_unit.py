"""Training pieces in one process: config, windows, split, statistics, models,
checkpoints, artifacts, exit-code mapping, and short in-process training runs."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from trajflow.config.train import TrainConfig
from trajflow.errors import ConfigError, ExitCode, PermanentError, TransientError
from trajflow.preprocess.shards import Episode, list_shards, shard_key, write_shard
from trajflow.storage import LocalStorage, manifest_key, read_manifest, read_train_metrics, write_manifest
from trajflow.testing import free_port
from trajflow.train import artifacts
from trajflow.train.checkpoint import CheckpointStore
from trajflow.train.data import EpochBatches, build_data, open_shards, split_episodes, stats_from_moments
from trajflow.train.errors import TrainingDiverged
from trajflow.train.launch import pod_exit_code
from trajflow.train.loop import config_hash, metrics_shard, same_data, train
from trajflow.train.models import ModelSpec, TrajectoryModel
from trajflow.train.synthetic import System, local_settings, write_synthetic_shards

SMALL_MODEL = {"type": "gru", "hidden_size": 32, "num_layers": 1}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Tiny models on a shared 2-core machine: threads only add contention."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_run(tmp_path: Path, run_id: str = "run", shards: int = 2, episodes: int = 6, length: int = 120,
              **config: object):
    """Settings for a few-second CPU run and the run root with synthetic shards in it."""
    defaults = {"window": 8, "epochs": 3, "batch_size": 64, "learning_rate": 3e-3, "metrics_port": 0,
                "model": SMALL_MODEL, "log_every_steps": 1000}
    settings = local_settings(tmp_path, run_id, **{**defaults, **config})
    storage = LocalStorage(tmp_path / run_id)
    if not list(storage.list("resampled/_done/")):
        write_synthetic_shards(storage, shards=shards, episodes_per_shard=episodes, length=length)
    return settings, storage


# ---- config ----------------------------------------------------------------------------


def test_config_rejects_transformer_width_not_divisible_by_heads() -> None:
    with pytest.raises(ValueError, match=r"hiddenSize \(30\) must be a multiple of model.numHeads \(4\)"):
        TrainConfig.model_validate({"model": {"type": "transformer", "hiddenSize": 30, "numHeads": 4}})
    # the recurrent models do not use heads
    TrainConfig.model_validate({"model": {"type": "gru", "hiddenSize": 30, "numHeads": 4}})


def test_config_rejects_cloning_a_stream_onto_itself() -> None:
    with pytest.raises(ValueError, match="behaviour cloning needs two streams"):
        TrainConfig.model_validate({"observation": "action", "action": "action"})
    TrainConfig.model_validate({"task": "forecast", "observation": "action", "action": "action"})


def test_config_hash_ignores_optimisation_settings() -> None:
    base = TrainConfig()
    assert config_hash(base) == config_hash(TrainConfig(epochs=99, learning_rate=0.1))
    assert config_hash(base) != config_hash(TrainConfig(window=16))
    assert config_hash(base) != config_hash(TrainConfig.model_validate({"model": {"type": "lstm"}}))


# ---- data ------------------------------------------------------------------------------


def _hand_made_shard(storage: LocalStorage, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Two episodes whose frame values encode (episode, frame) so windows can be checked."""
    episodes, arrays = [], {}
    for e, n in enumerate((12, 9)):
        t = np.arange(n, dtype=np.float64)
        obs = np.stack([t + 100 * e, -t], axis=1)
        act = (t + 50 * e)[:, None]  # small integers: exact in bf16 too
        arrays[str(e)] = obs
        episodes.append(Episode(data={"obs": obs, "act": act}, source="raw/00000/x.npz", episode=str(e)))
    written = write_shard(storage, shard_key(0), episodes, dtype=dtype, rate_hz=10.0)
    write_manifest(storage, "preprocess", 0, 1, [written.item()], num_episodes=2, num_frames=21)
    return arrays


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_behaviour_cloning_windows_end_at_the_target_frame(tmp_path: Path, dtype: str) -> None:
    storage = LocalStorage(tmp_path)
    _hand_made_shard(storage, dtype)
    cfg = TrainConfig(observation="obs", action="act", window=4, val_fraction=0.5)
    data = build_data(open_shards(storage, ["obs", "act"]), cfg)
    datasets = [data.train, data.val]
    assert sorted(len(d) for d in datasets) == [9 - 4 + 1, 12 - 4 + 1]
    for ds in datasets:
        x, y = ds[list(range(len(ds)))]
        assert x.dtype == torch.float32 and x.shape == (len(ds), 4, 2) and y.shape == (len(ds), 1)
        episode = int(x[0, 0, 0].item()) // 100
        for i in range(len(ds)):
            assert x[i, :, 0].tolist() == [100 * episode + i + k for k in range(4)]
            assert y[i, 0].item() == 50 * episode + i + 3  # the action at the window's last frame
        single_x, single_y = ds[2]
        assert torch.equal(single_x, x[2]) and torch.equal(single_y, y[2])


def test_shards_without_episodes_point_at_preprocessing(tmp_path: Path) -> None:
    """A format that matched none of the raw files makes empty shards: the error says that,
    not that training wants two episodes."""
    storage = LocalStorage(tmp_path)
    written = write_shard(storage, shard_key(0), [], dtype="float32", rate_hz=10.0, dims={"obs": 2, "act": 1})
    write_manifest(storage, "preprocess", 0, 1, [written.item()], num_episodes=0, num_frames=0)
    with pytest.raises(PermanentError, match=r"the preprocessed shards hold no episode: preprocessing read no "
                                             r"trajectory \(a format that matches none of the raw files"):
        build_data(open_shards(storage, ["obs", "act"]), TrainConfig(observation="obs", action="act"))


def _shard_of_lengths(storage: LocalStorage, lengths: list[int]) -> None:
    episodes = [Episode(data={"obs": np.zeros((n, 2), np.float32), "act": np.zeros((n, 1), np.float32)},
                        source="raw/00000/x.npz", episode=str(e)) for e, n in enumerate(lengths)]
    written = write_shard(storage, shard_key(0), episodes, dtype="float32", rate_hz=10.0)
    write_manifest(storage, "preprocess", 0, 1, [written.item()], num_episodes=len(lengths), num_frames=sum(lengths))


def test_a_window_leaving_out_most_frames_is_warned_about_and_one_leaving_too_few_episodes_named(
        tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    storage = LocalStorage(tmp_path)
    _shard_of_lengths(storage, [30, 30] + [5] * 13)  # most frames in episodes shorter than a window of 6
    config = TrainConfig(observation="obs", action="act", window=6, val_fraction=0.5)
    with caplog.at_level(logging.INFO, logger="trajflow.train.data"):
        build_data(open_shards(storage, ["obs", "act"]), config)
    [record] = caplog.records
    assert (record.levelno, record.getMessage()) == (logging.WARNING, (
        "13 of 15 episodes (52.0% of the frames) are shorter than a sample of 6 frames (training.config.window 6) at "
        "10 Hz and are not used: a shorter window, or a higher preprocessing.config.targetRateHz, keeps more of them"))
    caplog.clear()
    half = LocalStorage(tmp_path / "half")
    _shard_of_lengths(half, [30, 30] + [5] * 12)  # exactly half: not most
    with caplog.at_level(logging.INFO, logger="trajflow.train.data"):
        build_data(open_shards(half, ["obs", "act"]), config)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trajflow.train.data"):
        build_data(open_shards(storage, ["obs", "act"]), config, announce=False)  # the other ranks
        build_data(open_shards(storage, ["obs", "act"]), TrainConfig(observation="obs", action="act", window=5,
                                                                     val_fraction=0.5))
    assert caplog.records == []
    with pytest.raises(PermanentError, match=re.escape(
            "0 of 15 episode(s) are long enough for a sample of 31 frames (training.config.window 30 and the frame "
            "after it) at 10 Hz, the longest having 30 frames; training needs at least 2")):
        build_data(open_shards(storage, ["obs"]), TrainConfig(task="forecast", observation="obs", window=30))


def test_shard_identity_tells_rewritten_files_apart() -> None:
    """Shards rewritten under the same numbers (preprocessing run again) are other data: the
    ranks of a run must not train on two versions."""
    from trajflow.train.data import ShardSet

    assert ShardSet([], [0], [], 10.0, {"x": 1}, ["aa"]).identity() != ShardSet([], [0], [], 10.0, {"x": 1}, ["bb"]).identity()


def test_forecast_targets_the_frame_after_the_window_and_stride_skips(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    _hand_made_shard(storage)
    cfg = TrainConfig(task="forecast", observation="obs", window=4, stride=2, val_fraction=0.5)
    data = build_data(open_shards(storage, ["obs"]), cfg)
    for ds in (data.train, data.val):
        x, y = ds[list(range(len(ds)))]
        assert torch.equal(y, x[:, -1] + torch.tensor([1.0, -1.0]))  # next frame: t+1 and -(t+1)
        assert torch.all(x[1:, 0, 0] - x[:-1, 0, 0] == 2)  # windows start every 2 frames
    assert sorted([len(data.train), len(data.val)]) == [len(range(0, 9 - 5 + 1, 2)), len(range(0, 12 - 5 + 1, 2))]


def test_split_is_by_episode_deterministic_and_never_empty(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    write_synthetic_shards(storage, shards=2, episodes_per_shard=5, length=40)
    shards = open_shards(storage, ["observation.state", "action"])
    train_a, val_a = split_episodes(shards.episodes, 0.3, seed=1)
    train_b, val_b = split_episodes(list(reversed(shards.episodes)), 0.3, seed=1)
    assert (train_a, val_a) == (train_b, val_b)  # independent of listing order
    assert len(val_a) + len(train_a) == 10 and 1 <= len(val_a) <= 9
    assert not {e.name for e in train_a} & {e.name for e in val_a}
    _, val_other_seed = split_episodes(shards.episodes, 0.3, seed=2)
    assert val_other_seed != val_a
    _, tiny_val = split_episodes(shards.episodes[:3], 0.01, seed=0)
    assert len(tiny_val) == 1
    tiny_train, _ = split_episodes(shards.episodes[:3], 1.0, seed=0)  # every score is below 1: all would be held out
    assert len(tiny_train) == 1
    with pytest.raises(PermanentError, match="at least 2"):
        split_episodes(shards.episodes[:1], 0.5, seed=0)


def test_training_waits_for_every_shard_of_the_count(tmp_path: Path) -> None:
    _, storage = small_run(tmp_path, shards=3)
    storage.delete("resampled/_done/00001.json")  # its preprocessing is still running
    with pytest.raises(TransientError, match=r"2 of 3 preprocessed shards are done \(not 1\); training starts when"):
        open_shards(storage, ["observation.state", "action"])


def test_a_shard_file_on_the_filesystem_is_checked_against_its_manifest(tmp_path: Path) -> None:
    _, storage = small_run(tmp_path)
    key = "resampled/00001.safetensors"
    good = storage.read_bytes(key)
    flipped = bytearray(good)
    flipped[-5] ^= 0x40  # one value of the last episode, same size
    storage.write_bytes(key, bytes(flipped))
    streams = ["observation.state", "action"]
    with pytest.raises(PermanentError, match=r"shard 1: .*00001\.safetensors: sha256 \w+ does not match the manifest's"):
        open_shards(storage, streams)
    storage.write_bytes(key, good[:-100])
    with pytest.raises(PermanentError, match=rf"shard 1: .*00001\.safetensors: {len(good) - 100} bytes, the manifest "
                                             rf"says {len(good)}"):
        open_shards(storage, streams)
    storage.write_bytes(key, good)
    assert len(open_shards(storage, streams).readers) == 2


def test_a_restart_does_not_hash_shards_checked_before_and_unchanged_since(tmp_path: Path, monkeypatch) -> None:
    """Every (re)start checks the shards; a terabyte takes most of an hour to hash. A file
    whose size and modification time are as when it was checked is not hashed again; one
    changed since is."""
    import trajflow.preprocess.shards as shards_module

    _, storage = small_run(tmp_path, shards=3)
    hashed: list[str] = []
    real_hash = shards_module._file_sha256
    monkeypatch.setattr(shards_module, "_file_sha256", lambda path: hashed.append(Path(path).name) or real_hash(path))
    streams = ["observation.state", "action"]
    open_shards(storage, streams)
    assert sorted(hashed) == ["00000.safetensors", "00001.safetensors", "00002.safetensors"]
    hashed.clear()
    assert len(open_shards(storage, streams).readers) == 3 and hashed == []
    key = "resampled/00001.safetensors"
    flipped = bytearray(storage.read_bytes(key))
    flipped[-5] ^= 0x40  # same size, a later modification time
    storage.write_bytes(key, bytes(flipped))
    with pytest.raises(PermanentError, match=r"shard 1: .*00001\.safetensors: sha256 \w+ does not match"):
        open_shards(storage, streams)
    assert hashed == ["00001.safetensors"]


def test_a_constant_dimension_is_normalised_by_one() -> None:
    """A gripper that never moves, a zero-padded dimension: dividing by its std of 0 would
    turn every input into Inf."""
    frames = np.array([[0.0, 5.0, 1.0], [0.0, 5.0, 3.0]])  # two constant columns, one that moves
    vector = np.concatenate([[len(frames)], frames.sum(0), (frames**2).sum(0)])
    [(mean, std)] = stats_from_moments(vector, [3])
    np.testing.assert_allclose(mean, [0.0, 5.0, 2.0])
    np.testing.assert_allclose(std, [1.0, 1.0, 1.0])
    [(_, std)] = stats_from_moments(np.concatenate([[2], [0.0], [2.0]]), [1])  # values -1 and 1
    np.testing.assert_allclose(std, [1.0])
    [(_, std)] = stats_from_moments(np.concatenate([[2], [0.0], [8.0]]), [1])  # values -2 and 2
    np.testing.assert_allclose(std, [2.0])


@pytest.mark.parametrize("other", ["rate", "width"])
def test_shards_of_another_rate_or_width_are_refused_by_name(tmp_path: Path, other: str) -> None:
    _, storage = small_run(tmp_path)
    streams = ["observation.state", "action"]
    reader = open_shards(storage, streams).readers[0]
    rate = reader.rate_hz * (2 if other == "rate" else 1)
    dims = {s: reader.dims[s] + (1 if other == "width" and s == "action" else 0) for s in streams}
    rng = np.random.default_rng(0)
    episodes = [Episode(data={s: rng.standard_normal((40, d)) for s, d in dims.items()}, source="raw/00001/x.npz",
                        episode="0")]
    written = write_shard(storage, shard_key(1), episodes, dtype="float32", rate_hz=rate)
    write_manifest(storage, "preprocess", 1, 2, [written.item()], num_episodes=1, num_frames=40)
    message = (rf"00001\.safetensors: rate {rate} Hz differs from the other shards' {reader.rate_hz} Hz"
               if other == "rate" else r"00001\.safetensors: stream 'action' has \d+ dims, other shards have \d+")
    with pytest.raises(PermanentError, match=message):
        open_shards(storage, streams)


@pytest.mark.parametrize("edit", ["no episodes", "fewer frames", "no count"])
def test_a_manifest_whose_counts_are_not_its_shards_is_refused(tmp_path: Path, edit: str) -> None:
    """A shard a manifest miscounts was read whole before (or, said to be empty, dropped)."""
    _, storage = small_run(tmp_path)
    doc = read_manifest(storage, "preprocess", 1)
    streams = ["observation.state", "action"]
    assert len(open_shards(storage, streams).episodes) == 12
    if edit == "no episodes":
        doc["num_episodes"] = 0
    elif edit == "fewer frames":
        doc["num_frames"] -= 1
    else:
        del doc["num_episodes"]
    storage.write_bytes(manifest_key("preprocess", 1), json.dumps(doc).encode())
    message = (r"the shard file's entry or the episode and frame counts are malformed \(KeyError: 'num_episodes'\)"
               if edit == "no count" else r"00001\.safetensors: holds 6 episodes of \d+ frames, its manifest says")
    with pytest.raises(PermanentError, match=message):
        open_shards(storage, streams)


@pytest.mark.parametrize("edit, message", [
    # each was a traceback with exit 1 (retried), a transient wait, or another shard's episodes twice
    ({"items": None}, r"00001\.json: the manifest's items are not a list of objects"),
    ({"items": [3]}, r"00001\.json: the manifest's items are not a list of objects"),
    ({"shards": [2]}, r"00001\.json: the manifest of shard 1 records a shard count of \[2\]"),
    ({"shards": "2"}, r"00001\.json: the manifest of shard 1 records a shard count of '2'"),
    ({"shards": 1}, r"00001\.json: the manifest of shard 1 records a shard count of 1"),
    ({"num_frames": float("inf")}, r"00001\.json: .* malformed \(OverflowError"),
    ("key", r"00001\.json: the manifest of shard 1 names the file 'resampled/00000.safetensors', not "
            r"'resampled/00001.safetensors'"),
    ("nested", r"00001\.json: corrupt manifest"),
])
def test_a_malformed_preprocess_manifest_is_named_and_final(tmp_path: Path, edit, message) -> None:
    _, storage = small_run(tmp_path)
    doc = read_manifest(storage, "preprocess", 1)
    if edit == "key":
        item = next(it for it in doc["items"] if it["kind"] == "shard")
        zero = next(it for it in read_manifest(storage, "preprocess", 0)["items"] if it["kind"] == "shard")
        item.update(key=zero["key"], size=zero["size"], sha256=zero["sha256"])  # a consistent lie
        raw = json.dumps(doc)
    elif edit == "nested":
        raw = json.dumps(doc)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    else:
        doc.update(edit)
        raw = json.dumps(doc)
    storage.write_bytes(manifest_key("preprocess", 1), raw.encode())
    with pytest.raises(PermanentError, match=message):
        open_shards(storage, ["observation.state", "action"])


def test_shards_on_s3_that_would_outgrow_the_tmp_limit_are_refused_before_the_copy(s3_storage, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    write_synthetic_shards(s3_storage, shards=2, episodes_per_shard=6, length=120)
    total = sum(obj.size for obj in s3_storage.list("resampled/") if obj.key.endswith(".safetensors"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    streams = ["observation.state", "action"]
    monkeypatch.setenv("TRAJFLOW_TMP_SIZE_LIMIT", str(total))  # no room left for HOME
    with pytest.raises(ConfigError, match=r"the 2 preprocessed shards under s3://.* hold .* and training copies them "
                                          r"into .*/tmp, limited to .*raise training\.tmp\.sizeLimit"):
        open_shards(s3_storage, streams)
    assert not any((tmp_path / "tmp").iterdir())  # nothing was copied
    # a cache directory of its own is sized by whoever sets it; a roomy /tmp takes the copies
    assert len(open_shards(s3_storage, streams, cache_dir=tmp_path / "cache").readers) == 2
    monkeypatch.setenv("TRAJFLOW_TMP_SIZE_LIMIT", str(2 * total))
    assert len(open_shards(s3_storage, streams).readers) == 2


def test_an_episode_keeps_its_side_of_the_split_whatever_happens_to_the_others() -> None:
    from trajflow.train.data import EpisodeRef

    episodes = [EpisodeRef(i % 4, i, 0, 50, f"raw/{i % 4:05d}/lake/ep{i}.parquet#0") for i in range(2000)]
    train, val = split_episodes(episodes, 0.2, seed=7)
    assert 0.17 < len(val) / len(episodes) < 0.23
    held_out = {e.name.split("/", 2)[2] for e in val}
    # a quarantined episode, new ones, and a re-sharding (other raw shard directories) move nobody
    others = [EpisodeRef(0, i, 0, 50, f"raw/{i % 7:05d}/lake/ep{i}.parquet#0") for i in range(1, 2400)]
    _, val2 = split_episodes(others, 0.2, seed=7)
    assert {e.name.split("/", 2)[2] for e in val2} & {f"lake/ep{i}.parquet#0" for i in range(1, 2000)} \
        == held_out - {"lake/ep0.parquet#0"}


def _split_before(episodes, val_fraction, seed):
    """split_episodes as it was (a sort over all episodes): the split must not move."""
    def score(ep):
        name = re.sub(r"^raw/[0-9]+/", "", ep.name)
        return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") / 2.0**64

    scores = {ep.name: score(ep) for ep in episodes}
    ranked = sorted(episodes, key=lambda ep: (scores[ep.name], ep.name))
    n_val = sum(1 for ep in ranked if scores[ep.name] < val_fraction)
    n_val = min(max(1, n_val), len(ranked) - 1)
    val = sorted(ranked[:n_val], key=lambda e: (e.shard, e.index))
    train = sorted(ranked[n_val:], key=lambda e: (e.shard, e.index))
    return train, val


def test_the_split_puts_every_episode_where_it_was_before() -> None:
    from trajflow.train.data import EpisodeRef

    rng = np.random.default_rng(5)
    names = [f"raw/{rng.integers(0, 30):05d}/lake/ep{i}.parquet#{i % 3}" for i in range(3000)]
    names += [f"lake/flat{i}.npz#0" for i in range(300)]  # no raw shard directory
    names += [f"raw/{s:05d}/same.npz#0" for s in (3, 1, 2)]  # one name in three raw shards: equal scores
    names += ["raw/x/odd#0", "raw//empty#0", "raw/0a/mixed#0", "raw/00001/raw/00002/nested#0"]
    episodes = [EpisodeRef(int(rng.integers(0, 8)), int(rng.integers(0, 400)), i, 50, name)
                for i, name in enumerate(names)]
    # a few copies of one (shard, index) and of one name: ties keep the order they had
    episodes += [EpisodeRef(episodes[0].shard, episodes[0].index, 10**6 + i, 50, names[i]) for i in range(3)]
    rng.shuffle(episodes)  # type: ignore[arg-type]
    for fraction in (0.1, 0.5, 0.93):
        for seed in (0, 7):
            assert split_episodes(episodes, fraction, seed) == _split_before(episodes, fraction, seed)
    # at least one on each side: the lowest and the highest of the ranking move, as before
    for small in (episodes[:2], episodes[:5], episodes[:40]):
        for fraction in (1e-9, 1 - 1e-9):
            for seed in range(4):
                got = split_episodes(small, fraction, seed)
                assert got == _split_before(small, fraction, seed)
                assert [[(e.offset, e.name) for e in side] for side in got] == \
                    [[(e.offset, e.name) for e in side] for side in _split_before(small, fraction, seed)]
    # the scores are computed as uint64 -> float64, exact as Python's int / 2.0**64 is
    edges = [0, 1, 2**53 - 1, 2**53 + 1, 2**54 + 3, 2**63 - 1, 2**63 + 1024, 2**63 + 1025, 2**64 - 1025, 2**64 - 1]
    edges += [int(v) for v in rng.integers(0, 2**63, 1000, dtype=np.uint64) * 2 + 1]
    assert (np.array(edges, np.uint64).astype(np.float64) / 2.0**64).tolist() == [v / 2.0**64 for v in edges]


class _FakeReader:
    """A shard whose every stream holds, in each row, the shard and the row: 100000 * shard + row."""

    dtype = "float32"

    def __init__(self, shard: int, rows: int):
        self.shard, self.rows = shard, rows

    def array(self, stream: str) -> np.ndarray:
        return (100000 * self.shard + np.arange(self.rows, dtype=np.float64))[:, None].repeat(2, axis=1)


def _fake_shards(lengths: list[int], shards: int, seed: int = 0):  # type: ignore[no-untyped-def]
    from trajflow.train.data import EpisodeRef, ShardSet

    rng = np.random.default_rng(seed)
    rows = [0] * shards
    episodes = []
    for i, n in enumerate(lengths):
        s = int(rng.integers(0, shards))
        episodes.append(EpisodeRef(s, i, rows[s], n, f"raw/00000/e{i}#0"))
        rows[s] += n
    return ShardSet([_FakeReader(s, r) for s, r in enumerate(rows)], list(range(shards)), episodes,  # type: ignore[list-item]
                    10.0, {"o": 2, "a": 2})


def _windows_before(episodes, need: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard, start) of every window as WindowDataset numbered them, one array entry a window."""
    shard_of, start_of = [np.zeros(0, np.int32)], [np.zeros(0, np.int64)]
    for ep in episodes:
        if ep.length >= need:
            starts = np.arange(ep.offset, ep.offset + ep.length - need + 1, stride, dtype=np.int64)
            start_of.append(starts)
            shard_of.append(np.full(len(starts), ep.shard, dtype=np.int32))
    return np.concatenate(shard_of), np.concatenate(start_of)


@pytest.mark.parametrize("task", ["behavior_cloning", "forecast"])
@pytest.mark.parametrize("stride", [1, 3])
def test_windows_keep_their_numbers_shard_and_start(task: str, stride: int) -> None:
    """Checkpoints' epoch orders are window numbers: each must still be the same window."""
    from trajflow.train.data import WindowDataset

    rng = np.random.default_rng(stride)
    lengths = [int(n) for n in rng.integers(1, 60, 300)] + [5, 6, 7, 8, 9]  # some shorter than a sample
    shards = _fake_shards(lengths, shards=4, seed=stride)
    cfg = TrainConfig(task=task, observation="o", action="a", window=6, stride=stride)
    episodes = [shards.episodes[i] for i in rng.permutation(len(lengths))]  # any order, kept as given
    ds = WindowDataset(shards, episodes, cfg)
    need = 7 if task == "forecast" else 6
    shard_before, start_before = _windows_before(episodes, need, stride)
    assert len(ds) == len(start_before)
    assert ds.skipped_episodes == sum(n < need for n in lengths)
    shard, start = ds.locate(np.arange(len(ds)))
    np.testing.assert_array_equal(shard, shard_before)
    np.testing.assert_array_equal(start, start_before)
    order = rng.permutation(len(ds))[:500]
    x, y = ds[order.tolist()]
    first = 100000 * shard_before[order] + start_before[order]
    np.testing.assert_array_equal(x[:, :, 0].numpy(), first[:, None] + np.arange(6))
    np.testing.assert_array_equal(y[:, 0].numpy(), first + (6 if task == "forecast" else 5))
    x1, _ = ds[int(order[0])]
    assert torch.equal(x1, x[0])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_the_window_index_takes_memory_by_episode_not_by_window() -> None:
    """10^9 windows (10^6 episodes of 1000 frames) took 12 GB on every rank, one start and
    one shard a window; here 10^7 windows would take 120 MB."""
    import tracemalloc

    from trajflow.train.data import WindowDataset

    shards = _fake_shards([1001] * 10_000, shards=8)
    tracemalloc.start()
    try:
        ds = WindowDataset(shards, shards.episodes, TrainConfig(observation="o", action="a", window=2))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ds) == 10_000 * 1000
    assert peak < 5_000_000, peak
    shard, start = ds.locate(np.array([0, 999, 1000, len(ds) - 1]))
    eps = shards.episodes
    assert shard.tolist() == [eps[0].shard, eps[0].shard, eps[1].shard, eps[-1].shard]
    assert start.tolist() == [eps[0].offset, eps[0].offset + 999, eps[1].offset, eps[-1].offset + 999]


def test_normalisation_statistics_come_from_the_training_split_only(tmp_path: Path) -> None:
    settings, storage = small_run(tmp_path, epochs=1, val_fraction=0.3)
    summary = train(settings)
    model, _ = artifacts.load_model(storage)
    shards = open_shards(storage, ["observation.state", "action"])
    data = build_data(shards, settings.config)
    train_obs = np.concatenate([shards.readers[e.shard].episode(e.index, "observation.state") for e in data.train_episodes])
    all_obs = np.concatenate([shards.readers[e.shard].episode(e.index, "observation.state") for e in shards.episodes])
    np.testing.assert_allclose(model.input_mean.numpy(), train_obs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.input_std.numpy(), train_obs.std(0), rtol=1e-4)
    assert not np.allclose(model.input_mean.numpy(), all_obs.mean(0), rtol=1e-5, atol=1e-6)
    assert summary["data"]["val_episodes"] == len(data.val_episodes)


def test_epoch_batches_cover_the_data_once_per_epoch_and_resume_mid_epoch(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    write_synthetic_shards(storage, shards=1, episodes_per_shard=4, length=60)
    data = build_data(open_shards(storage, ["observation.state", "action"]), TrainConfig(window=8, val_fraction=0.25))
    n = len(data.train)
    ranks = [EpochBatches(data.train, 16, rank, 2, seed=3) for rank in range(2)]
    for sampler in ranks:
        sampler.set_epoch(0)
    seen = [i for sampler in ranks for batch in sampler for i in batch]
    assert set(seen) == set(range(n)) and len(seen) == n + (n % 2)  # DistributedSampler pads to even
    epoch0 = [list(b) for b in ranks[0]]
    ranks[0].set_epoch(1)
    assert [list(b) for b in ranks[0]] != epoch0  # a new order each epoch
    ranks[0].set_epoch(0, skip_batches=2)
    assert [list(b) for b in ranks[0]] == epoch0[2:]
    assert len(ranks[0]) == len(epoch0) - 2
    capped = EpochBatches(data.train, 16, 0, 1, seed=3, max_batches=2)
    capped.set_epoch(0)
    assert len(list(capped)) == 2


@pytest.mark.parametrize("windows, world_size", [(10, 1), (11, 3), (2, 5), (1000, 8)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_epoch_batches_deal_the_windows_as_distributed_sampler_does(windows: int, world_size: int,
                                                                      shuffle: bool) -> None:
    """Index for index: a checkpoint taken mid-epoch resumes on the same batches."""
    from torch.utils.data import DistributedSampler

    data = list(range(windows))
    for epoch in (0, 3):
        for rank in range(world_size):
            ours = EpochBatches(data, 4, rank, world_size, seed=7, shuffle=shuffle)  # type: ignore[arg-type]
            ours.set_epoch(epoch)
            theirs = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=7)  # type: ignore[arg-type]
            theirs.set_epoch(epoch)
            assert [i for batch in ours for i in batch] == list(theirs)
            assert ours.batches_per_epoch() == -(-len(theirs) // 4)
            # the rank keeps its share, not the whole epoch's permutation (8 bytes a window)
            mine = ours.rank_indices()
            assert mine.untyped_storage().nbytes() == mine.numel() * mine.element_size()


def test_data_errors_name_the_problem(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "empty")
    with pytest.raises(TransientError, match="no done shards yet"):
        open_shards(storage, ["observation.state"])
    storage = LocalStorage(tmp_path / "r")
    write_synthetic_shards(storage, shards=1, episodes_per_shard=2, length=30)
    with pytest.raises(PermanentError, match=r"no stream 'joint.pos' \(it has observation.state, action\)"):
        open_shards(storage, ["joint.pos"])
    # a NaN frame in the training data is a data error, not a divergence
    bad = LocalStorage(tmp_path / "nan")
    obs = np.zeros((30, 2))
    obs[5, 1] = np.nan
    eps = [Episode(data={"o": obs if e == 0 else np.ones((30, 2)), "a": np.zeros((30, 1))}, source="raw/x", episode=str(e))
           for e in range(4)]
    written = write_shard(bad, shard_key(0), eps, dtype="float32", rate_hz=10.0)
    write_manifest(bad, "preprocess", 0, 1, [written.item()], num_episodes=4, num_frames=120)
    settings = local_settings(tmp_path, "nan", observation="o", action="a", window=4, val_fraction=0.25,
                              metrics_port=0, model=SMALL_MODEL, epochs=1)
    with pytest.raises(PermanentError, match="episode 'raw/x#0' has NaN/Inf values in stream 'o'"):
        train(settings)


def test_the_passes_over_the_data_take_long_episodes_a_slice_at_a_time(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Hours of frames of one episode are never all in memory at once (twice, as float32
    and float64): the statistics and the NaN check go ROWS_PER_PASS rows at a time."""
    from trajflow.train import data as train_data

    storage = LocalStorage(tmp_path)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(500, 3))
    obs[403, 2] = np.inf
    eps = [Episode(data={"o": rng.normal(size=(500, 3)), "a": np.zeros((500, 1))}, source="raw/x", episode="0"),
           Episode(data={"o": obs, "a": np.zeros((500, 1))}, source="raw/x", episode="1")]
    write_manifest(storage, "preprocess", 0, 1, [write_shard(storage, shard_key(0), eps, dtype="float32",
                                                             rate_hz=10.0).item()], num_episodes=2, num_frames=1000)
    shards = open_shards(storage, ["o", "a"])
    refs = list(shards.episodes)
    whole = train_data.local_moments(shards, refs[:1], ["o", "a"])
    slices = []
    real = train_data.as_float32
    monkeypatch.setattr(train_data, "ROWS_PER_PASS", 64)
    monkeypatch.setattr(train_data, "as_float32", lambda reader, stream, rows: slices.append(rows) or real(reader, stream, rows))
    np.testing.assert_allclose(train_data.local_moments(shards, refs[:1], ["o", "a"]), whole, rtol=1e-12)
    assert max(r.stop - r.start for r in slices) == 64
    with pytest.raises(PermanentError, match="episode 'raw/x#1' has NaN/Inf values in stream 'o'"):
        train_data.check_finite(shards, refs, ["o"])


# ---- models ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lstm", "gru", "transformer"])
def test_models_predict_in_raw_units(kind: str) -> None:
    spec = ModelSpec(kind, input_dim=5, output_dim=3, window=6, hidden_size=16, num_layers=2, num_heads=4,
                     feedforward_size=32, dropout=0.0)
    model = TrajectoryModel(spec).eval()
    model.set_normalization(np.full(5, 2.0), np.full(5, 3.0), np.array([10.0, 20.0, 30.0]), np.array([1.0, 2.0, 4.0]))
    x = torch.randn(4, 6, 5)
    normalised = model(x)
    assert normalised.shape == (4, 3)
    raw = model.predict(x)
    torch.testing.assert_close(raw, normalised * torch.tensor([1.0, 2.0, 4.0]) + torch.tensor([10.0, 20.0, 30.0]))
    torch.testing.assert_close(model.normalize_target(raw), normalised)
    # the input statistics are applied: shifting the raw input by the mean is not a no-op
    assert not torch.allclose(model(x + 2.0), normalised)


# ---- checkpoints -----------------------------------------------------------------------


def _save(store: CheckpointStore, step: int, val: float | None, epoch: int = 0) -> None:
    store.save({"model": {"w": torch.full((3,), float(step))}}, step=step, epoch=epoch, batch_in_epoch=0 if val else 5,
               val_loss=val, config_hash="h")


def test_checkpoints_keep_last_k_and_the_best(storage) -> None:  # type: ignore[no-untyped-def]
    store = CheckpointStore(storage, keep_last=2)
    for step, val in [(10, 0.5), (20, 0.1), (25, None), (30, 0.4), (40, 0.3)]:
        _save(store, step, val)
    assert [c.step for c in store.list()] == [20, 30, 40]  # last two + the best (step 20)
    assert store.best().step == 20
    info, payload, skipped = store.latest_valid()
    assert info.step == 40 and skipped == [] and payload["model"]["w"][0].item() == 40.0
    keys = {o.key for o in storage.list("train/checkpoints/")}
    assert keys == {f"train/checkpoints/ckpt-{s:010d}.{ext}" for s in (20, 30, 40) for ext in ("pt", "json")}


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(storage, caplog) -> None:  # type: ignore[no-untyped-def]
    store = CheckpointStore(storage, keep_last=5)
    for step in (1, 2, 3):
        _save(store, step, 1.0 / step)
    payload_key = "train/checkpoints/ckpt-0000000003.pt"
    data = bytearray(storage.read_bytes(payload_key))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(payload_key, bytes(data))
    storage.write_bytes("train/checkpoints/ckpt-0000000004.json", b"{not json")  # a torn marker
    # numbers beyond an integer and nesting beyond the parser: unreadable too, not a crash
    storage.write_bytes("train/checkpoints/ckpt-0000000005.json",
                        b'{"format": "trajflow.checkpoint", "version": 1, "step": Infinity}')
    storage.write_bytes("train/checkpoints/ckpt-0000000006.json", b"[" * 100_000 + b"]" * 100_000)
    with caplog.at_level(logging.WARNING, logger="trajflow.train.checkpoint"):
        info, payload, skipped = store.latest_valid()
    assert info.step == 2 and payload["model"]["w"][0].item() == 2.0
    assert [s.step for s in skipped] == [3]
    text = caplog.text
    assert "unreadable marker" in text and "ckpt-0000000003.pt: sha256" in text
    store.discard(skipped)
    assert [c.step for c in store.list()] == [1, 2]
    assert not storage.exists(payload_key)  # the corrupt payload goes with its marker


def test_the_best_of_equal_losses_is_the_earliest(storage) -> None:  # type: ignore[no-untyped-def]
    """As the trainer's best_epoch: the checkpoint kept as the best is the one exported."""
    store = CheckpointStore(storage, keep_last=1)
    for step in (10, 20, 30):
        _save(store, step, 0.5)
    assert store.best().step == 10
    assert [c.step for c in store.list()] == [10, 30]


@pytest.mark.parametrize("named", ["resampled/00000.safetensors", "train/checkpoints/ckpt-0000000001.pt"])
def test_a_marker_naming_another_object_is_ignored_and_that_object_kept(tmp_path: Path, caplog, named) -> None:  # type: ignore[no-untyped-def]
    storage = LocalStorage(tmp_path)
    storage.write_bytes("resampled/00000.safetensors", b"a shard")
    store = CheckpointStore(storage, keep_last=5)
    _save(store, 1, 0.5)
    marker = "train/checkpoints/ckpt-0000000005.json"
    doc = json.loads(storage.read_bytes("train/checkpoints/ckpt-0000000001.json"))
    storage.write_bytes(marker, json.dumps({**doc, "step": 5, "key": named, "size": 1}).encode())
    with caplog.at_level(logging.WARNING, logger="trajflow.train.checkpoint"):
        info, _, skipped = store.latest_valid()
    assert info.step == 1 and skipped == []
    assert f"ckpt-0000000005.json: a marker of step 5 naming {named!r}" in caplog.text
    _save(store, 6, 0.4)  # pruning passes it by too
    assert storage.read_bytes("resampled/00000.safetensors") == b"a shard"
    assert storage.exists("train/checkpoints/ckpt-0000000001.pt")


def test_an_intact_checkpoint_that_does_not_unpickle_stops_and_is_kept(storage, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Bytes that match the marker but that this process cannot load (another torch, a
    weights_only allowlist) are not corrupt: a permanent error naming the file, nothing deleted."""
    store = CheckpointStore(storage, keep_last=5)
    for step in (1, 2):
        _save(store, step, 1.0 / step)
    before = store.list()

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("Weights only load failed: Unsupported global: numpy.core.multiarray._reconstruct")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(PermanentError, match=r"ckpt-0000000002\.pt: cannot be loaded .*Unsupported global") as caught:
        store.latest_valid()
    assert caught.value.exit_code == ExitCode.PERMANENT
    monkeypatch.undo()
    assert store.list() == before
    # a verified payload that is no trajflow checkpoint: the same
    info = store.list()[-1]
    buffer = io.BytesIO()
    torch.save({"something": "else"}, buffer)
    data = buffer.getvalue()
    storage.write_bytes(info.key, data)
    doc = json.loads(storage.read_bytes(info.marker))
    doc.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    storage.write_bytes(info.marker, json.dumps(doc).encode())
    with pytest.raises(PermanentError, match=r"ckpt-0000000002\.pt: not a trajflow checkpoint payload"):
        store.latest_valid()
    assert [c.step for c in store.list()] == [1, 2]


def test_orphan_payloads_are_pruned(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    store = CheckpointStore(storage, keep_last=1)
    storage.write_bytes("train/checkpoints/ckpt-0000000005.pt", b"a writer died before its marker")
    _save(store, 7, 0.2)
    assert not storage.exists("train/checkpoints/ckpt-0000000005.pt")
    assert [c.step for c in store.list()] == [7]


# ---- artifacts and exit codes ---------------------------------------------------------


def test_metrics_json_has_no_nan_and_curve_is_png(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    artifacts.write_metrics(storage, {"loss": float("nan"), "history": [{"val_loss": float("inf")}]})
    assert read_train_metrics(storage) == {"loss": None, "history": [{"val_loss": None}]}
    png = artifacts.render_loss_curve([{"epoch": 0, "train_loss": 1.0, "val_loss": 0.5}], 2.0, "t")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_the_loss_curve_leaves_out_non_finite_losses_and_goes_logarithmic_over_decades() -> None:
    """One drawing for the training's loss_curve.png and the report's picture."""
    from matplotlib.figure import Figure

    from trajflow.train.curves import plot_losses

    def drawn(history: list[dict], initial: float | None) -> tuple[bool, str, list[list[tuple[float, float]]]]:  # type: ignore[type-arg]
        ax = Figure().add_subplot(1, 1, 1)
        plotted = plot_losses(ax, history, initial)
        return plotted, ax.get_yscale(), [list(map(tuple, line.get_xydata().tolist())) for line in ax.get_lines()]

    history = [{"epoch": 0, "train_loss": 1.0, "val_loss": 0.5}, {"epoch": 1, "train_loss": float("nan"), "val_loss": 0.01}]
    plotted, scale, lines = drawn(history, 2.0)
    assert plotted and scale == "log"  # 2.0 down to 0.01
    assert lines == [[(1.0, 1.0)], [(0.0, 2.0), (1.0, 0.5), (2.0, 0.01)]]  # the NaN left out; epoch 0: untrained
    assert drawn(history[:1], None)[1] == "linear"
    assert drawn([{"epoch": 0, "train_loss": None}], None)[0] is False


@pytest.mark.parametrize(
    ("codes", "expected"),
    [([5, 1], ExitCode.DIVERGED), ([1, -9], ExitCode.ERROR), ([2, 5], ExitCode.CONFIG), ([4], ExitCode.TRANSIENT),
     ([3, 4], ExitCode.PERMANENT), ([-15], ExitCode.ERROR)],
)
def test_pod_exit_code_prefers_the_decisive_worker_code(codes: list[int], expected: ExitCode) -> None:
    assert pod_exit_code(codes) == int(expected)


# ---- in-process training runs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "task"), [("gru", "behavior_cloning"), ("lstm", "forecast"), ("transformer", "forecast")]
)
def test_validation_loss_halves_and_the_model_artifact_predicts(tmp_path: Path, kind: str, task: str) -> None:
    model = {"type": kind, "hidden_size": 32, "num_layers": 1, "num_heads": 4}
    epochs = 3 if kind != "transformer" else 2
    settings, storage = small_run(tmp_path, task=task, model=model, epochs=epochs)
    summary = train(settings)
    assert summary["status"] == "completed" and summary["epochs_completed"] == epochs
    assert summary["final_val_loss"] < 0.5 * summary["initial_val_loss"], summary["history"]
    assert summary["ranks_in_sync"] and len(summary["parameter_digests"]) == 1
    for key in (artifacts.METRICS_KEY, artifacts.CURVE_KEY, artifacts.CONFIG_KEY, artifacts.MODEL_KEY,
                artifacts.MODEL_INFO_KEY):
        assert storage.exists(key), key
    written = read_train_metrics(storage)
    assert written["best_val_loss"] == pytest.approx(summary["best_val_loss"])
    assert [h["epoch"] for h in written["history"]] == list(range(epochs))
    # the exported model reproduces the validation loss in raw units
    loaded, description = artifacts.load_model(storage)
    assert description["task"] == task and description["spec"]["type"] == kind
    data = build_data(open_shards(storage, [settings.config.observation, settings.config.action]), settings.config)
    x, y = data.val[list(range(len(data.val)))]
    err = ((loaded.predict(x) - y) / loaded.target_std).square().mean().item()
    assert err == pytest.approx(summary["best_val_loss"], rel=1e-3)


def test_a_finished_run_resumes_to_the_same_result_without_training(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    settings, storage = small_run(tmp_path, epochs=2)
    first = train(settings)
    checkpoints = CheckpointStore(storage).list()
    payload_reads: list[str] = []
    read_bytes = LocalStorage.read_bytes

    def counting(self: LocalStorage, key: str) -> bytes:
        if key.endswith(".pt"):
            payload_reads.append(key)
        return read_bytes(self, key)

    monkeypatch.setattr(LocalStorage, "read_bytes", counting)
    again = train(settings)
    # the checkpoint resumed from (rank 0 verified it: not read again), then the best one for the model
    assert payload_reads == [checkpoints[-1].key, CheckpointStore(storage).best().key]
    assert again["steps"] == first["steps"] and again["history"] == first["history"]
    assert CheckpointStore(storage).list() == checkpoints  # nothing trained, nothing written
    assert again["resumed_from"][-1]["step"] == first["steps"]
    # more epochs continue from the last checkpoint
    longer = local_settings(tmp_path, "run", **{**settings.config.model_dump(), "epochs": 3})
    third = train(longer)
    assert third["epochs_completed"] == 3 and third["history"][:2] == first["history"]


def test_a_warm_up_as_long_as_the_run_is_warned_about(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """The learning rate would never reach learningRate: said, not refused, since more nodes
    (a helm upgrade) shorten the epochs of a run under way."""
    settings, _ = small_run(tmp_path, epochs=1, warmup_steps=10**6)
    with caplog.at_level(logging.WARNING, logger="trajflow.train.loop"):
        steps = train(settings)["steps"]
    assert (f"training.config.warmupSteps 1000000 is more than the whole run's {steps} steps (1 epochs of {steps} on "
            "1 process(es)): the learning rate never reaches learningRate") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trajflow.train.loop"):
        train(small_run(tmp_path, "warm-up-to-the-end", epochs=1, warmup_steps=steps)[0])  # its last step reaches it
    assert "warmupSteps" not in caplog.text


def test_a_rerun_of_a_finished_training_says_it_trained_nothing(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A setting changed after the final checkpoint is not applied: the log says so, with a
    record the runner's summary and live view read, and config.yaml still describes the model."""
    from trajflow.local.progress import training_detail
    from trajflow.train.dist import DistContext

    settings, storage = small_run(tmp_path, epochs=2)
    step = train(settings)["steps"]
    trained_with = storage.read_bytes(artifacts.CONFIG_KEY)

    def rerun(dist: DistContext | None = None, **change: object) -> logging.LogRecord:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="trajflow.train.loop"):
            train(local_settings(tmp_path, "run", **{**settings.config.model_dump(), **change}), dist)
        assert "resumed from checkpoint" not in caplog.text
        [record] = [r for r in caplog.records if hasattr(r, "already_finished")]
        assert record.getMessage() == record.already_finished  # type: ignore[attr-defined]
        return record

    record = rerun(learning_rate=1e-2)
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"training had already finished at epoch 2 of 2 (checkpoint train/checkpoints/ckpt-{step:010d}.pt, step "
        f"{step}): settings changed since are not applied (raise training.config.epochs to train on, or use a new "
        "global.runId)")
    assert training_detail(record.__dict__, 2)[0] == "epoch 2/2"  # the checkpoint's next epoch would show 3/2
    assert storage.read_bytes(artifacts.CONFIG_KEY) == trained_with

    record = rerun(epochs=1)
    assert "at epoch 2, past the 1 epochs configured" in record.getMessage()
    assert training_detail(record.__dict__, 1)[0] == "epoch 2/2"
    # the launcher restarting the same run (writing the model failed) changed nothing: no warning
    record = rerun(DistContext(restart_count=1))
    assert record.levelno == logging.INFO and "not applied" not in record.getMessage()


def test_mid_epoch_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """Resume from a checkpoint taken inside an epoch: same batches, optimiser and RNG state
    (dropout, between the two GRU layers, consumes the RNG)."""
    config = {"epochs": 2, "checkpoints": {"every_steps": 4, "keep_last": 50},
              "model": {**SMALL_MODEL, "num_layers": 2, "dropout": 0.3}}
    settings, storage = small_run(tmp_path, "ref", **config)
    reference = train(settings)
    store = CheckpointStore(storage, keep_last=50)
    infos = store.list()
    mid = next(c for c in infos if c.epoch == 1 and c.batch_in_epoch > 0)
    # as if the run had died just after `mid`: every later checkpoint is gone
    store.discard([c for c in infos if c.step > mid.step])
    resumed = train(settings)
    assert resumed["resumed_from"][-1]["step"] == mid.step and resumed["resumed_from"][-1]["batch_in_epoch"] > 0
    assert resumed["steps"] == reference["steps"]
    for a, b in zip(resumed["history"], reference["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-9)
    assert resumed["parameter_digests"] == reference["parameter_digests"]


def test_corrupt_newest_checkpoint_is_skipped_on_resume(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    settings, storage = small_run(tmp_path, epochs=2)
    train(settings)
    newest = CheckpointStore(storage).list()[-1]
    storage.write_bytes(newest.key, storage.read_bytes(newest.key)[:-100])  # truncated
    longer = local_settings(tmp_path, "run", **{**settings.config.model_dump(), "epochs": 3})
    with caplog.at_level(logging.WARNING):
        summary = train(longer)
    assert "skipping corrupt checkpoint" in caplog.text
    resumed = summary["resumed_from"][-1]
    assert resumed["step"] < newest.step and resumed["epoch"] == 1
    assert summary["epochs_completed"] == 3 and [h["epoch"] for h in summary["history"]] == [0, 1, 2]


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    settings, _ = small_run(tmp_path, epochs=1)
    train(settings)
    other = local_settings(tmp_path, "run", **{**settings.config.model_dump(), "window": 12})
    with pytest.raises(ConfigError, match=r"was written for a different task/streams/window/model \(training.config "
                                          r"window 8 -> 12\); restore them"):
        train(other)
    # the settings that differ are named, a model's by their keys
    wider = local_settings(tmp_path, "run", **{**settings.config.model_dump(), "model": {**SMALL_MODEL, "hidden_size": 48}})
    with pytest.raises(ConfigError, match=r"\(training.config model.hiddenSize 32 -> 48\)"):
        train(wider)


# preprocessing redone with more joints, or at another targetRateHz (same widths, but the
# model learnt 50 Hz dynamics), or from other recordings of the same shape, the run id and
# training config kept
@pytest.mark.parametrize("data, refusal", [
    ({"system": System(joints=4)}, r"written for another model: input_dim 6 \(the current data and config give 8\)"),
    ({"system": System(rate_hz=100.0)}, r"written for another model: data at 50 Hz \(the current shards are at 100 Hz\)"),
    ({"seed": 7}, r"trained on other data: the training split's frames differ from the current shards'"),
], ids=["widths", "rate", "recordings"])
def test_checkpoint_of_other_data_is_refused(tmp_path: Path, data: dict, refusal: str) -> None:
    settings, storage = small_run(tmp_path, epochs=1)
    train(settings)
    for obj in list(storage.list("resampled/")):
        storage.delete(obj.key)
    write_synthetic_shards(storage, shards=2, episodes_per_shard=6, length=120, **data)
    longer = local_settings(tmp_path, "run", **{**settings.config.model_dump(), "epochs": 2})
    with pytest.raises(ConfigError, match=r"ckpt-\d+\.pt was " + refusal):
        train(longer)


def test_the_same_frames_resampled_again_are_the_same_data_other_frames_are_not() -> None:
    rng = np.random.default_rng(0)
    frames = rng.normal(0.0, 3.0, size=(50_000, 4)).astype(np.float32)

    def moments(x: np.ndarray) -> np.ndarray:  # as local_moments lays them out: count, sums, squares
        x = x.astype(np.float64)
        return np.concatenate([[len(x)], x.sum(0), (x * x).sum(0)])

    reference = moments(frames)
    # another kernel's rounding (Triton against torch: float32 ulps) and another summation order
    rounded = frames * (1 + 3e-7 * rng.standard_normal(frames.shape)).astype(np.float32)
    assert same_data(reference.tolist(), moments(rounded[::-1]))
    assert same_data(None, reference)  # a checkpoint written before the moments were recorded
    assert not same_data(reference.tolist(), moments(frames[:-1]))  # one frame fewer
    assert not same_data(reference.tolist(), moments(rng.normal(0.0, 3.0, size=frames.shape)))  # other recordings


def test_corrupt_best_checkpoint_falls_back_to_the_next_best(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    settings, storage = small_run(tmp_path, epochs=2, checkpoints={"keep_last": 50})
    train(settings)
    store = CheckpointStore(storage, keep_last=50)
    first, last = [c for c in store.list() if c.val_loss is not None]
    # make the older epoch checkpoint the best one, then corrupt its payload
    marker = json.loads(storage.read_bytes(first.marker))
    storage.write_bytes(first.marker, json.dumps({**marker, "val_loss": 0.0}).encode())
    payload = bytearray(storage.read_bytes(first.key))
    payload[len(payload) // 2] ^= 0xFF
    storage.write_bytes(first.key, bytes(payload))
    storage.delete(artifacts.MODEL_KEY)  # as if the pod died in finish()
    with caplog.at_level(logging.WARNING):
        summary = train(settings)
    assert summary["status"] == "completed" and "best checkpoint unusable" in caplog.text
    assert first.step not in [c.step for c in store.list()]  # the corrupt one is removed
    model, info = artifacts.load_model(storage)
    assert info["epoch"] == last.epoch - 1 and info["val_loss"] == pytest.approx(last.val_loss)


def test_min_delta_early_stopping_exports_the_reported_best(tmp_path: Path) -> None:
    """minDelta decides when to stop; the best loss reported and the model exported are the
    lowest validation loss, the same checkpoint either way."""
    settings, storage = small_run(tmp_path, epochs=6, early_stopping={"patience": 2, "min_delta": 1e6},
                                  checkpoints={"keep_last": 1})
    summary = train(settings)
    losses = [h["val_loss"] for h in summary["history"]]
    assert summary["status"] == "early_stopped" and len(losses) == 3  # no epoch beats the first by 1e6
    assert summary["best_val_loss"] == min(losses) and summary["best_epoch"] == losses.index(min(losses))
    assert summary["best_epoch"] > 0  # the losses fall: the best is not the epoch minDelta measures from
    _, description = artifacts.load_model(storage)
    assert description["epoch"] == summary["best_epoch"]
    assert description["val_loss"] == pytest.approx(summary["best_val_loss"])
    # a resume of the stopped run stays stopped
    again = train(settings)
    assert again["steps"] == summary["steps"] and again["status"] == "early_stopped"


@pytest.mark.parametrize("change", [{"seed": 7}, {"val_fraction": 0.3}, {"stride": 2}])
def test_resume_refuses_other_split_settings(tmp_path: Path, change: dict) -> None:  # type: ignore[type-arg]
    settings, _ = small_run(tmp_path, epochs=1)
    train(settings)
    other = local_settings(tmp_path, "run", **{**settings.config.model_dump(), "epochs": 2, **change})
    name = {"seed": "seed", "val_fraction": "valFraction", "stride": "stride"}[next(iter(change))]
    with pytest.raises(ConfigError, match=rf"written with other training\.config {name} .* use a new global\.runId"):
        train(other)


@pytest.mark.parametrize("change", ["batch_size", "world_size"])
def test_resume_on_another_scale_goes_on_from_the_same_point_of_the_epoch(tmp_path: Path, caplog, change: str) -> None:  # type: ignore[no-untyped-def]
    """A mid-epoch checkpoint resumed with half the batchSize, or one written by twice the
    processes, goes on at twice its batch position: the same windows are done."""
    settings, storage = small_run(tmp_path, epochs=2, checkpoints={"every_steps": 3, "keep_last": 50})
    train(settings)
    store = CheckpointStore(storage, keep_last=50)
    infos = store.list()
    mid = next(c for c in infos if c.epoch == 1 and c.batch_in_epoch > 0)
    store.discard([c for c in infos if c.step > mid.step])
    size = 64
    if change == "batch_size":
        size = 32
    else:  # as if two processes had written it (a world of one cannot restore their generators)
        payload = store.load(mid)
        store.save({**payload, "world_size": 2}, step=mid.step, epoch=mid.epoch, batch_in_epoch=mid.batch_in_epoch,
                   val_loss=None, config_hash=mid.config_hash)
    resumed = local_settings(tmp_path, "run", **{**settings.config.model_dump(), "batch_size": size})
    with caplog.at_level(logging.WARNING):
        summary = train(resumed)
    position = 2 * mid.batch_in_epoch
    processes = 1 if change == "batch_size" else 2
    data = build_data(open_shards(storage, [resumed.config.observation, resumed.config.action]), resumed.config)
    per_epoch = EpochBatches(data.train, size, 0, 1, resumed.config.seed).batches_per_epoch()
    assert (f"written by {processes} processes with batchSize 64 at batch {mid.batch_in_epoch} of epoch 1, "
            f"{processes * 64 * mid.batch_in_epoch} windows in; this run has 1 with {size} and {per_epoch} batches an "
            f"epoch: the epoch goes on from batch {position}, 0 of those windows again") in caplog.text
    assert summary["resumed_from"][-1]["resumed_at_batch"] == position
    assert summary["epochs_completed"] == 2 and position < per_epoch
    # epoch 1 ran the batches that the checkpoint had not covered
    assert summary["steps"] - mid.step == per_epoch - position


@pytest.mark.parametrize("before,after,done,per_epoch,kept_windows", [
    ((2, 16), (3, 16), 160, 100, 144),  # 5 batches of 32; batch 3 of 48 starts at 144
    ((1, 16), (1, 16), 160, 2, 16),  # maxStepsPerEpoch lowered to 2: the last batch (from 16) again
    ((1, 32), (1, 16), 160, 100, 160),  # the same point: nothing again
    # the same batch number, earlier windows: 3 batches of 8 end at 24, the 4th of 7 starts at 21
    ((1, 8), (1, 7), 24, 100, 21),
    ((1, 8), (1, 4), 24, 4, 12),  # and where maxStepsPerEpoch caps it at that number
])
def test_a_resume_on_another_scale_keeps_the_share_of_the_epochs_sums_not_trained_again(
        tmp_path: Path, before, after, done: int, per_epoch: int, kept_windows: int) -> None:  # type: ignore[no-untyped-def]
    """The epoch's loss and rate count each window once: the running sums that a mid-epoch
    checkpoint carries keep the share of the windows before the batch the epoch goes on from."""
    from trajflow.metrics import train_metrics
    from trajflow.train.dist import DistContext
    from trajflow.train.loop import Trainer

    (world, size), (new_world, new_size) = before, after
    settings, storage = small_run(tmp_path, batch_size=new_size)
    trainer = Trainer(settings, DistContext(world_size=new_world), storage, train_metrics())
    trainer.per_epoch = per_epoch
    st = trainer.state
    st.batch_in_epoch, st.epoch_samples = done // (world * size), float(done)
    st.epoch_loss_sum, st.epoch_train_seconds = 0.5 * done, 0.01 * done  # a loss of 0.5, 10 ms a window
    info = SimpleNamespace(key="train/checkpoints/x")
    trainer._place_in_epoch(info, {"world_size": world, "batch_size": size})  # type: ignore[arg-type]
    assert st.batch_in_epoch * new_world * new_size == kept_windows
    assert st.epoch_samples == pytest.approx(kept_windows)
    assert st.epoch_loss_sum / st.epoch_samples == pytest.approx(0.5)
    assert st.epoch_samples / st.epoch_train_seconds == pytest.approx(100)


@pytest.mark.parametrize("before,after", [((2, 16), (3, 16)), ((3, 16), (2, 16)), ((4, 8), (1, 24)), ((1, 8), (4, 16))])
def test_batches_done_on_one_world_size_are_not_dealt_again_on_another(before, after) -> None:
    """The first b batches of every rank are the first world x batchSize x b windows of the
    epoch's order, on any world size: another world size or batch size goes on from there,
    with every window of the epoch trained, and fewer than one step's windows trained twice."""
    class Windows:
        def __len__(self) -> int:
            return 1000

    (world, size), (new_world, new_size) = before, after

    def ranks(world: int, size: int, skip: int) -> list[list[int]]:
        out = []
        for rank in range(world):
            batches = EpochBatches(Windows(), size, rank, world, seed=3)  # type: ignore[arg-type]
            batches.set_epoch(2, skip_batches=skip)
            out.append([i for batch in batches for i in batch])
        return out

    whole = ranks(world, size, 0)
    done_batches = 5
    done = [i for share in whole for i in share[: done_batches * size]]
    position = world * size * done_batches // (new_world * new_size)
    rest = [i for share in ranks(new_world, new_size, position) for i in share]
    assert set(done) | set(rest) == set(range(1000))  # no window left out
    again = len(done) + len(rest) - len(set(done) | set(rest))
    padding = -(-1000 // new_world) * new_world - 1000  # the order's cyclic padding, as on any run
    assert again - padding < new_world * new_size


def test_resume_from_an_intact_checkpoint_that_does_not_load_fails_and_keeps_it(  # type: ignore[no-untyped-def]
        tmp_path: Path, monkeypatch) -> None:
    settings, storage = small_run(tmp_path, epochs=1)
    train(settings)
    before = CheckpointStore(storage).list()

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("Weights only load failed")

    monkeypatch.setattr(torch, "load", refuse)
    longer = local_settings(tmp_path, "run", **{**settings.config.model_dump(), "epochs": 2})
    with pytest.raises(PermanentError, match=rf"{before[-1].key}: cannot be loaded by this process"):
        train(longer)
    monkeypatch.undo()
    assert CheckpointStore(storage).list() == before  # not discarded, and no training from step 0


def test_an_unloadable_best_checkpoint_fails_the_finish_and_is_kept(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    settings, storage = small_run(tmp_path, epochs=2)
    train(settings)
    store = CheckpointStore(storage)
    first, newest = store.list()[-2:]
    # the newest's marker says it is worse, so the best (exported) is the first epoch's
    doc = json.loads(storage.read_bytes(newest.marker))
    storage.write_bytes(newest.marker, json.dumps({**doc, "val_loss": 1e9}).encode())
    assert store.best() == first
    unloadable, real_load = storage.read_bytes(first.key), torch.load

    def refuse_first(f, *args, **kwargs):  # type: ignore[no-untyped-def]
        if f.getvalue() == unloadable:
            raise RuntimeError("Weights only load failed")
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", refuse_first)
    with pytest.raises(PermanentError, match=rf"{first.key}: cannot be loaded"):
        train(settings)  # finished: resumes the newest, exports the best
    assert [c.step for c in store.list()] == [first.step, newest.step]


def test_when_every_checkpoint_is_corrupt_training_starts_over_with_a_warning(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    settings, storage = small_run(tmp_path, epochs=1)
    train(settings)
    infos = CheckpointStore(storage).list()
    for c in infos:
        storage.write_bytes(c.key, storage.read_bytes(c.key)[:-10])
    with caplog.at_level(logging.WARNING):
        summary = train(settings)
    assert summary["resumed_from"] == [] and summary["epochs_completed"] == 1
    line = next(r.getMessage() for r in caplog.records if "no checkpoint could be loaded" in r.getMessage())
    assert all(c.key in line for c in infos) and "step 0" in line


@pytest.mark.parametrize("legacy", [False, True])
def test_resume_past_a_lowered_max_steps_per_epoch_trains_the_last_batch_again(tmp_path: Path, caplog, legacy: bool) -> None:  # type: ignore[no-untyped-def]
    """maxStepsPerEpoch lowered below a mid-epoch checkpoint's position: every batch of the
    shorter epoch is done, so its last one is trained again (the schedule stays inside it,
    and the epoch ends at a step of its own: no checkpoint of the resumed step is rewritten)."""
    settings, storage = small_run(tmp_path, epochs=2, batch_size=16, checkpoints={"every_steps": 3, "keep_last": 50})
    train(settings)
    store = CheckpointStore(storage, keep_last=50)
    infos = store.list()
    mid = next(c for c in infos if c.epoch == 0 and c.batch_in_epoch >= 3)
    store.discard([c for c in infos if c.step > mid.step])
    if legacy:  # written before the payload said how many batches its epochs had
        payload = store.load(mid)
        del payload["batches_per_epoch"]
        store.save(payload, step=mid.step, epoch=mid.epoch, batch_in_epoch=mid.batch_in_epoch, val_loss=None,
                   config_hash=mid.config_hash)
        mid = store.list()[-1]
    before = storage.read_bytes(mid.key)
    capped = local_settings(tmp_path, "run", **{**settings.config.model_dump(), "max_steps_per_epoch": 2})
    with caplog.at_level(logging.WARNING):
        summary = train(capped)
    assert (f"{mid.key} was written by 1 processes with batchSize 16 at batch {mid.batch_in_epoch} of epoch 0, "
            f"{16 * mid.batch_in_epoch} windows in; this run has 1 with 16 and 2 batches an epoch: the epoch goes on "
            "from batch 1, 16 of those windows again") in caplog.text
    # epoch 0 ran its last batch from the resumed step, epoch 1 two more
    assert [h["step"] for h in summary["history"]] == [mid.step + 1, mid.step + 3]
    assert summary["resumed_from"][-1]["resumed_at_batch"] == 1
    assert all(h["learning_rate"] > 0 for h in summary["history"][:1])
    assert storage.read_bytes(mid.key) == before
    assert {mid.step, mid.step + 1, mid.step + 3} <= {c.step for c in store.list()}


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_terminated_training_checkpoints_its_step_and_pushes_where_it_stopped(  # type: ignore[no-untyped-def]
        tmp_path: Path, pushgateway, signum: str) -> None:
    """A pod deleted or preempted (SIGTERM from the launcher), or Ctrl-C, mid-epoch: the step
    it is at is checkpointed, so a rerun resumes there, and its one push still happens."""
    import signal
    import subprocess
    import sys

    sig = getattr(signal, signum)

    from trajflow.train.synthetic import write_config_file

    # long epochs (about 200 steps of 4): the epoch-end checkpoints cannot pass for the stop's
    settings, storage = small_run(tmp_path, epochs=10_000, log_every_steps=1, batch_size=4)
    glob = settings.global_.model_copy(update={"metrics": settings.global_.metrics.model_copy(
        update={"pushgateway_url": pushgateway.url})})
    config_file = write_config_file(tmp_path / "config.yaml", type(settings)(glob, settings.config, 0, 1))
    # SIGINT as a terminal's Ctrl-C finds it (a shell running these tests in the background ignores it)
    proc = subprocess.Popen([sys.executable, "-m", "trajflow.cli", "train", "--config", str(config_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # type: ignore[union-attr]
        if '"step"' in line or time.monotonic() > deadline:
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    success = [ln for ln in pushgateway.metrics_text().splitlines()
               if ln.startswith("trajflow_stage_success{") and 'stage="train"' in ln]
    assert success and success[0].endswith(" 0")
    interrupted = [ln for ln in pushgateway.metrics_text().splitlines()
                   if ln.startswith("trajflow_stage_interrupted{") and 'stage="train"' in ln]
    assert interrupted and interrupted[0].endswith(" 1")  # not failed: no failed-shard alert
    stopped_at = int(re.search(rf"1 rank\(s\) got a stop signal \(this one {signum}\); the group checkpointed "
                               r"step (\d+) \(epoch 0\)", err).group(1))
    newest = CheckpointStore(storage).list()[-1]
    assert (newest.step, newest.epoch, newest.batch_in_epoch) == (stopped_at, 0, stopped_at)
    assert newest.val_loss is None and stopped_at >= 1
    resumed = train(local_settings(tmp_path, "run", **{**settings.config.model_dump(), "epochs": 1}))
    assert [r["step"] for r in resumed["resumed_from"]] == [stopped_at]
    assert resumed["status"] == "completed" and resumed["steps"] > stopped_at


def test_a_stop_at_an_epochs_last_step_waits_for_the_epochs_end(  # type: ignore[no-untyped-def]
        tmp_path: Path, monkeypatch) -> None:
    """The epoch's end validates and checkpoints that step; the next step stops with a
    checkpoint of its own (one step, one checkpoint), and the resumed run goes on as if never
    stopped."""
    import signal

    from trajflow.errors import Terminated
    from trajflow.train import loop

    reference = train(small_run(tmp_path, "ref", epochs=2)[0])
    settings, storage = small_run(tmp_path, "stopped", epochs=2)
    batches = loop.Trainer._batches

    def sigterm_before_the_last_step(self, loader):  # type: ignore[no-untyped-def]
        epoch = list(batches(self, loader))
        for i, batch in enumerate(epoch):
            if i == len(epoch) - 1:
                self._stop_signal = signal.SIGTERM  # as the handler notes it
            yield batch

    with monkeypatch.context() as m:
        m.setattr(loop.Trainer, "_batches", sigterm_before_the_last_step)
        with pytest.raises(Terminated):
            train(settings)
    per_epoch = reference["history"][0]["step"]
    epoch_end, stop = CheckpointStore(storage).list()[-2:]
    assert (epoch_end.step, epoch_end.epoch, epoch_end.batch_in_epoch) == (per_epoch, 1, 0)
    assert epoch_end.val_loss == pytest.approx(reference["history"][0]["val_loss"], rel=1e-6)
    assert (stop.step, stop.epoch, stop.batch_in_epoch, stop.val_loss) == (per_epoch + 1, 1, 1, None)
    resumed = train(settings)
    assert [r["step"] for r in resumed["resumed_from"]] == [per_epoch + 1]
    assert [h["val_loss"] for h in resumed["history"]] == pytest.approx([h["val_loss"] for h in reference["history"]],
                                                                         rel=1e-6)
    assert resumed["steps"] == reference["steps"]


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_while_the_epochs_run_is_noted_and_a_later_one_raises(  # type: ignore[no-untyped-def]
        tmp_path: Path, monkeypatch, signum: str) -> None:
    import signal

    from trajflow.errors import Terminated
    from trajflow.train import loop

    sig = getattr(signal, signum)
    trainer = _trainer(tmp_path)
    monkeypatch.setattr(loop, "REPEATED_STOP_S", 0.2)
    with _sigint_handled_by(signal.default_int_handler):  # as an interactive Python has it
        before = signal.getsignal(sig)
        with pytest.raises(Terminated) as stopped:
            with trainer._signals_stop_at_a_step():
                os.kill(os.getpid(), sig)
                assert trainer._stop_signal == sig  # noted: the next step's all-reduce acts on it
                os.kill(os.getpid(), sig)  # at once: the same request (an agent's death, per thread)
                time.sleep(0.3)
                os.kill(os.getpid(), sig)
                pytest.fail("a later stop signal must stop at once")
        assert stopped.value.signum == sig
        assert signal.getsignal(sig) is before


def test_an_ignored_sigint_stays_ignored_while_the_epochs_run(tmp_path: Path) -> None:
    """A training started in the background (SIGINT ignored) is not stopped by one."""
    import signal

    trainer = _trainer(tmp_path)
    with _sigint_handled_by(signal.SIG_IGN), trainer._signals_stop_at_a_step():
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert trainer._stop_signal is None


def _trainer(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A trainer of a small run, not started."""
    from trajflow.metrics import train_metrics
    from trajflow.train import loop
    from trajflow.train.dist import DistContext

    settings, storage = small_run(tmp_path)
    return loop.Trainer(settings, DistContext.from_env(), storage, train_metrics())


@pytest.mark.parametrize("cap", [0, 50])
def test_validation_covers_every_window_or_the_same_seeded_sample_of_max_val_windows(tmp_path: Path, cap: int) -> None:
    """A validation split of a large dataset was evaluated whole at the start and after every
    epoch, however few steps an epoch took."""
    from trajflow.metrics import train_metrics
    from trajflow.train import loop
    from trajflow.train.dist import DistContext
    from trajflow.train.models import build_model

    settings, storage = small_run(tmp_path, max_val_windows=cap)
    trainer = loop.Trainer(settings, DistContext.from_env(), storage, train_metrics())
    data = trainer.load_data()
    cfg = settings.config
    model = build_model(ModelSpec.from_config(cfg.model, data.train.input_dim, data.train.target_dim, cfg.window))
    asked: list[list[int]] = []

    class Recording:
        def __len__(self) -> int:
            return len(data.val)

        def __getitem__(self, index):  # type: ignore[no-untyped-def]
            asked[-1].extend(np.asarray(index).tolist())
            return data.val[index]

    losses = []
    for _ in range(2):
        asked.append([])
        losses.append(trainer.evaluate(model, Recording()))  # type: ignore[arg-type]
    assert asked[0] == asked[1] and losses[0] == losses[1]  # the same windows at every pass
    assert len(data.val) > 50
    if not cap:
        assert asked[0] == list(range(len(data.val)))
        return
    assert len(set(asked[0])) == len(asked[0]) == cap and max(asked[0]) < len(data.val)
    assert max(asked[0]) - min(asked[0]) > len(data.val) // 2  # spread over the split, not its first windows
    with torch.no_grad():
        x, y = data.val[asked[0]]
        expected = (model(x) - model.normalize_target(y)).square().mean(dim=1).double().mean().item()
    assert losses[0] == pytest.approx(expected, rel=1e-5)


@contextlib.contextmanager
def _sigint_handled_by(handler):  # type: ignore[no-untyped-def]
    """SIGINT's handler set to ``handler`` for a while, then pytest's put back."""
    import signal

    before = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_resumed_run_pushes_where_it_stands(tmp_path: Path, pushgateway) -> None:  # type: ignore[no-untyped-def]
    """Resuming a finished run trains nothing; its push still carries the epoch and losses."""
    settings, _ = small_run(tmp_path, epochs=2)
    first = train(settings)
    glob = settings.global_.model_copy(update={"metrics": settings.global_.metrics.model_copy(
        update={"pushgateway_url": pushgateway.url})})
    train(type(settings)(glob, settings.config, 0, 1))
    with urllib.request.urlopen(f"{pushgateway.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()

    def pushed(name: str, *labels: str) -> float:
        line = next(ln for ln in text.splitlines()
                    if ln.startswith(name + "{") and all(x in ln for x in ('stage="train"', *labels)))
        return float(line.rsplit(" ", 1)[1])

    assert pushed("trajflow_train_epoch") == 1
    assert pushed("trajflow_train_best_val_loss") == pytest.approx(first["best_val_loss"])
    assert pushed("trajflow_train_loss", 'split="val"') == pytest.approx(first["history"][-1]["val_loss"])


@pytest.mark.parametrize("recorded", [True, False], ids=["time in the payload", "older payload: file time"])
def test_a_resumed_run_reports_its_checkpoints_time_not_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             recorded: bool) -> None:
    """The checkpoint-age alert falls back to the process start on a 0: a crash-looping run
    that resumes from the same checkpoint again and again would never look overdue."""
    from trajflow.train import loop

    settings, storage = small_run(tmp_path, epochs=1)
    train(settings)
    info = max(CheckpointStore(storage).list(), key=lambda c: c.step)  # the one a rerun resumes from
    written = CheckpointStore(storage).load(info)["written_at"]
    assert 0 < written <= time.time()
    if not recorded:  # a checkpoint of a version that did not record the time
        load = CheckpointStore.load
        monkeypatch.setattr(CheckpointStore, "load", lambda self, i, *a, **k: {
            key: v for key, v in load(self, i, *a, **k).items() if key != "written_at"})
        written = 1_700_000_000.0
        os.utime(tmp_path / "run" / info.key, (written, written))
    seen: list[float | None] = []
    restore = loop.Trainer._restore_gauges

    def spy(self):  # type: ignore[no-untyped-def]
        restore(self)
        seen.append(self.metrics.registry.get_sample_value("trajflow_train_last_checkpoint_time_seconds"))

    monkeypatch.setattr(loop.Trainer, "_restore_gauges", spy)
    train(settings)
    assert seen == [pytest.approx(written)]


def test_training_reports_progress_once_its_data_is_ready_and_after_each_validation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stall alert counts a rank's time without progress from its last progress: a load
    or a validation pass, not only a step, is progress."""
    from trajflow.train import loop

    settings, _ = small_run(tmp_path, epochs=1)
    seen: list[tuple[str, float]] = []
    evaluate = loop.Trainer.evaluate

    def spy(self, *args):  # type: ignore[no-untyped-def]
        seen.append(("before", self.metrics.registry.get_sample_value("trajflow_stage_last_progress_time_seconds")))
        started = time.time()
        loss = evaluate(self, *args)
        progress = self.metrics.registry.get_sample_value("trajflow_stage_last_progress_time_seconds")
        seen.append(("after", progress - started))
        return loss

    monkeypatch.setattr(loop.Trainer, "evaluate", spy)
    before_run = time.time()
    train(settings)
    # the initial validation runs before any step, once the data is ready
    assert seen[0][0] == "before" and seen[0][1] >= before_run
    assert [when for when, _ in seen] == ["before", "after"] * 2  # initial and end-of-epoch validation
    assert all(delta >= 0 for when, delta in seen if when == "after")


def test_the_learning_rate_gauge_is_set_before_any_step_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dashboard reads the gauges from the first push: a rate of 0 until the first logged step would be drawn."""
    from trajflow.train import loop

    settings, _ = small_run(tmp_path, epochs=1, warmup_steps=0)  # log_every_steps=1000: no step logs
    seen: list[float | None] = []
    end_epoch = loop.Trainer.end_epoch

    def spy(self, *args):  # type: ignore[no-untyped-def]
        seen.append(self.metrics.registry.get_sample_value("trajflow_train_learning_rate"))
        return end_epoch(self, *args)

    monkeypatch.setattr(loop.Trainer, "end_epoch", spy)
    train(settings)
    assert seen == [pytest.approx(3e-3)]


def test_a_loader_worker_that_sends_no_batch_fails_the_rank_with_a_reason(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose batch does not fit into a full /dev/shm drops it: the rank must not wait for ever."""
    from trajflow.train import data, loop

    settings, _ = small_run(tmp_path, num_workers=1)
    getitem = data.WindowDataset.__getitem__

    def stuck_in_workers(self, index):  # type: ignore[no-untyped-def]
        if torch.utils.data.get_worker_info() is not None:
            time.sleep(3)  # past the 1 s timeout; short, as each loader shutdown waits for its worker
        return getitem(self, index)

    monkeypatch.setattr(data.WindowDataset, "__getitem__", stuck_in_workers)
    monkeypatch.setattr(loop, "LOADER_TIMEOUT_S", 1.0)
    monkeypatch.setattr(loop, "_shm_nearly_full", lambda: True)
    with pytest.raises(PermanentError, match=r"no batch from the DataLoader workers in 1 s, and /dev/shm is nearly full"):
        train(settings)
    monkeypatch.setattr(loop, "_shm_nearly_full", lambda: False)  # something else held the worker: retried
    with pytest.raises(TransientError, match=r"no batch from the DataLoader workers in 1 s \(a worker stuck"):
        train(settings)


def test_shared_memory_counts_as_nearly_full_below_a_twentieth_or_16_mib_free(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from trajflow.train import loop

    def usage(total: int, free: int):  # type: ignore[no-untyped-def]
        return lambda path: shutil._ntuple_diskusage(total, total - free, free)  # type: ignore[attr-defined]

    monkeypatch.setattr(shutil, "disk_usage", usage(16 << 30, 100 << 20))
    assert loop._shm_nearly_full()  # 100 MiB of 16 GiB
    monkeypatch.setattr(shutil, "disk_usage", usage(16 << 30, 4 << 30))
    assert not loop._shm_nearly_full()
    monkeypatch.setattr(shutil, "disk_usage", usage(64 << 20, 10 << 20))
    assert loop._shm_nearly_full()  # a container's default 64 MiB, with room for no batch
    monkeypatch.setattr(shutil, "disk_usage", usage(64 << 20, 60 << 20))
    assert not loop._shm_nearly_full()


def test_a_resume_removes_abandoned_checkpoint_temporaries_but_not_one_being_written(tmp_path: Path) -> None:
    """An old Job's pod may still write its last checkpoint while the new Job's rank 0 resumes."""
    from trajflow.storage.local import TMP_PREFIX

    settings, storage = small_run(tmp_path, epochs=1)
    train(settings)
    directory = tmp_path / "run" / "train" / "checkpoints"
    abandoned, writing = directory / f"{TMP_PREFIX}abandoned", directory / f"{TMP_PREFIX}writing"
    abandoned.write_bytes(b"x")
    writing.write_bytes(b"y")
    hour_ago = time.time() - 3600
    os.utime(abandoned, (hour_ago, hour_ago))
    train(type(settings)(settings.global_, settings.config.model_copy(update={"epochs": 2}), 0, 1))
    assert not abandoned.exists() and writing.exists()


def test_nan_loss_stops_with_the_diverged_exit_code(tmp_path: Path) -> None:
    settings, storage = small_run(tmp_path, learning_rate=1e30, grad_clip=0.0)
    with pytest.raises(TrainingDiverged, match=r"became NaN/Inf at epoch 0, step \d+") as err:
        train(settings)
    assert err.value.exit_code == ExitCode.DIVERGED == 5
    assert read_train_metrics(storage)["status"] == "diverged"
    assert CheckpointStore(storage).list() == []  # nothing diverged was saved


def test_a_divergence_is_recorded_before_rank_0_writes_its_report(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A launcher whose peers left (their workers diverged too) stops this worker at once:
    the marker that tells it the run diverged must exist before the slow writes."""
    from trajflow.train import loop
    from trajflow.train.launch import FINAL_FAILURE_ENV, earlier_final_failure

    monkeypatch.setenv(FINAL_FAILURE_ENV, str(tmp_path / "final-failure.json"))
    seen = []
    real = loop.Trainer.write_progress

    def write_progress(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(earlier_final_failure())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "write_progress", write_progress)
    settings, _ = small_run(tmp_path, learning_rate=1e30, grad_clip=0.0)
    with pytest.raises(TrainingDiverged):
        train(settings)
    assert seen and seen[-1] is not None and seen[-1][0] == ExitCode.DIVERGED


def test_a_lost_rendezvous_after_a_final_failure_exits_with_that_failure(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """On another node than the store's, the workers' divergence must not read as a crash
    (exit 1, retried by the podFailurePolicy) when the store's node leaves first."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    from trajflow.train import launch

    def run(args):  # type: ignore[no-untyped-def]
        launch.record_final_failure(TrainingDiverged("loss became NaN/Inf at epoch 0, step 3"))
        raise RendezvousError("The connection to the C10d store has failed.")

    monkeypatch.setattr(torchrun, "run", run)
    options = launch.LaunchOptions(nproc_per_node="1", nnodes="2", rdzv_endpoint="127.0.0.1:1")
    assert launch.launch(options, ["--config", "x"]) == ExitCode.DIVERGED

    def lost(args):  # type: ignore[no-untyped-def]
        raise RendezvousError("The connection to the C10d store has failed.")

    monkeypatch.setattr(torchrun, "run", lost)
    assert launch.launch(options, ["--config", "x"]) == ExitCode.ERROR


def test_diverged_run_pushes_a_non_finite_loss(tmp_path: Path, pushgateway) -> None:  # type: ignore[no-untyped-def]
    """The final push carries the loss that diverged, so the NaN-loss alert (which matches
    `loss != loss or abs(loss) == Inf` on the pushed series) fires."""
    import math

    from prometheus_client.parser import text_string_to_metric_families

    settings, _ = small_run(tmp_path, learning_rate=1e30, grad_clip=0.0)
    glob = settings.global_.model_copy(update={"metrics": settings.global_.metrics.model_copy(
        update={"pushgateway_url": pushgateway.url})})
    with pytest.raises(TrainingDiverged):
        train(type(settings)(glob, settings.config, 0, 1))
    samples = {(s.name, s.labels.get("split")): s for family in text_string_to_metric_families(pushgateway.metrics_text())
               for s in family.samples if s.labels.get("job") == "trajflow"}
    loss = samples[("trajflow_train_loss", "train")]
    assert loss.labels["run"] == "run" and loss.labels["stage"] == "train" and loss.labels["shard"] == "0"
    assert not math.isfinite(loss.value)
    assert samples[("trajflow_stage_success", None)].value == 0


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), float("-inf"), 0.25])
@pytest.mark.parametrize("split", ["train", "val"])
def test_divergence_sets_the_loss_gauge_non_finite(tmp_path: Path, loss: float, split: str) -> None:
    import math

    from trajflow.metrics import train_metrics
    from trajflow.train.dist import DistContext
    from trajflow.train.loop import Trainer

    settings, storage = small_run(tmp_path)
    metrics = train_metrics()
    metrics.loss.labels(split=split).set(0.5)  # the last finite epoch
    error = Trainer(settings, DistContext(), storage, metrics)._diverged(loss, 0, split)
    assert error.exit_code == ExitCode.DIVERGED
    value = metrics.registry.get_sample_value("trajflow_train_loss", {"split": split})
    assert value is not None
    if math.isinf(loss):
        assert value == loss
    else:  # NaN, or finite because the gradient norm diverged: the next loss would be NaN
        assert math.isnan(value)


def test_metrics_endpoint_and_final_push(tmp_path: Path, pushgateway,  # type: ignore[no-untyped-def]
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from trajflow.train import loop

    port = free_port()
    settings, _ = small_run(tmp_path, epochs=1, metrics_port=port)
    glob = settings.global_.model_copy(update={"metrics": settings.global_.metrics.model_copy(
        update={"pushgateway_url": pushgateway.url})})
    settings = type(settings)(glob, settings.config, 0, 1)
    scraped: list[str] = []
    end_epoch = loop.Trainer.end_epoch

    def scrape(self, *args):  # type: ignore[no-untyped-def]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            scraped.append(resp.read().decode())
        return end_epoch(self, *args)

    monkeypatch.setattr(loop.Trainer, "end_epoch", scrape)
    summary = train(settings)
    assert len(scraped) == 1 and "trajflow_train_steps_total" in scraped[0]  # served while training
    with urllib.request.urlopen(f"{pushgateway.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    steps = [line for line in text.splitlines() if line.startswith("trajflow_train_steps_total{")]
    assert steps and 'run="run"' in steps[0] and 'stage="train"' in steps[0] and 'shard="0"' in steps[0]
    assert 'local_rank="0"' in steps[0]  # as the PodMonitor labels the scraped series
    assert float(steps[0].rsplit(" ", 1)[1]) == summary["steps"]
    success = [line for line in text.splitlines() if line.startswith("trajflow_stage_success{") and 'stage="train"' in line]
    assert success and success[0].endswith(" 1")
    # the endpoint is closed once training has returned
    with pytest.raises(urllib.error.URLError) as closed:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    assert isinstance(closed.value.reason, ConnectionRefusedError)


def test_a_run_with_fewer_processes_drops_the_groups_of_the_others(tmp_path: Path, pushgateway) -> None:  # type: ignore[no-untyped-def]
    """After `helm upgrade` lowers nodes or nprocPerNode, the groups of the processes that
    are gone (here a failed earlier try: success 0, loss +Inf) leave the Pushgateway."""
    from prometheus_client.parser import text_string_to_metric_families

    from trajflow.metrics import Pusher, download_metrics, train_metrics

    def push(run: str, shard: str, local_rank: str | None, stage=train_metrics) -> None:
        metrics = stage()
        if local_rank is not None:
            metrics.loss.labels(split="train").set(float("inf"))
        labels = {"local_rank": local_rank} if local_rank is not None else None
        assert Pusher(pushgateway.url, metrics, run=run, shard=shard, labels=labels).push()

    push("run", "1", "0")  # a second node
    push("run", "0", "2")  # a third process on this node
    push("other", "1", "0")  # another run's
    push("run", "1", None, stage=download_metrics)  # another stage's
    settings, _ = small_run(tmp_path, epochs=1)
    glob = settings.global_.model_copy(update={"metrics": settings.global_.metrics.model_copy(
        update={"pushgateway_url": pushgateway.url})})
    train(type(settings)(glob, settings.config, 0, 1))

    groups = {(s.labels.get("run"), s.labels.get("stage"), s.labels.get("shard"), s.labels.get("local_rank"))
              for family in text_string_to_metric_families(pushgateway.metrics_text())
              for s in family.samples if s.labels.get("job") == "trajflow"}
    assert groups == {("run", "train", "0", "0"), ("other", "train", "1", "0"), ("run", "download", "1", None)}


@pytest.mark.parametrize(("env", "shard"), [
    ({"JOB_COMPLETION_INDEX": "3", "GROUP_RANK": "1"}, "3"),  # an Indexed Job pod: its completion index
    ({"TRAJFLOW_METRICS_SHARD": "worker-2", "GROUP_RANK": "3"}, "worker-2"),  # a PyTorchJob pod
    ({"GROUP_RANK": "1"}, "1"),  # torchrun outside a cluster: the node rank
    ({}, "2"),  # no launcher: rank 5 of 2 per node
])
def test_pushed_training_metrics_carry_the_pods_shard_label(env, shard):
    from trajflow.train.dist import DistContext

    assert metrics_shard(DistContext(rank=5, world_size=8, local_rank=1, local_world_size=2), env) == shard


def test_shard_listing_used_by_training_is_the_preprocessing_one(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    keys = write_synthetic_shards(storage, shards=3, episodes_per_shard=2, length=30)
    assert [e.key for e in list_shards(storage)] == keys
    shards = open_shards(storage, ["observation.state", "action"])
    assert shards.shard_ids == [0, 1, 2] and len(shards.episodes) == 6 and shards.rate_hz == 50.0
    assert json.loads(json.dumps(shards.dims)) == {"observation.state": 6, "action": 3}


def test_training_on_an_s3_run_root(s3_server, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Shards fetched into the cache and memory-mapped; checkpoints and artifacts through
    the same storage interface as on a filesystem; a killed run's unfinished checkpoint
    upload aborted, as its temporary file would be removed."""
    from trajflow.config import GlobalConfig, StageSettings
    from trajflow.storage import open_run_root
    from trajflow.train import loop

    bucket = s3_server.make_bucket()
    glob = GlobalConfig.model_validate({"runId": "s3run", "storage": {"type": "s3", "s3": {
        "endpoint": s3_server.endpoint, "bucket": bucket, "region": s3_server.region}}})
    storage = open_run_root(glob)
    write_synthetic_shards(storage, shards=2, episodes_per_shard=6, length=120)
    storage.client.create_multipart_upload(Bucket=bucket, Key=f"{storage.prefix}/train/checkpoints/ckpt-0000000007.pt")
    monkeypatch.setattr(loop, "STALE_UPLOAD_S", 0.0)
    cache = tmp_path / "cache"
    config = TrainConfig.model_validate({"window": 8, "epochs": 2, "learningRate": 3e-3, "metricsPort": 0,
                                         "cacheDir": str(cache), "model": SMALL_MODEL})
    summary = train(StageSettings(glob, config, 0, 1))
    assert summary["final_val_loss"] < 0.5 * summary["initial_val_loss"]
    assert sorted(p.name for p in cache.glob("*/*.safetensors")) == ["00000.safetensors", "00001.safetensors"]
    assert [c.epoch for c in CheckpointStore(storage).list()] == [1, 2]
    model, description = artifacts.load_model(storage)
    assert description["run_id"] == "s3run" and model.spec.window == 8
    assert read_train_metrics(storage)["status"] == "completed"
    assert storage.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_launcher_rejects_bad_config_before_starting_workers(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from trajflow.cli import main

    bad = tmp_path / "config.yaml"
    bad.write_text("global: {runId: r}\nconfig: {window: 1, modle: {}}\n")
    assert main(["train", "--config", str(bad), "--nproc-per-node", "2"]) == int(ExitCode.CONFIG)
    err = capsys.readouterr().err
    assert "config.window" in err and "config.modle: unknown key" in err


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gru", "lstm", "transformer"])
def test_gpu_training_with_bf16_autocast(tmp_path: Path, kind: str) -> None:
    settings, storage = small_run(tmp_path, device="cuda", bf16=True, epochs=3,
                                  model={"type": kind, "hidden_size": 64, "num_layers": 2, "num_heads": 4})
    summary = train(settings)
    assert summary["device"] == "cuda"
    assert summary["final_val_loss"] < 0.5 * summary["initial_val_loss"], summary["history"]
    model, _ = artifacts.load_model(storage)  # saved from the GPU, loads on the CPU
    assert next(model.parameters()).device.type == "cpu"


def test_cli_worker_ignores_the_job_completion_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys) -> None:  # type: ignore[no-untyped-def]
    """Pod 2 of a 3-node training Job: the completion index numbers the node, not a shard."""
    from trajflow.cli import main
    from trajflow.train.synthetic import write_config_file

    settings, _ = small_run(tmp_path, epochs=1)
    config_file = write_config_file(tmp_path / "config.yaml", settings)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    monkeypatch.delenv("TRAJFLOW_SHARDS", raising=False)
    assert main(["train", "--config", str(config_file)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["status"] == "completed" and result["world_size"] == 1 and result["steps"] > 0


@pytest.mark.parametrize("error, code, message", [
    (errno.ENOSPC, ExitCode.TRANSIENT, "training: storage error: OSError: [Errno 28] No space left on device"),
    (errno.EROFS, ExitCode.CONFIG, "cannot use the run root: [Errno 30] Read-only file system: "),
])
def test_a_run_root_that_cannot_take_a_checkpoint_is_named_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, error: int, code: ExitCode,  # type: ignore[no-untyped-def]
        message: str) -> None:
    """A full disk is retried (exit 4), a read-only volume fails the Job (exit 2), as in the
    other stages: not a traceback and exit 1."""
    from trajflow.cli import main
    from trajflow.train.synthetic import write_config_file

    settings, _ = small_run(tmp_path, epochs=1)
    config_file = write_config_file(tmp_path / "config.yaml", settings)
    write_bytes = LocalStorage.write_bytes

    def failing(self, key, data, *args, **kwargs):  # type: ignore[no-untyped-def]
        if key.startswith("train/checkpoints/"):
            raise OSError(error, os.strerror(error), str(self.root / key))
        return write_bytes(self, key, data, *args, **kwargs)

    monkeypatch.setattr(LocalStorage, "write_bytes", failing)
    assert main(["train", "--config", str(config_file)]) == int(code)
    err = capsys.readouterr().err
    assert message in err and "train/checkpoints/ckpt-" in err and "Traceback" not in err


def test_the_launcher_waits_for_preprocessing_when_asked(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """As a PyTorchJob's pods run it: --input-shards N --wait T, the config checked first."""
    from trajflow.cli import main
    from trajflow.train.synthetic import write_config_file

    settings, storage = small_run(tmp_path, epochs=1, shards=2)
    config_file = str(write_config_file(tmp_path / "config.yaml", settings))
    assert main(["train", "--config", config_file, "--wait", "1s"]) == int(ExitCode.CONFIG)
    assert "--wait and --input-shards go together" in capsys.readouterr().err
    # preprocessing made 2 shards, not the 3 asked for: exit 6 once the wait is over, before any worker starts
    assert main(["train", "--config", config_file, "--input-shards", "3", "--wait", "1s"]) == int(ExitCode.TIMEOUT)
    assert "timed out after 1s waiting for 3 preprocess shard(s)" in capsys.readouterr().err
    assert main(["train", "--config", config_file, "--input-shards", "2", "--wait", "1s"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "completed"


def test_a_shard_without_episodes_is_passed_over(tmp_path: Path) -> None:
    # more download shards than trajectory files: preprocessing writes an empty shard
    from trajflow.config.preprocess import PreprocessConfig
    from trajflow.preprocess.stage import process_shard

    storage = LocalStorage(tmp_path / "r")
    write_synthetic_shards(storage, shards=3, episodes_per_shard=2, length=30)
    storage.delete(manifest_key("preprocess", 0))
    write_manifest(storage, "download", 0, 3, [])
    summary = process_shard(storage, 0, 3, PreprocessConfig(device="cpu"))
    assert summary.episodes == 0 and read_manifest(storage, "preprocess", 0)["num_episodes"] == 0
    shards = open_shards(storage, ["observation.state", "action"])
    assert shards.shard_ids == [1, 2] and len(shards.episodes) == 4
    assert shards.dims == {"observation.state": 6, "action": 3}  # the synthetic system's widths


def test_only_one_sharding_of_the_data_is_read(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "r")
    write_synthetic_shards(storage, shards=3, episodes_per_shard=2, length=30)
    # shards 0 and 1 redone for a new count of 2; shard 2 of the old count not yet removed
    for shard in (0, 1):
        doc = read_manifest(storage, "preprocess", shard)
        write_manifest(storage, "preprocess", shard, 2, doc["items"], num_episodes=2, num_frames=doc["num_frames"])
    shards = open_shards(storage, ["observation.state", "action"])
    assert shards.shard_ids == [0, 1] and len(shards.episodes) == 4
    # only one shard of the new count done: no complete sharding to train on yet
    storage.delete(manifest_key("preprocess", 1))
    with pytest.raises(TransientError, match=r"different shard counts \(1 of 2, 1 of 3 done\) and no one sharding "
                                             r"is complete"):
        open_shards(storage, ["observation.state", "action"])


def test_a_metrics_port_beyond_65535_for_a_local_rank_warns_instead_of_failing(caplog) -> None:  # type: ignore[no-untyped-def]
    from trajflow.config import TrainConfig
    from trajflow.metrics import train_metrics
    from trajflow.train.dist import DistContext
    from trajflow.train.loop import MetricsEndpoint

    config = TrainConfig.model_validate({"metricsPort": 65535})  # the highest port the schema takes
    with caplog.at_level(logging.WARNING):
        endpoint = MetricsEndpoint(train_metrics(), config, DistContext(rank=1, world_size=2, local_rank=1))
    endpoint.close()
    assert endpoint.port == 0 and "cannot serve /metrics on port 65536" in caplog.text


@pytest.mark.parametrize("addr", ["127.0.0.1", ""])
def test_metrics_listen_where_the_environment_says(addr: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every interface in a pod (Prometheus scrapes the pod's IP); 127.0.0.1 where `trajflow
    run` (or this test suite) says so."""
    from trajflow.config import TrainConfig
    from trajflow.metrics import METRICS_ADDR_ENV, train_metrics
    from trajflow.train.dist import DistContext
    from trajflow.train.loop import MetricsEndpoint

    monkeypatch.setenv(METRICS_ADDR_ENV, addr)
    endpoint = MetricsEndpoint(train_metrics(), TrainConfig.model_validate({"metricsPort": free_port()}), DistContext())
    try:
        assert endpoint._server.server_address[0] == (addr or "0.0.0.0")
    finally:
        endpoint.close()


def test_only_the_rank_that_writes_checkpoints_names_the_last_one(tmp_path: Path) -> None:
    from trajflow.metrics import train_metrics
    from trajflow.train.dist import DistContext
    from trajflow.train.loop import Trainer

    settings, storage = small_run(tmp_path)
    main = Trainer(settings, DistContext(), storage, train_metrics())._diverged(float("nan"), 0, "train")
    other = Trainer(settings, DistContext(rank=1, world_size=2), storage, train_metrics())._diverged(float("nan"), 0,
                                                                                                   "train")
    assert "last good checkpoint: none yet" in str(main)
    assert "checkpoint" not in str(other)  # rank 1 never learns of rank 0's: it must not say there is none


@pytest.mark.parametrize("capability, native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_autocast_only_where_the_gpu_computes_in_bf16(monkeypatch: pytest.MonkeyPatch, capability, native) -> None:
    """V100 and T4 emulate bf16 (torch.cuda.is_bf16_supported() says yes): training stays in fp32."""
    from trajflow.train import loop

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert loop.has_native_bf16(torch.device("cuda", 0)) is native


def test_a_rank_resumes_its_own_gpus_random_stream_on_a_pod_of_another_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """8 pods x 1 GPU resumed as 1 pod x 8 GPUs: each rank restores its own GPU generator,
    instead of skipping it and leaving every rank on the same seed."""
    from trajflow.train import loop

    own = torch.tensor([7, 7, 7], dtype=torch.uint8)
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": own.clone())
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    saved = loop._rng_state()  # on a pod with one GPU
    assert loop._set_rng_state(saved)  # on a pod with eight
    assert len(restored) == 1 and torch.equal(restored[0], own)
    # an older checkpoint saved every GPU of its pod: of another shape, it cannot be restored
    # (the caller then gives the rank a stream of its own)
    assert not loop._set_rng_state({**saved, "cuda": [own, own]})
    assert not loop._set_rng_state({**saved, "cuda": []})  # a CPU run's


def test_a_torch_that_ignores_the_shutdown_timeout_is_named(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from torch.distributed.launcher.api import LaunchConfig

    from trajflow.train import launch

    monkeypatch.setenv(launch.SHUTDOWN_TIMEOUT_ENV, "285")
    with caplog.at_level("WARNING", logger=launch.log.name):
        launch._warn_unless_shutdown_timeout_is_read()
    assert not caplog.records  # this torch reads it
    monkeypatch.setattr(LaunchConfig, "__dataclass_fields__",
                        {k: v for k, v in LaunchConfig.__dataclass_fields__.items() if k != "shutdown_timeout"})
    with caplog.at_level("WARNING", logger=launch.log.name):
        launch._warn_unless_shutdown_timeout_is_read()
    assert "ignores TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in caplog.text and "30 s" in caplog.text


def test_a_rerun_forgets_the_loss_its_diverged_attempt_pushed(tmp_path: Path, pushgateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Training pushes at its end only: the infinite loss a diverged attempt pushed would keep
    the NaN-loss alert firing through the whole rerun."""
    from trajflow.metrics import Pusher, train_metrics
    from trajflow.train import loop

    diverged = train_metrics()
    diverged.loss.labels(split="train").set(float("inf"))
    Pusher(pushgateway.url, diverged, run="run", shard="0", labels={"local_rank": "0"}).stop(success=False)
    assert "trajflow_train_loss{" in pushgateway.metrics_text()
    during: list[str] = []
    monkeypatch.setattr(loop.Trainer, "run", lambda self: during.append(pushgateway.metrics_text()) or {})
    settings, _ = small_run(tmp_path)
    glob = settings.global_.model_copy(update={"metrics": settings.global_.metrics.model_copy(
        update={"pushgateway_url": pushgateway.url})})
    train(type(settings)(glob, settings.config, 0, 1))
    assert during and "trajflow_train_loss{" not in during[0]
