"""The resampled shard format: safetensors-compatible, memory-mapped, bf16-aware, atomic."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from trajflow.preprocess.dtypes import to_storage_dtype
from trajflow.preprocess.shards import (
    Episode,
    ShardFormatError,
    ShardReader,
    ShardWriter,
    as_float32,
    fetch_shard,
    list_shards,
    open_shard,
    shard_key,
    write_shard,
)
from trajflow.storage import write_manifest

torch = pytest.importorskip("torch")


def _episodes(rng: np.random.Generator, lengths=(3, 7, 1, 5), dims=None):
    dims = dims or {"observation.state": 5, "action": 3}
    return [
        Episode({s: rng.normal(size=(n, d)) for s, d in dims.items()}, source=f"raw/00000/src/ep{i}.npz",
                episode=str(i), robot="arm", original_rate_hz=100.0 + i, raw_length=2 * n, start_time=0.5 * i)
        for i, n in enumerate(lengths)
    ]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_shard_round_trips_and_is_a_plain_safetensors_file(local_storage, dtype):
    from safetensors import safe_open

    eps = _episodes(np.random.default_rng(0))
    info = write_shard(local_storage, shard_key(0), eps, dtype, 50.0)
    path = local_storage.local_path(info.key)
    assert info.size == path.stat().st_size
    reader = open_shard(path)
    assert reader.rate_hz == 50.0 and reader.dtype == dtype
    assert reader.streams == ["observation.state", "action"]  # the writer's order
    assert reader.num_frames == sum(e.data["action"].shape[0] for e in eps) == 16
    assert [(e.offset, e.length) for e in reader.episodes] == [(0, 3), (3, 7), (10, 1), (11, 5)]
    assert reader.episodes[2].source == "raw/00000/src/ep2.npz" and reader.episodes[2].robot == "arm"
    assert reader.episodes[3].original_rate_hz == 103.0 and reader.episodes[3].raw_length == 10
    np.testing.assert_allclose(reader.times(1), 0.5 + np.arange(7) / 50.0)
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["trajflow.index"]) == reader.index
        for s in reader.streams:
            expected = torch.from_numpy(np.concatenate([e.data[s] for e in eps]).astype(np.float32))
            expected = expected.to(getattr(torch, dtype))
            assert torch.equal(f.get_tensor(s), expected)
            assert torch.equal(reader.tensor(s), expected)
            assert torch.equal(reader.episode_tensor(1, s), expected[3:10])
    # numpy side: bf16 is exposed as its bit patterns, float32 values recover exactly
    arr = reader.array("action")
    assert isinstance(arr, np.memmap) and not arr.flags.writeable
    assert arr.dtype == (np.uint16 if dtype == "bfloat16" else np.dtype(dtype))
    np.testing.assert_array_equal(as_float32(reader, "action", slice(3, 10)), reader.episode_tensor(1, "action").float().numpy())


def test_tensor_is_copy_on_write(local_storage):
    info = write_shard(local_storage, shard_key(0), _episodes(np.random.default_rng(1)), "float32", 10.0)
    path = local_storage.local_path(info.key)
    before = path.read_bytes()
    t = open_shard(path).tensor("action")
    t.zero_()
    assert path.read_bytes() == before
    assert not torch.equal(open_shard(path).tensor("action"), t)


def test_writes_are_deterministic_and_checksummed(local_storage):
    import hashlib

    a = write_shard(local_storage, "resampled/a.safetensors", _episodes(np.random.default_rng(2)), "bfloat16", 30.0)
    b = write_shard(local_storage, "resampled/b.safetensors", _episodes(np.random.default_rng(2)), "bfloat16", 30.0)
    data = local_storage.read_bytes(a.key)
    assert data == local_storage.read_bytes(b.key)
    assert a.sha256 == hashlib.sha256(data).hexdigest()


def test_empty_shard_opens(local_storage):
    w = ShardWriter(local_storage, shard_key(3), {"observation.state": 4, "action": 2}, "float32", 50.0)
    info = w.close()
    reader = open_shard(local_storage.local_path(info.key))
    assert len(reader) == 0 and reader.array("action").shape == (0, 2)


def test_writer_rejects_wrong_shapes_and_writes_nothing(local_storage):
    w = ShardWriter(local_storage, shard_key(0), {"action": 3}, "float32", 50.0)
    with pytest.raises(ValueError, match="expected \\[length, 3\\]"):
        w.add({"action": np.zeros((4, 2), np.float32)}, source="s", episode="e")
    with pytest.raises(ValueError, match="missing stream"):
        w.add({}, source="s", episode="e")
    w.abort()
    assert not local_storage.exists(shard_key(0))
    with pytest.raises(ValueError, match="unsupported shard dtype"):
        ShardWriter(local_storage, shard_key(0), {"action": 3}, "float64", 50.0)


def test_truncated_and_foreign_files_are_named(local_storage, tmp_path):
    info = write_shard(local_storage, shard_key(0), _episodes(np.random.default_rng(3)), "float32", 50.0)
    data = local_storage.read_bytes(info.key)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-8])
    with pytest.raises(ShardFormatError, match="cut.safetensors.*truncated"):
        open_shard(cut)
    from safetensors.numpy import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": np.zeros((2, 2), np.float32)}, str(foreign))
    with pytest.raises(ShardFormatError, match="not a trajflow shard"):
        open_shard(foreign)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(ShardFormatError, match="not JSON"):
        open_shard(junk)


@pytest.mark.parametrize("old, new, message", [
    (b'"dtype"', b'"dtypX"', r"corrupt shard header: KeyError: 'dtype'"),  # a tensor entry
    (b'\\"offset\\"', b'\\"offsex\\"', r"corrupt shard header: KeyError: 'offset'"),  # an episode of the index
    (b'\\"num_frames\\":16', b'\\"num_frames\\":12',
     r"episode 3 \(frames 11\+5\) does not follow the previous one \(at frame 11\) within the shard's 12 frames"),
    # damage that checksums would not catch when the manifest was rewritten to match
    (b'\\"offset\\":3', b'\\"offset\\":0', r"episode 1 \(frames 0\+7\) does not follow the previous one \(at frame 3\)"),
    (b'\\"length\\":5', b'\\"length\\":4', r"the episodes cover 15 of the shard's 16 frames"),
    (b'\\"rate_hz\\":50.0', b'\\"rate_hz\\":-0.01', r"rate -0.01 Hz is no rate"),
    (b'"data_offsets":[320,512]', b'"data_offsets":[128,320]',
     r"tensors 'observation.state' and 'action' are not laid back to back \(bytes 320 and 128\)"),
    (b'\\"num_frames\\":16', b'\\"num_frames\\":1e999', r"corrupt shard header: OverflowError"),
])
def test_a_damaged_header_is_named_not_a_crash(local_storage, tmp_path, old, new, message):
    info = write_shard(local_storage, shard_key(0), _episodes(np.random.default_rng(3)), "float32", 50.0)
    data = local_storage.read_bytes(info.key)
    assert data.count(old) >= 1
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(data.replace(old, new, 1))  # same size: the header length still matches
    with pytest.raises(ShardFormatError, match=f"damaged.safetensors: {message}"):
        open_shard(damaged)


def test_bf16_conversion_matches_torch():
    x = np.array([0.0, 1.0, -2.5, 3.14159265, 1e-3, 65504.0, 1.00390625, 1.01171875, np.inf], np.float32)
    bits = to_storage_dtype(x, "bfloat16")
    expected = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, expected)
    assert np.isnan(to_storage_dtype(np.array([np.nan], np.float32), "bfloat16").view(np.uint16).astype(np.uint32)
                    .__lshift__(16).view(np.float32)).all()


def _publish(storage, shard, eps):
    info = write_shard(storage, shard_key(shard), eps, "float32", 50.0)
    write_manifest(storage, "preprocess", shard, 2, [info.item()], num_episodes=len(eps),
                   num_frames=info.index["num_frames"])
    return info


def test_list_shards_only_lists_done_shards(storage, tmp_path):
    rng = np.random.default_rng(4)
    _publish(storage, 1, _episodes(rng))
    write_shard(storage, shard_key(0), _episodes(rng), "float32", 50.0)  # written, manifest missing: not done
    entries = list_shards(storage)
    assert [e.shard for e in entries] == [1]
    assert entries[0].key == "resampled/00001.safetensors" and entries[0].num_frames == 16
    reader = open_shard(storage=storage, key=entries[0].key, cache_dir=tmp_path / "cache")
    assert reader.num_frames == 16
    if storage.local_path(entries[0].key) is None:  # S3: fetched, and reused when intact
        local = fetch_shard(storage, entries[0], tmp_path / "cache")
        assert local == tmp_path / "cache" / entries[0].sha256 / "00001.safetensors"  # by content: roots never meet
        mtime = local.stat().st_mtime_ns
        import trajflow.preprocess.shards as shards_module

        real_hash, hashed = shards_module._file_sha256, []
        shards_module._file_sha256 = lambda path: hashed.append(path) or real_hash(path)
        try:  # checked as it arrived, unchanged since: not hashed again
            assert fetch_shard(storage, entries[0], tmp_path / "cache") == local and hashed == []
        finally:
            shards_module._file_sha256 = real_hash
        assert local.stat().st_mtime_ns == mtime
        local.chmod(0o644)
        local.write_bytes(b"x" * entries[0].size)  # corrupted copy: fetched again
        assert fetch_shard(storage, entries[0], tmp_path / "cache").read_bytes() == storage.read_bytes(entries[0].key)


def test_fetch_rejects_a_checksum_mismatch(s3_storage, tmp_path):
    _publish(s3_storage, 0, _episodes(np.random.default_rng(5)))
    entry = list_shards(s3_storage)[0]
    from dataclasses import replace

    with pytest.raises(ShardFormatError, match="sha256"):
        fetch_shard(s3_storage, replace(entry, sha256="0" * 64), tmp_path / "cache")
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache").rglob("*"))


def test_a_fetch_removes_the_partial_copies_of_killed_fetchers(s3_storage, tmp_path):
    """A training killed mid-fetch (OOM, SIGKILL) leaves a shard-sized part on a cache volume
    that may outlive its pods: the next fetch of that shard removes it, not a live one's."""
    import subprocess
    import sys

    _publish(s3_storage, 0, _episodes(np.random.default_rng(6)))
    entry = list_shards(s3_storage)[0]
    folder = tmp_path / "cache" / entry.sha256
    folder.mkdir(parents=True)
    import os
    import socket

    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed = folder / f".00000.safetensors.part-{host}-{int(dead.stdout)}"
        fetching = folder / f".00000.safetensors.part-{host}-{live.pid}"
        # another pod's: its pids are not this pod's to judge, only its age
        other_pod = folder / f".00000.safetensors.part-trainer-1-{int(dead.stdout)}"
        abandoned = folder / ".00000.safetensors.part-trainer-2-7"
        for part in (killed, fetching, other_pod, abandoned):
            part.write_bytes(b"x" * 100)
        os.utime(abandoned, (0, 0))
        assert fetch_shard(s3_storage, entry, tmp_path / "cache") == folder / "00000.safetensors"
        assert sorted(p.name for p in folder.glob(".*.part-*")) == sorted([fetching.name, other_pod.name])
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("sha256", ["/tmp/elsewhere", "../../elsewhere", "A" * 64, None])
def test_a_manifest_whose_sha256_is_no_digest_is_refused_before_any_copy(local_storage, tmp_path, sha256):
    _publish(local_storage, 0, _episodes(np.random.default_rng(5)))
    key = "resampled/_done/00000.json"
    doc = json.loads(local_storage.read_bytes(key))
    next(it for it in doc["items"] if it["kind"] == "shard")["sha256"] = sha256
    local_storage.write_bytes(key, json.dumps(doc).encode())
    with pytest.raises(ShardFormatError, match=r"00000\.json: the shard file's sha256 .* is not 64 lowercase hex"):
        list_shards(local_storage)


def test_the_writer_stops_before_the_temporary_directory_limit(local_storage, tmp_path):
    from trajflow.errors import ExitCode, PermanentError

    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    # 1 MiB in memory per stream, then files: at most 3 MiB of them
    writer = ShardWriter(local_storage, shard_key(0), {"a": 64, "b": 64}, "float32", 50.0, spool_bytes=2 << 20,
                         spool_dir=str(spool_dir), spill_limit_bytes=3 << 20)
    frames = np.zeros((2048, 64), dtype=np.float32)  # 0.5 MiB per stream and episode
    added = 0
    with pytest.raises(PermanentError, match=r"00000\.safetensors: this shard's frames would take 4\.0 MiB of the "
                                             r"temporary directory, more than the 3\.0 MiB it may use: raise "
                                             r"preprocessing\.tmp\.sizeLimit") as info:
        for e in range(10):
            writer.add({"a": frames, "b": frames}, source="raw/x", episode=str(e))
            added += 1
    assert added == 3  # two streams of 1.5 MiB: 3 MiB on disk; the fourth episode would make it 4
    assert info.value.exit_code == ExitCode.PERMANENT
    writer.abort()
    assert not local_storage.exists(shard_key(0))


def test_the_writer_refuses_an_index_past_the_header_cap_as_it_grows_not_at_close(local_storage, monkeypatch):
    """A shard of hundreds of thousands of tiny episodes: refused as soon as its index passes
    the cap, not after every file of the shard is read and resampled."""
    from trajflow.errors import PermanentError
    from trajflow.preprocess import shards

    monkeypatch.setattr(shards, "MAX_HEADER_BYTES", 2000)  # a few episodes' index
    writer = ShardWriter(local_storage, shard_key(0), {"a": 2}, "float32", 50.0)
    added = 0
    with pytest.raises(PermanentError, match=r"the index of this shard's \d+ episodes takes .* MB, more than the 0 MB "
                                             r"a safetensors header may: use more shards"):
        for e in range(1000):
            writer.add({"a": np.zeros((3, 2), np.float32)}, source=f"raw/00000/src/ep{e:04d}.npz", episode=str(e))
            added += 1
    assert 0 < added < 20 and len(writer.episodes) == added  # the refused episode is not kept
    writer.abort()
    assert not local_storage.exists(shard_key(0))
    # the estimate is a lower bound: what it lets through, close still checks exactly
    header = shards._header_bytes(writer.index(), writer.streams, writer.dims, writer.code, 4, writer.num_frames)
    assert writer._index_bytes < len(header) - 8


@pytest.mark.parametrize("spool_mib", [64, 2])  # every stream in memory; one spilled to a file, one not
def test_shard_bytes_and_checksum_whether_spooled_in_memory_or_in_files(local_storage, tmp_path, spool_mib):
    import hashlib

    rng = np.random.default_rng(6)
    wide = [rng.standard_normal((4096, 48)).astype(np.float32) for _ in range(4)]  # 0.75 MiB each
    narrow = [rng.standard_normal((4096, 2)).astype(np.float32) for _ in range(4)]
    writer = ShardWriter(local_storage, shard_key(0), {"wide": 48, "narrow": 2}, "float32", 50.0,
                         spool_bytes=spool_mib << 20, spool_dir=str(tmp_path))
    for i, (w, n) in enumerate(zip(wide, narrow)):
        writer.add({"wide": w[:, ::-1][:, ::-1], "narrow": n}, source="raw/x", episode=str(i))  # strided input
    spilled = [s for s, spool in writer._spools.items() if spool.file is not None]
    shard = writer.close()
    assert spilled == ([] if spool_mib == 64 else ["wide"])
    data = local_storage.read_bytes(shard_key(0))
    assert shard.size == len(data) and shard.sha256 == hashlib.sha256(data).hexdigest()
    with ShardReader(local_storage.local_path(shard_key(0))) as reader:
        np.testing.assert_array_equal(reader.array("wide"), np.concatenate(wide))
        np.testing.assert_array_equal(reader.array("narrow"), np.concatenate(narrow))


def test_empty_episodes_and_streams_are_written(local_storage):
    import hashlib

    writer = ShardWriter(local_storage, shard_key(0), {"x": 3, "none": 0}, "float32", 50.0)
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    for i, n in enumerate((0, 4, 0)):
        writer.add({"x": x[:n], "none": np.zeros((n, 0), np.float32)}, source="raw/x", episode=str(i))
    shard = writer.close()
    data = local_storage.read_bytes(shard_key(0))
    assert shard.sha256 == hashlib.sha256(data).hexdigest()
    with ShardReader(local_storage.local_path(shard_key(0))) as reader:
        assert [e.length for e in reader.episodes] == [0, 4, 0]
        np.testing.assert_array_equal(reader.array("x"), x)
        assert reader.array("none").shape == (4, 0)


def test_a_failed_checksum_publishes_nothing(local_storage, monkeypatch):
    from trajflow.preprocess import shards

    class Broken:
        def update(self, data):
            raise MemoryError("no memory for the digest")

        def hexdigest(self):
            return "0" * 64

    monkeypatch.setattr(shards.hashlib, "sha256", Broken)
    writer = ShardWriter(local_storage, shard_key(0), {"x": 2}, "float32", 50.0)
    writer.add({"x": np.ones((3, 2), np.float32)}, source="raw/x", episode="0")
    with pytest.raises(MemoryError, match="digest"):
        writer.close()  # raised by the hashing thread, re-raised here
    assert not local_storage.exists(shard_key(0))


def test_a_manifest_from_before_a_setting_existed_was_made_with_its_default():
    """Shards kept from an older version, whose manifests lack maxGapSeconds, were made without
    a limit: a rerun that sets one names the difference (it does not hide it)."""
    from trajflow.config.preprocess import PreprocessConfig
    from trajflow.preprocess.shards import settings_differences, settings_of

    now = PreprocessConfig().output_settings([])
    older = {"settings": {k: v for k, v in now.items() if k != "maxGapSeconds"}}
    assert settings_differences(settings_of(older), now) == []
    limited = PreprocessConfig(max_gap_seconds=0.5).output_settings([])
    assert settings_differences(settings_of(older), limited) == ["maxGapSeconds None -> 0.5"]


def test_a_check_that_cannot_be_recorded_is_no_failure(local_storage, monkeypatch):
    """On a volume mounted read-only the record cannot be written (nor its temporary removed):
    the shard was checked all the same, and is hashed again at the next start."""
    import errno
    from pathlib import Path

    from trajflow.preprocess.shards import check_shard_file

    _publish(local_storage, 0, _episodes(np.random.default_rng(6)))
    entry = list_shards(local_storage)[0]

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_text", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    stamp = local_storage.local_path("train/.trajflow-checked/00000.json")
    check_shard_file(local_storage.local_path(entry.key), entry, stamp)
    assert not stamp.exists()
