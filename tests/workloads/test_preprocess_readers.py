"""Readers, per-episode validation, length batching and the config model."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preprocess_data import ACTION, STATE, make_episode, npz_bytes, stage_config, write_robomimic
from trajflow.config.preprocess import PreprocessConfig
from trajflow.errors import ConfigError
from trajflow.preprocess import readers
from trajflow.preprocess.batching import plan_batches
from trajflow.preprocess.readers import Quarantined, RawEpisode, SourceSpec

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _spec(**overrides):
    return SourceSpec.resolve(stage_config(**overrides), "src")


def _parquet(table) -> io.BytesIO:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    buf.seek(0)
    return buf


def _outcomes(fmt, src, spec=None, hint=""):
    return readers.READERS[fmt](src, spec or _spec(), "raw/00000/src/f", hint)


# ------------------------------------------------------------------------- parquet


def test_parquet_variable_lists_unsorted_rows_and_several_episodes():
    rows = [(1, 1, 0.1), (0, 0, 0.0), (1, 0, 0.0), (0, 1, 0.05), (1, 2, 0.2), (0, 2, 0.1)]
    ep, fr, ts = map(list, zip(*rows))
    state = [[float(e), float(f), 1.0] for e, f, _ in rows]
    action = [float(10 * e + f) for e, f, _ in rows]  # a scalar column is a 1-wide stream
    table = pa.table({"episode_index": ep, "frame_index": fr, "timestamp": pa.array(ts, pa.float32()),
                      STATE: pa.array(state, pa.list_(pa.float32())), ACTION: action})
    out = _outcomes("lerobot", _parquet(table), hint="koch")
    assert [o.episode for o in out] == ["0", "1"] and all(isinstance(o, RawEpisode) for o in out)
    e1 = out[1]
    assert e1.robot == "koch" and e1.dims == {STATE: 3, ACTION: 1}
    np.testing.assert_allclose(e1.times, [0.0, 0.1, 0.2], rtol=1e-6)
    np.testing.assert_array_equal(e1.frames[:, 1], [0, 1, 2])  # sorted by frame_index
    np.testing.assert_array_equal(e1.frames[:, 3], [10, 11, 12])


def test_parquet_index_columns_stored_as_whole_floats_are_read():
    # pandas writes integer columns as floats at times; a fraction is not an index
    table = pa.table({"episode_index": [0.0, 0.0, 1.0, 1.0], "frame_index": [0.0, 1.0, 0.0, 1.0],
                      "timestamp": [0.0, 0.1, 0.0, 0.1], STATE: [1.0, 2.0, 3.0, 4.0], ACTION: [0.0] * 4})
    out = _outcomes("lerobot", _parquet(table))
    assert [o.episode for o in out] == ["0", "1"] and all(isinstance(o, RawEpisode) for o in out)
    fractional = table.set_column(0, "episode_index", pa.array([0.0, 0.5, 1.0, 1.0]))
    (bad,) = _outcomes("lerobot", _parquet(fractional))
    assert bad.reason == readers.SHAPE_MISMATCH and "'episode_index' must hold whole numbers" in bad.detail


def test_parquet_nulls_and_ragged_rows_quarantine_only_their_episode():
    table = pa.table({
        "episode_index": [0, 0, 1, 1, 2, 2],
        "timestamp": [0.0, 0.1] * 3,
        STATE: pa.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], None, [1.0, 2.0], [1.0]], pa.list_(pa.float64())),
        ACTION: pa.array([[0.0]] * 6, pa.list_(pa.float64(), 1)),
    })
    out = _outcomes("lerobot", _parquet(table))
    assert isinstance(out[0], RawEpisode)
    assert (out[1].reason, out[2].reason) == (readers.NON_FINITE, readers.SHAPE_MISMATCH)
    assert "null at frame 1" in out[1].detail
    assert out[2].detail == f"{STATE!r} has 1 values at frame 1, 2 at frame 0"


def test_parquet_episodes_of_other_widths_in_one_file_are_read_at_their_own():
    # the width is each episode's, not the file's majority: the odd one out here is the
    # shard's width, and the stage (not the reader) decides which robot's episodes fit
    widths = {0: 7, 1: 7, 2: 6}
    table = pa.table({
        "episode_index": [e for e in widths for _ in range(3)],
        "timestamp": [0.0, 0.1, 0.2] * 3,
        STATE: pa.array([[float(e)] * w for e, w in widths.items() for _ in range(3)], pa.list_(pa.float32())),
        ACTION: [1.0] * 9,
    })
    out = _outcomes("lerobot", _parquet(table))
    assert [o.dims[STATE] for o in out] == [7, 7, 6] and all(isinstance(o, RawEpisode) for o in out)
    np.testing.assert_array_equal(out[2].frames[:, :6], np.full((3, 6), 2.0))


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_members_no_stream_needs_are_never_decoded(compressed, monkeypatch):
    """Camera frames beside the streams would inflate to gigabytes: they are named, not read
    (numpy's own path, for files the fast one leaves to it, skips them too)."""
    from trajflow.preprocess import npzfile

    x = np.ones((50, 2), np.float32)
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(
        buf, timestamps=np.arange(50) / 50.0, images=np.zeros((50, 64, 64), np.uint8), **{STATE: x, ACTION: x})
    blob = buf.getvalue()
    decoded: list[int] = []
    array = npzfile._array
    monkeypatch.setattr(npzfile, "_array", lambda member: decoded.append(len(member)) or array(member))
    (ep,) = _outcomes("npz", io.BytesIO(blob))
    assert isinstance(ep, RawEpisode) and ep.frames.shape == (50, 4)
    assert len(decoded) == 3 and max(decoded) < 64 * 64  # the timestamps and the two streams
    monkeypatch.setattr(npzfile, "_members", lambda *a: (_ for _ in ()).throw(npzfile._Unusual()))
    loaded = npzfile.load_npz(blob, lambda name: name != "images")
    assert loaded["images"] == npzfile.UnreadMember("images") and loaded[STATE].shape == (50, 2)


def test_a_parquet_data_page_that_fails_its_checksum_is_unreadable():
    """Pages written with CRCs are checked: a flipped bit in one would change values silently."""
    values = np.linspace(1.0, 2.0, 400)
    table = pa.table({"episode_index": np.zeros(400, np.int64), "timestamp": np.arange(400) / 50.0,
                      STATE: values, ACTION: values})
    buf = io.BytesIO()
    pq.write_table(table, buf, write_page_checksum=True, compression="none")
    blob = bytearray(buf.getvalue())
    at = bytes(blob).index(np.float64(values[200]).tobytes())  # inside the first stream's data page
    blob[at] ^= 0x01
    with pytest.raises(readers.UnreadableFile, match="(?i)crc|checksum"):
        _outcomes("lerobot", bytes(blob))
    (ep,) = _outcomes("lerobot", buf.getvalue())
    assert isinstance(ep, RawEpisode) and ep.frames.shape == (400, 2)


def test_a_parquet_file_declaring_far_more_values_than_it_holds_is_not_decoded(monkeypatch, tmp_path):
    """Run-length encoding keeps constants in a few bytes: a small file could declare
    gigabytes of frames, and decoding them took 4.5 GB from 230 kB."""
    n = 400_000
    table = pa.table({"episode_index": np.zeros(n, np.int64), "timestamp": np.zeros(n), STATE: np.zeros(n),
                      ACTION: np.zeros(n)})
    bomb = _parquet(table).getvalue()
    assert 12_800_000 > 1024 * len(bomb)  # what it declares, past the expansion any recording has
    monkeypatch.setattr(readers, "_PARQUET_DECODED_FLOOR", 1 << 20)  # the real floor is 256 MiB
    decoded = []
    (tmp_path / "bomb.parquet").write_bytes(bomb)
    with monkeypatch.context() as patch:
        patch.setattr(pq.ParquetFile, "read", lambda *a, **k: decoded.append(1))
        for src in (bomb, io.BytesIO(bomb), str(tmp_path / "bomb.parquet")):
            with pytest.raises(readers.UnreadableFile, match=rf"its columns declare 12800000 bytes of values in a "
                                                             rf"file of {len(bomb)} bytes: a corrupt or crafted file"):
                _outcomes("lerobot", src)
    assert not decoded
    # a recording of the same length: its timestamps and values do not compress like that
    times = np.arange(n) / 50.0
    table = table.set_column(1, "timestamp", pa.array(times)).set_column(2, STATE, pa.array(np.sin(times)))
    (ep,) = _outcomes("lerobot", _parquet(table))
    assert isinstance(ep, RawEpisode) and ep.frames.shape == (n, 2)


@pytest.mark.parametrize("values", [[0, 2**64 - 1], [1e19, 2e19]])
def test_parquet_index_columns_beyond_64_bits_are_refused_not_wrapped(values):
    """Wrapped, 2**64 - 1 became episode -1, and 1e19 and 2e19 one merged episode."""
    import pyarrow as pa

    column = pa.array(values, type=pa.uint64() if isinstance(values[0], int) else pa.float64())
    with pytest.raises(TypeError, match="column 'episode_index' holds values from .* beyond a 64-bit index"):
        readers._index_column(column, "episode_index")
    assert readers._index_column(pa.array([0, 2**63 - 1], type=pa.uint64()), "episode_index").tolist() == [0, 2**63 - 1]


def test_parquet_without_timestamps_uses_frame_index_and_the_dataset_rate():
    table = pa.table({"episode_index": [3, 3, 3], "frame_index": [0, 1, 2], STATE: [1.0, 2.0, 3.0],
                      ACTION: [0.0, 0.0, 0.0]})
    (ep,) = _outcomes("lerobot", _parquet(table), _spec(rate_hz=20.0))
    np.testing.assert_allclose(ep.times, [0.0, 0.05, 0.1])
    (q,) = _outcomes("lerobot", _parquet(table))
    assert q.reason == readers.MISSING_TIME and "rateHz" in q.detail


def test_a_configured_time_key_missing_from_a_file_quarantines_instead_of_using_the_rate(tmp_path):
    # every format: the file has timestamps under another name and rateHz is set as well
    state, action = np.arange(6.0).reshape(3, 2), np.zeros((3, 1))
    times = np.array([0.0, 0.05, 0.1])  # 20 Hz; the configured rateHz is 10
    write_robomimic(tmp_path / "d.hdf5", [make_episode(np.random.default_rng(0), "0", 20.0, 1.0)],
                    state_key=STATE, action_key=ACTION, timestamps=True)
    files = {
        "lerobot": _parquet(pa.table({"episode_index": [0] * 3, "timestamp": times, STATE: list(state),
                                      ACTION: action[:, 0]})),
        "robomimic": str(tmp_path / "d.hdf5"),
        "npz": io.BytesIO(npz_bytes(timestamp=times, **{STATE: state, ACTION: action})),
    }
    for fmt, src in files.items():
        (q,) = _outcomes(fmt, src, _spec(time_key="stamp", rate_hz=10.0))
        assert isinstance(q, Quarantined), fmt
        assert q.reason == readers.MISSING_TIME and "'stamp'" in q.detail and "timeKey" in q.detail, fmt
        if not isinstance(src, str):
            src.seek(0)
        (ep,) = _outcomes(fmt, src, _spec(rate_hz=10.0))  # unset: the usual names are found
        assert isinstance(ep, RawEpisode) and ep.original_rate_hz == pytest.approx(20.0, rel=0.3), fmt


def test_parquet_boolean_timestamps_are_named_as_npz_and_hdf5_name_them():
    table = pa.table({"episode_index": [0, 0, 0], "timestamp": [False, True, True], STATE: [1.0, 2.0, 3.0],
                      ACTION: [1.0, 2.0, 3.0]})
    (q,) = _outcomes("lerobot", _parquet(table))
    assert (q.reason, q.detail) == (readers.SHAPE_MISMATCH, "timestamps have non-numeric dtype bool (column "
                                                            "'timestamp')")


def test_parquet_missing_column_and_non_numeric_column():
    table = pa.table({"episode_index": [0, 0], "timestamp": [0.0, 1.0], STATE: [1.0, 2.0]})
    (q,) = _outcomes("lerobot", _parquet(table))
    assert q.reason == readers.MISSING_STREAM
    assert q.detail == f"no stream 'action'; this episode has: episode_index, timestamp, {STATE}"
    table = pa.table({"timestamp": [0.0, 1.0], STATE: ["a", "b"], ACTION: [1.0, 2.0]})
    (q,) = _outcomes("lerobot", _parquet(table))
    assert q.reason == readers.SHAPE_MISMATCH and "observation.state" in q.detail


# ---------------------------------------------------------------------- HDF5 / npz


def test_hdf5_rate_from_env_args_and_missing_time(tmp_path):
    import h5py

    ep = make_episode(np.random.default_rng(0), "0", 20.0, 1.0)
    path = tmp_path / "d.hdf5"
    write_robomimic(path, [ep], state_key=STATE, action_key=ACTION, timestamps=False)
    with h5py.File(path, "a") as f:
        del f["data/demo_0"].attrs["rate_hz"]
        f["data"].attrs["env_args"] = json.dumps({"env_kwargs": {"control_freq": 20, "robots": "UR5e"}})
    (out,) = _outcomes("robomimic", str(path))
    assert out.robot == "UR5e" and out.original_rate_hz == pytest.approx(20.0)
    with h5py.File(path, "a") as f:
        f["data"].attrs["env_args"] = "{}"
    (q,) = _outcomes("robomimic", str(path))
    assert q.reason == readers.MISSING_TIME and q.episode == "demo_0"
    (out,) = _outcomes("robomimic", str(path), _spec(robot="override", rate_hz=10.0))
    assert out.original_rate_hz == pytest.approx(10.0) and out.robot == "override"  # the data names none
    (out,) = _outcomes("robomimic", str(path), _spec(rate_hz=10.0, sources={"src": {"robot": "forced"}}))
    assert out.robot == "forced"  # a per-source robot wins over the data


def test_hdf5_layouts_datasets_groups_and_nested_times(tmp_path):
    import h5py

    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 4)).astype(np.float32)
    t = np.cumsum(rng.uniform(0.01, 0.02, 30))
    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data/mask", data=[1, 2])  # not a demo group: skipped
        f.create_dataset(f"data/demo_0/{STATE}", data=x, chunks=(7, 4), compression="gzip")
        f.create_dataset(f"data/demo_0/{ACTION}", data=x[:, :1].astype(">f8"))
        f.create_dataset("data/demo_0/obs/timestamps", data=t)  # times below obs/
        f.create_group(f"data/demo_1/{STATE}")  # a group where the stream should be
        f.create_dataset(f"data/demo_1/{ACTION}", data=x[:, :1])
        f.create_dataset("data/demo_1/timestamps", data=t)
        f.create_dataset(f"data/demo_2/{STATE}", data=x)
        f.create_dataset(f"data/demo_2/{ACTION}", data=x[:, :1])
        f["data/demo_2"].attrs["fps"] = 25.0  # no timestamps: the demo's recorded rate
        f["data"].attrs["rate_hz"] = 10.0
        f.create_dataset(f"data/demo_3/{STATE}", data=h5py.Empty("f4"))  # a null dataspace: no values at all
        f.create_dataset(f"data/demo_3/{ACTION}", data=x[:, :1])
        f.create_dataset("data/demo_3/timestamps", data=t)
    ep0, bad, ep2, empty = _outcomes("robomimic", str(path))
    assert isinstance(ep0, RawEpisode) and ep0.episode == "demo_0"
    np.testing.assert_array_equal(ep0.frames, np.concatenate([x, x[:, :1]], axis=1))
    np.testing.assert_allclose(ep0.times, t - t[0])
    assert isinstance(bad, Quarantined) and bad.reason == readers.MISSING_STREAM
    assert bad.detail == f"no stream {STATE!r}; this episode has: {ACTION}, timestamps"
    assert ep2.original_rate_hz == pytest.approx(25.0)
    assert isinstance(empty, Quarantined) and empty.reason == readers.SHAPE_MISMATCH and STATE in empty.detail
    assert readers._h5_dataset(h5py.File(path).id, "data//demo_0/obs//timestamps") is not None  # empty parts ignored


def test_a_missing_stream_names_what_the_episode_has(tmp_path):
    """robomimic's default streams are named after LeRobot's: the message shows the paths to
    put in streams instead."""
    import h5py

    path = tmp_path / "lift.hdf5"
    with h5py.File(path, "w") as f:
        d = f.create_group("data/demo_0")
        d["actions"], d["dones"], d["obs/object"], d["obs/robot0_eef_pos"] = (np.zeros((5, 3)),) * 4
        f["data"].attrs["env_args"] = json.dumps({"env_kwargs": {"control_freq": 20}})
        f["data/demo_1/big"] = np.zeros((5, 1))
        for i in range(12):
            f[f"data/demo_1/obs/k{i:02}"] = np.zeros((5, 1))
    first, many = _outcomes("robomimic", str(path), _spec(streams=[STATE, ACTION]))
    assert (first.reason, first.episode) == (readers.MISSING_STREAM, "demo_0")
    assert first.detail == f"no stream {STATE!r} (and 1 more); this episode has: actions, dones, obs/object, " \
                           "obs/robot0_eef_pos"
    assert many.detail.endswith("this episode has: big, obs/k00, obs/k01, obs/k02, obs/k03, obs/k04, obs/k05, "
                                "obs/k06, obs/k07, obs/k08, ...")
    (q,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamp=np.arange(3) / 10, joints=np.zeros((3, 2)))))
    assert q.detail == f"no stream {STATE!r} (and 1 more); this episode has: timestamp, joints"


@pytest.mark.parametrize("userblock", [0, 512])
def test_hdf5_direct_reads_give_what_hdf5_reads(tmp_path, userblock, monkeypatch):
    """Contiguous datasets stored as they lie in memory are read with one preadv; every
    other layout or type goes through HDF5: the values are the same either way."""
    import os

    import h5py

    rng = np.random.default_rng(5)
    arrays = {"f4": rng.standard_normal((40, 3)).astype("<f4"), "f8_be": rng.standard_normal(40).astype(">f8"),
              "i2": rng.integers(-9, 9, (40, 2)).astype("<i2"), "u1": rng.integers(0, 255, 40).astype("u1"),
              "b": rng.integers(0, 2, (40, 2)).astype(bool), "empty": np.zeros((0, 3), "<f4")}
    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w", userblock_size=userblock) as f:
        for name, x in arrays.items():
            f.create_dataset(name, data=x)
        f.create_dataset("chunked", data=arrays["f4"], chunks=(8, 3), compression="gzip")
        f.create_dataset("unwritten", shape=(40, 3), dtype="<f4")  # never written: not allocated, fill values
    direct_reads = []
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *a: direct_reads.append(a[2]) or real_preadv(*a))
    fd = os.open(path, os.O_RDONLY)
    try:
        with h5py.File(path, "r") as f:
            for name in [*arrays, "chunked"]:
                direct, through_hdf5 = readers._h5_dataset(f.id, name, fd), readers._h5_dataset(f.id, name)
                np.testing.assert_array_equal(direct, through_hdf5, err_msg=name)
                assert direct.dtype == through_hdf5.dtype, name
            for fd_or_none in (fd, None):  # no data at all (with a user block, HDF5 gives it an offset)
                with pytest.raises(ValueError, match="'unwritten' declares shape \\(40, 3\\) \\(480 bytes\\)"):
                    readers._h5_dataset(f.id, "unwritten", fd_or_none)
    finally:
        os.close(fd)
    assert len(direct_reads) >= 4  # the plain contiguous ones did not go through HDF5


@pytest.mark.parametrize("options", [{"compression": "gzip"}, {}])
def test_hdf5_chunks_never_written_are_not_read_as_values(tmp_path, options):
    """A recorder that died after growing its dataset leaves chunks that read as zeros;
    compression (or padded edge chunks) hides them from the stored-size test."""
    import h5py

    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        part = f.create_dataset("part", shape=(1000, 25), chunks=(100, 7), dtype="<f4", **options)
        part[:900] = 1.0  # the last rows' chunks are never written
        f.create_dataset("whole", data=np.ones((1000, 25), "<f4"), chunks=(100, 7), **options)
    with h5py.File(path, "r") as f:
        with pytest.raises(ValueError, match="'part' has chunks that were never written"):
            readers._h5_dataset(f.id, "part")
        assert readers._h5_dataset(f.id, "whole").sum() == 25000


def test_hdf5_chunks_far_larger_than_their_data_are_not_inflated(tmp_path):
    """50 rows in one gzip chunk of 3M rows: HDF5 would inflate 72 MB to read them (100M rows: 2.4 GB)."""
    import h5py

    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("huge", data=np.ones((50, 6), "<f4"), maxshape=(None, 6), chunks=(3_000_000, 6),
                         compression="gzip")
        f.create_dataset("grown", data=np.ones((50, 6), "<f4"), maxshape=(None, 6), chunks=(1000, 6),
                         compression="gzip")  # a chunk larger than the data, but small
    with h5py.File(path, "r") as f:
        with pytest.raises(ValueError, match="'huge' is stored in chunks of 72000000 bytes for 1200 bytes of data"):
            readers._h5_dataset(f.id, "huge")
        assert readers._h5_dataset(f.id, "grown").shape == (50, 6)


def test_hdf5_datasets_of_many_small_chunks_are_read_a_block_of_rows_at_a_time(tmp_path, monkeypatch):
    """HDF5 keeps state for every chunk one read touches: a recorder that wrote a chunk per
    step (400k rows) took 1.6 GB to read at once, 142 MB in blocks."""
    h5py = pytest.importorskip("h5py")
    n = 1000
    state = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    path = tmp_path / "steps.hdf5"
    with h5py.File(path, "w") as f:
        demo = f.create_group("data/demo_0")
        demo.create_dataset(STATE, data=state, chunks=(1, 3), maxshape=(None, 3))
        demo.create_dataset(ACTION, data=state[:, :2], chunks=(7, 1), maxshape=(None, 2))
        demo.create_dataset("timestamps", data=np.arange(n) / 50.0, chunks=(1,), maxshape=(None,))
        demo.create_dataset("rate", data=50.0)  # a scalar is read whole
    monkeypatch.setattr(readers, "_H5_CHUNKS_PER_READ", 100)
    reads = []
    original = readers._h5_read_rows
    monkeypatch.setattr(readers, "_h5_read_rows", lambda obj, out, r0, r1: (reads.append((r0, r1)),
                                                                            original(obj, out, r0, r1)))
    (ep,) = _outcomes("robomimic", str(path), _spec(streams=[STATE, ACTION]))
    assert isinstance(ep, RawEpisode)
    np.testing.assert_array_equal(ep.frames, np.concatenate([state, state[:, :2]], 1))
    np.testing.assert_array_equal(ep.times, np.arange(n) / 50.0)
    # a chunk per row: 100 rows a read; chunks of 7 rows, 2 across: 50 chunks, 350 rows
    assert reads.count((0, 100)) == 2 and (900, 1000) in reads and (0, 350) in reads and (700, 1000) in reads


def test_hdf5_without_data_group_is_unreadable(tmp_path):
    import h5py

    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=[1, 2])
    with pytest.raises(readers.UnreadableFile, match="no 'data' group"):
        _outcomes("robomimic", str(path))
    with h5py.File(path, "a") as f:
        f.create_dataset("data", data=[1, 2])
    with pytest.raises(readers.UnreadableFile) as info:
        _outcomes("robomimic", str(path))
    assert str(info.value) == "'data' is not a group (expected robomimic layout data/demo_N/...)"


def test_hdf5_a_demo_linked_under_two_names_is_read_once(tmp_path):
    import h5py

    rng = np.random.default_rng(3)
    path = tmp_path / "linked.hdf5"
    write_robomimic(path, [make_episode(rng, "0", 20.0, 1.0)], state_key=STATE, action_key=ACTION)
    with h5py.File(path, "a") as f:
        f["data/demo_1"] = f["data/demo_0"]  # a hard link
        f["data/demo_2"] = h5py.SoftLink("/data/demo_0")
    out = _outcomes("robomimic", str(path))
    assert isinstance(out[0], RawEpisode) and out[0].episode == "demo_0"
    assert [(q.episode, q.reason, q.detail) for q in out[1:]] == [
        ("demo_1", readers.DUPLICATE, "demo_1 is demo_0 (a link to it): read once"),
        ("demo_2", readers.DUPLICATE, "demo_2 is demo_0 (a link to it): read once")]


def test_hdf5_unreadable_file_attributes_cost_the_metadata_not_the_demos(tmp_path, monkeypatch, caplog):
    path = tmp_path / "d.hdf5"
    write_robomimic(path, [make_episode(np.random.default_rng(4), "0", 20.0, 1.0)], state_key=STATE,
                    action_key=ACTION)

    def corrupt(attrs):
        raise RuntimeError("Unable to synchronously read attribute (wrong B-tree signature)")

    monkeypatch.setattr(readers, "_env_args", corrupt)
    (ep,) = _outcomes("robomimic", str(path), hint="lab")
    assert isinstance(ep, RawEpisode) and ep.robot == "lab"  # timestamps: no rate needed; the hint names the robot
    assert "the attributes of 'data' are unreadable (RuntimeError: Unable to synchronously read" in caplog.text


def test_hdf5_data_in_other_files_is_never_read(tmp_path):
    """A downloaded file must not pull files of the machine that reads it into a shard:
    external storage, virtual datasets and external links (also behind a soft link) are
    quarantined, and the demos that keep their data in the file are read."""
    import h5py

    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(range(80)))
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("state", data=np.full((10, 8), 7.0))
        f.create_group("data/demo_9").create_dataset(STATE, data=np.full((10, 8), 7.0))
    path = tmp_path / "demos.h5"
    with h5py.File(path, "w") as f:
        good = f.create_group("data/demo_0")
        good.create_dataset(STATE, data=np.ones((10, 8)))
        for name in ("demo_0", "demo_1", "demo_2", "demo_3", "demo_4"):
            g = f.require_group(f"data/{name}")
            g.attrs["rate_hz"] = 10.0
            g.create_dataset(ACTION, data=np.ones((10, 1)))
        f["data/demo_1"].create_dataset(STATE, shape=(10, 8), dtype="u1", external=[(str(secret), 0, 80)])
        layout = h5py.VirtualLayout(shape=(10, 8), dtype="f8")
        layout[:] = h5py.VirtualSource(str(tmp_path / "other.h5"), "state", shape=(10, 8))
        f["data/demo_2"].create_virtual_dataset(STATE, layout)
        f["data/demo_3"][STATE] = h5py.ExternalLink(str(tmp_path / "other.h5"), "state")
        f["data/demo_4"]["elsewhere"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "state")
        f["data/demo_4"][STATE] = h5py.SoftLink("/data/demo_4/elsewhere")
        f["data/demo_5"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "data/demo_9")
        shared = f.create_group("data/demo_6")  # a soft link within the file is followed
        shared.attrs["rate_hz"] = 10.0
        shared[STATE] = h5py.SoftLink(f"/data/demo_0/{STATE}")
        shared.create_dataset("recorded/action", data=np.ones((10, 1)))
        shared[ACTION] = h5py.SoftLink("./recorded/action")  # relative to its group
    out = {o.episode: o for o in _outcomes("robomimic", str(path))}
    assert isinstance(out.pop("demo_0"), RawEpisode) and isinstance(out.pop("demo_6"), RawEpisode)
    assert sorted(out) == ["demo_1", "demo_2", "demo_3", "demo_4", "demo_5"]
    for name, q in out.items():
        assert isinstance(q, Quarantined) and q.reason == readers.UNREADABLE, name
    assert "external or virtual storage" in out["demo_1"].detail and "external or virtual" in out["demo_2"].detail
    assert "links to another file" in out["demo_3"].detail and "links to another file" in out["demo_4"].detail
    assert "links to another file" in out["demo_5"].detail

    with h5py.File(tmp_path / "linked.h5", "w") as f:
        f["data"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "data")
    with pytest.raises(readers.UnreadableFile, match="'data' links to another file"):
        _outcomes("robomimic", str(tmp_path / "linked.h5"))


def test_hdf5_soft_links_to_soft_links_end_within_one_budget(tmp_path):
    """Each link a path of links to links: resolved one by one, the work would double at
    every level; one budget of 16 for the whole lookup stops it at once, as HDF5 does."""
    import h5py

    path = tmp_path / "links.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("data/demo_0")
        g.attrs["rate_hz"] = 10.0
        g.create_dataset(STATE, data=np.ones((10, 2)))
        g.create_dataset(ACTION, data=np.ones((10, 1)))
        for i in range(30):
            f[f"L{i}"] = h5py.SoftLink("/" + "/".join([f"L{i + 1}"] * 4))
        f["L30"] = h5py.SoftLink("/")
        f["data/demo_1"] = h5py.SoftLink("/L0/data/demo_0")
    out = {o.episode: o for o in _outcomes("robomimic", str(path))}
    assert isinstance(out["demo_0"], RawEpisode)
    assert out["demo_1"].reason == readers.UNREADABLE and "more than 16 soft links" in out["demo_1"].detail


def test_hdf5_links_are_checked_before_they_are_followed(tmp_path):
    """An external link is refused without opening its target: a named pipe there would
    hang the reader in open() for good."""
    import os
    import subprocess
    import sys

    import h5py

    os.mkfifo(tmp_path / "pipe.h5")
    path = tmp_path / "demos.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("data/demo_0")
        g.attrs["rate_hz"] = 10.0
        g[STATE] = h5py.ExternalLink(str(tmp_path / "pipe.h5"), "/x")
        g.create_dataset(ACTION, data=np.ones((10, 1)))
    script = ("import sys; from test_preprocess_readers import _outcomes; "
              "(q,) = _outcomes('robomimic', sys.argv[1]); print(q.reason, q.detail)")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"{readers.UNREADABLE} ") and "links to another file" in done.stdout


def test_hdf5_member_name_that_is_not_utf8_is_read(tmp_path):
    import h5py

    path = tmp_path / "names.h5"
    with h5py.File(path, "w") as f:
        for name in (b"demo_\xff1", b"demo_0"):  # h5py lists the first as bytes
            g = f.create_group(b"data/" + name)
            g.create_dataset(STATE, data=np.ones((5, 2)))
            g.create_dataset(ACTION, data=np.ones((5, 1)))
            g.attrs["rate_hz"] = 10.0
    out = _outcomes("robomimic", str(path))
    assert [o.episode for o in out] == ["demo_0", "demo_\\xff1"] and all(isinstance(o, RawEpisode) for o in out)


def test_hdf5_datasets_declaring_more_than_the_file_holds_are_quarantined_not_allocated(tmp_path):
    import h5py

    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        def demo(name, **action):
            g = f.create_group(f"data/{name}")
            g.create_dataset(STATE, data=np.ones((40, 2)))
            g.create_dataset(ACTION, **action)
            g.attrs["rate_hz"] = 10.0

        demo("demo_0", data=np.ones((40, 1)))
        demo("demo_1", shape=(10**11, 3), chunks=(1024, 3), dtype="f8")  # 2.4 TB declared, nothing stored
        demo("demo_2", shape=(10**10, 3), dtype="f4")  # contiguous, never written
        demo("demo_3", shape=(40, 3), chunks=(4, 3), dtype="f8")  # unfiltered chunks, one of ten written
        f["data/demo_3"][ACTION][:4] = 1.0
        # constant values compress ~700x with gzip: a real dataset, read as such
        f.create_dataset(f"data/demo_4/{STATE}", data=np.ones((200_000, 2)), chunks=(50_000, 2),
                         compression="gzip", compression_opts=9)
        f.create_dataset(f"data/demo_4/{ACTION}", data=np.zeros(200_000), compression="gzip", shuffle=True)
        f["data/demo_4"].attrs["rate_hz"] = 10.0
    for src in (str(path), path.read_bytes()):
        ok, huge, contiguous, partial, compressed = _outcomes("robomimic", src)
        assert isinstance(ok, RawEpisode) and isinstance(compressed, RawEpisode) and compressed.length == 200_000
        for q, shape, size in ((huge, (10**11, 3), 24 * 10**11), (contiguous, (10**10, 3), 12 * 10**10),
                               (partial, (40, 3), 960)):
            assert isinstance(q, Quarantined) and q.reason == readers.UNREADABLE
            assert f"{ACTION!r} declares shape {shape} ({size} bytes)" in q.detail


def test_hdf5_frames_beyond_num_samples_quarantine_the_demo(tmp_path):
    import h5py

    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        for name, stored, recorded in (("demo_0", 30, 30), ("demo_1", 50, 30)):  # 30 frames + 20 rows of padding
            g = f.create_group(f"data/{name}")
            g.create_dataset(STATE, data=np.ones((stored, 2)))
            g.create_dataset(ACTION, data=np.ones((stored, 1)))
            g.attrs.update(num_samples=recorded, rate_hz=10.0)
    ok, padded = _outcomes("robomimic", str(path))
    assert isinstance(ok, RawEpisode) and ok.length == 30
    assert isinstance(padded, Quarantined) and padded.reason == readers.SHAPE_MISMATCH
    assert padded.detail == f"stream {STATE!r} has 50 samples but num_samples is 30"


def _masked_robomimic(path):
    """Demos 0, 1, 2 and 10 with robomimic's filter masks: names as fixed- (train) and
    variable-length (valid) bytes, listed in any order, one no demo of the file."""
    import h5py

    rng = np.random.default_rng(8)
    write_robomimic(path, [make_episode(rng, str(i), 20.0, 1.0) for i in (0, 1, 2, 10)], state_key=STATE,
                    action_key=ACTION)
    with h5py.File(path, "a") as f:
        f["mask/train"] = np.array([b"demo_10", b"demo_0", b"demo_99"])
        f.create_dataset("mask/valid", data=[b"demo_2"], dtype=h5py.string_dtype("ascii"))
        f["mask/stale"] = np.array([b"demo_99"])


def test_hdf5_filter_key_reads_only_the_demos_its_mask_lists_in_file_order(tmp_path):
    path = tmp_path / "d.hdf5"
    _masked_robomimic(path)
    everything = _outcomes("robomimic", str(path))
    assert [o.episode for o in everything] == ["demo_0", "demo_1", "demo_2", "demo_10"]
    assert all(isinstance(o, RawEpisode) for o in everything)
    train = _outcomes("robomimic", str(path), _spec(filter_key="train"))
    assert [o.episode for o in train] == ["demo_0", "demo_10"]  # the others: skipped, not quarantined
    np.testing.assert_array_equal(train[1].frames, everything[3].frames)
    assert [o.episode for o in _outcomes("robomimic", str(path), _spec(filter_key="valid"))] == ["demo_2"]


def test_hdf5_filter_key_without_its_mask_quarantines_the_file_once(tmp_path):
    import h5py

    from trajflow.storage import LocalStorage

    path = tmp_path / "d.hdf5"
    _masked_robomimic(path)
    storage = LocalStorage(tmp_path)
    size = path.stat().st_size
    (q,) = readers.read_item(storage, "d.hdf5", size, "robomimic", _spec(filter_key="20_percent")).outcomes
    assert (q.reason, q.episode) == (readers.UNREADABLE, "")
    assert q.detail == "no mask/20_percent (the filterKey); this file's masks: stale, train, valid"
    (q,) = readers.read_item(storage, "d.hdf5", size, "robomimic", _spec(filter_key="stale")).outcomes
    assert (q.reason, q.episode) == (readers.UNREADABLE, "")
    assert q.detail == "mask/stale (the filterKey) lists none of the demos in 'data' (it lists: demo_99)"
    bare = tmp_path / "bare.hdf5"
    write_robomimic(bare, [make_episode(np.random.default_rng(0), "0", 20.0, 1.0)])
    (q,) = readers.read_item(storage, "bare.hdf5", bare.stat().st_size, "robomimic", _spec(filter_key="train")).outcomes
    assert q.detail == "no mask/train (the filterKey); this file's masks: nothing"
    # the mask is read with the streams' guards: never from another file, only names
    with h5py.File(path, "a") as f:
        f["mask/elsewhere"] = h5py.ExternalLink("other.h5", "names")
        f["mask/numbers"] = np.arange(3)
    size = path.stat().st_size
    for key, detail in (("elsewhere", "links to another file"), ("numbers", "holds int64 values, not demo names")):
        (q,) = readers.read_item(storage, "d.hdf5", size, "robomimic", _spec(filter_key=key)).outcomes
        assert q.reason == readers.UNREADABLE and f"mask/{key} (the filterKey)" in q.detail and detail in q.detail


def test_hdf5_filter_key_of_a_source_wins_over_the_top_level(tmp_path):
    path = tmp_path / "d.hdf5"
    _masked_robomimic(path)
    valid = _spec(filter_key="train", sources={"src": {"filter_key": "valid"}})
    assert [o.episode for o in _outcomes("robomimic", str(path), valid)] == ["demo_2"]
    every = _spec(filter_key="train", sources={"src": {"filter_key": ""}})  # "" for a source: every demo
    assert len(_outcomes("robomimic", str(path), every)) == 4
    other = _spec(filter_key="train", sources={"other": {"filter_key": "valid"}})
    assert [o.episode for o in _outcomes("robomimic", str(path), other)] == ["demo_0", "demo_10"]
    # other formats have no masks: the setting changes nothing there
    (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamp=np.arange(3) / 10, **{STATE: np.zeros((3, 2)),
                                                                                   ACTION: np.zeros((3, 1))})),
                      _spec(filter_key="train"))
    assert isinstance(ep, RawEpisode)


def test_hdf5_null_dataspace_timestamps_are_an_empty_dataset(tmp_path):
    import h5py

    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset(f"data/demo_0/{STATE}", data=np.ones((40, 2)))
        f.create_dataset(f"data/demo_0/{ACTION}", data=np.ones((40, 1)))
        f.create_dataset("data/demo_0/timestamps", data=h5py.Empty("f8"))
    (q,) = _outcomes("robomimic", str(path))
    assert q.reason == readers.SHAPE_MISMATCH and q.detail == "0 timestamps for 40 samples"


@pytest.mark.parametrize("robot, env_robots, label", [
    (np.array([b"panda", b"ur5"]), None, "panda"),
    (np.bytes_(b"ur5e"), None, "ur5e"),
    (None, [{"name": "Panda"}], "Panda"),
    (np.array([1, 2]), ["Sawyer"], "Sawyer"),  # a number names no robot: the env's
    (np.array([1, 2]), [{"type": "arm"}], "hint"),  # neither names one: the dataset's
])
def test_hdf5_robot_names_from_arrays_bytes_and_dicts(tmp_path, robot, env_robots, label):
    import h5py

    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset(f"data/demo_0/{STATE}", data=np.ones((5, 2)))
        f.create_dataset(f"data/demo_0/{ACTION}", data=np.ones((5, 1)))
        f["data/demo_0"].attrs["rate_hz"] = 10.0
        if robot is not None:
            f["data"].attrs["robot"] = robot
        if env_robots is not None:
            f["data"].attrs["env_args"] = json.dumps({"env_kwargs": {"robots": env_robots}})
    (ep,) = _outcomes("robomimic", str(path), hint="hint")
    assert isinstance(ep, RawEpisode) and ep.robot == label


def test_npz_robot_stored_as_bytes_is_decoded():
    x = np.ones((4, 2))
    (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(fps=np.array(4.0), robot=np.array([b"ur5", b"x"]),
                                                  **{STATE: x, ACTION: x})))
    assert ep.robot == "ur5"


@pytest.mark.parametrize("fps", [np.array(True), np.array("50"), np.array(b"50"), np.array(50 + 0j)])
def test_a_rate_that_is_no_number_is_refused(tmp_path, fps):
    import h5py

    x = np.ones((4, 2))
    (q,) = _outcomes("npz", io.BytesIO(npz_bytes(fps=fps, **{STATE: x, ACTION: x})))
    assert isinstance(q, Quarantined) and q.reason == readers.MISSING_TIME and "no recorded rate" in q.detail
    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset(f"data/demo_0/{STATE}", data=x)
        f.create_dataset(f"data/demo_0/{ACTION}", data=x)
        f["data"].attrs["fps"] = fps.item() if fps.dtype.kind == "U" else fps  # h5py stores str, not numpy's
        f["data"].attrs["env_args"] = json.dumps({"env_kwargs": {"control_freq": True, "fps": "50"}})
    (q,) = _outcomes("robomimic", str(path))
    assert isinstance(q, Quarantined) and q.reason == readers.MISSING_TIME and "no recorded rate" in q.detail
    (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(fps=np.array(4), **{STATE: x, ACTION: x})))  # an integer is one
    assert ep.original_rate_hz == pytest.approx(4.0)


def test_episode_names_with_non_decimal_digits_sort_naturally():
    assert readers._natural_key("ep1²") == ("ep", 1, "²")
    x = np.ones((4, 2))
    blob = npz_bytes(fps=np.array(4.0), **{f"{e}/{s}": x for e in ("ep10", "ep2²", "²") for s in (STATE, ACTION)})
    assert [o.episode for o in _outcomes("npz", io.BytesIO(blob))] == ["ep2²", "ep10", "²"]


def _npz_declaring(shape: tuple, data: bytes, compress_type: int) -> bytes:
    """An npz of timestamps and a STATE member whose npy header declares ``shape`` over ``data``."""
    import struct
    import zipfile

    header = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape!r}, }}".encode("latin1")
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    times = io.BytesIO()
    np.save(times, np.arange(4.0) / 10)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("timestamps.npy", times.getvalue())
        z.writestr(f"{STATE}.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data,
                   compress_type=compress_type)
    return buf.getvalue()


@pytest.mark.parametrize("deflated", [False, True])
def test_npz_member_declaring_more_than_it_holds_is_unreadable_not_allocated(deflated):
    import zipfile

    kind = zipfile.ZIP_DEFLATED if deflated else zipfile.ZIP_STORED
    with pytest.raises(readers.UnreadableFile, match=r"'observation.state.npy' declares a float64 array of shape "
                                                     r"\(1000000000000,\) \(8000000000000 bytes\)"):
        _outcomes("npz", _npz_declaring((10**12,), bytes(24), kind))
    # a member that holds what its header declares is read, stored or deflated
    (q,) = _outcomes("npz", _npz_declaring((4,), bytes(32), kind))
    assert q.reason == readers.MISSING_STREAM  # the file was read: it has no action stream


@pytest.mark.parametrize("method", ["ZIP_BZIP2", "ZIP_LZMA"])
def test_npz_members_compressed_past_deflate_s_ceiling_are_quarantined(method):
    """bzip2 and LZMA shrink constant values far more than deflate's 1032x, and only the size
    the archive itself records bounds them (a 2 KB file claiming terabytes was a MemoryError
    that failed the shard): numpy never writes them, and the file is unreadable (quarantined)."""
    import zipfile

    zeros = np.zeros((200_000, 8), np.float32)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=getattr(zipfile, method)) as z:
        for name, array in {"timestamps": np.arange(200_000) / 100.0, STATE: zeros, ACTION: zeros}.items():
            member = io.BytesIO()
            np.save(member, array)
            z.writestr(f"{name}.npy", member.getvalue())
    with pytest.raises(readers.UnreadableFile, match=f"compressed with zip method {getattr(zipfile, method)}, not stored"):
        _outcomes("npz", io.BytesIO(buf.getvalue()))


def test_integer_timestamps_are_refused_not_taken_as_seconds():
    x = np.ones((20, 2), np.float32)
    ms = np.arange(20, dtype=np.int64) * 20  # 50 Hz in milliseconds: 380 s if read as seconds
    (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamps=ms, **{STATE: x, ACTION: x})))
    assert isinstance(ep, Quarantined) and ep.reason == readers.MISSING_TIME
    assert ep.detail.startswith("timestamps are integers (int64), not seconds: set preprocessing.config.timeUnit")
    table = pa.table({"episode_index": np.zeros(20, np.int64), "timestamp": ms * 1_000_000,  # nanoseconds
                      STATE: pa.array(x.tolist()), ACTION: pa.array(x.tolist())})
    (ep,) = _outcomes("lerobot", _parquet(table))
    assert isinstance(ep, Quarantined) and ep.reason == readers.MISSING_TIME and "(int64)" in ep.detail
    assert "timeUnit: ns" in ep.detail


@pytest.mark.parametrize("unit", ["s", "ms", "ns"])
def test_lerobot_times_from_frame_index_and_rate_are_seconds_whatever_the_time_unit(unit):
    """Without a timestamp column, frame_index / fps are seconds already: a timeUnit meant for
    other sources' timestamps must not shrink them."""
    n = 100
    x = np.ones((n, 2), np.float32)
    table = pa.table({"episode_index": np.zeros(n, np.int64), "frame_index": np.arange(n),
                      STATE: pa.array(x.tolist()), ACTION: pa.array(x.tolist())})
    (ep,) = _outcomes("lerobot", _parquet(table), _spec(time_unit=unit, rate_hz=30.0))
    assert isinstance(ep, RawEpisode) and ep.times[-1] == pytest.approx(99 / 30)


@pytest.mark.parametrize("unit, per_second", [("ms", 1e3), ("us", 1e6)])
def test_whole_milli_and_microseconds_of_a_30_hz_recording_keep_its_last_frame(unit, per_second):
    """302 frames at 30 Hz in whole milliseconds end at 10033 ms, short of 301 periods
    (10033.3 ms): the rounding of the stored unit must not cost the last frame."""
    import torch

    from trajflow.preprocess.kernels import uniform_grid_steps

    n = 302
    stamps = np.round(np.arange(n) * per_second / 30).astype(np.int64)
    x = np.ones((n, 2), np.float32)
    (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamps=stamps, **{STATE: x, ACTION: x})), _spec(time_unit=unit))
    assert isinstance(ep, RawEpisode) and ep.time_rounding == pytest.approx(1 / per_second)
    spans = torch.tensor([[0.0, ep.times[-1]]], dtype=torch.float64)
    assert uniform_grid_steps(spans, 30.0, time_rounding=ep.time_rounding).tolist() == [n]


@pytest.mark.parametrize("start, rate", [(1.7e9, 50.0), (1e5, 100.0)])
def test_float32_timestamps_too_coarse_for_their_rate_are_named(start, rate):
    """float32 epoch seconds step by 128 s (every sample looks like a duplicate), and a day of
    uptime by 8 ms (samples 10 ms apart land up to 4 ms off): say that float32 is the cause."""
    n = 300
    x = np.ones((n, 2), np.float32)
    stamps = (start + np.arange(n) / rate).astype(np.float32)
    (q,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamps=stamps, **{STATE: x, ACTION: x})))
    assert isinstance(q, Quarantined) and q.reason == readers.MISSING_TIME
    assert q.detail.startswith("timestamps are float32 and reach ") and "store them as float64" in q.detail
    # the same times relative to the start, or as float64, are read
    for fine in ((np.arange(n) / rate).astype(np.float32), start + np.arange(n) / rate):
        (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamps=fine, **{STATE: x, ACTION: x})))
        assert isinstance(ep, RawEpisode) and ep.length == n
    # times going back, in either type, are told as such
    for back in ((10 - np.arange(n) / rate).astype(np.float32), start - np.arange(n) / rate):
        (q,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamps=back, **{STATE: x, ACTION: x})))
        assert isinstance(q, Quarantined) and q.reason == readers.NON_MONOTONIC, q


def test_integer_timestamps_too_large_to_subtract_are_refused_not_wrapped():
    x = np.ones((3, 2), np.float32)
    for ns in (np.array([np.iinfo(np.int64).min + 1, 0, 10**9], np.int64), np.array([0, 1, 2**63 + 5], np.uint64)):
        (q,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamps=ns, **{STATE: x, ACTION: x})), _spec(time_unit="ns"))
        assert isinstance(q, Quarantined) and q.reason == readers.MISSING_TIME and "beyond ±2**62" in q.detail, ns


def test_integer_nanosecond_epochs_are_read_with_time_unit_ns_at_full_precision(tmp_path):
    """ROS2 exports and most loggers store int64 ns since the epoch: as float64 seconds those
    round to ~0.2 us, so they are taken relative to the first before the division."""
    import h5py

    n = 200
    step = np.int64(3_333_333) + np.arange(n - 1) % 7  # ~300 Hz, steps differing by single ns
    ns = 1_760_000_000_123_456_789 + np.concatenate([[0], np.cumsum(step)]).astype(np.int64)
    expected = (ns - ns[0]).astype(np.float64) / 1e9
    x = np.ones((n, 2), np.float32)
    with h5py.File(tmp_path / "d.hdf5", "w") as f:
        f[f"data/demo_0/{STATE}"], f[f"data/demo_0/{ACTION}"], f["data/demo_0/obs/timestamps"] = x, x, ns
    files = {
        "lerobot": _parquet(pa.table({"episode_index": np.zeros(n, np.int64), "timestamp": ns,
                                      STATE: pa.array(x.tolist()), ACTION: pa.array(x.tolist())})),
        "robomimic": str(tmp_path / "d.hdf5"),
        "npz": io.BytesIO(npz_bytes(timestamps=ns, **{STATE: x, ACTION: x})),
    }
    for fmt, src in files.items():
        (ep,) = _outcomes(fmt, src, _spec(time_unit="ns"))
        assert isinstance(ep, RawEpisode), (fmt, ep)
        np.testing.assert_array_equal(ep.times, expected, err_msg=fmt)  # not a nanosecond lost
        # exact, as differences of int64; the rounding allowed for is one count of the unit
        assert ep.start_time == pytest.approx(1_760_000_000.123456789, abs=1e-6) and ep.time_rounding == 1e-9
        if not isinstance(src, str):
            src.seek(0)
        (q,) = _outcomes(fmt, src, _spec())  # seconds, the default: refused, saying what to set
        assert isinstance(q, Quarantined) and q.reason == readers.MISSING_TIME and "timeUnit" in q.detail, fmt
    # a source's own unit wins over the top level's
    files["npz"].seek(0)
    (ep,) = _outcomes("npz", files["npz"], _spec(time_unit="ms", sources={"src": {"time_unit": "ns"}}))
    assert isinstance(ep, RawEpisode) and ep.original_rate_hz == pytest.approx(300.0, rel=1e-3)


@pytest.mark.parametrize("unit, scale", [("ms", 1e3), ("us", 1e6), ("ns", 1e9)])
def test_time_unit_converts_floats_and_integers_and_still_refuses_a_finer_unit(unit: str, scale: float):
    x = np.ones((100, 2), np.float32)
    seconds = 1.7e9 + np.arange(100) / 100.0  # 100 Hz epoch seconds
    for times in (seconds * scale, np.round(seconds * scale).astype(np.int64)):
        (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamps=times, **{STATE: x, ACTION: x})),
                          _spec(time_unit=unit))
        assert isinstance(ep, RawEpisode) and ep.original_rate_hz == pytest.approx(100.0, rel=1e-6), times.dtype
        assert ep.start_time == pytest.approx(1.7e9, abs=1e-3)
    # 1000x finer counts than the unit set: refused as before, naming the setting
    (q,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamps=seconds * scale * 1000, **{STATE: x, ACTION: x})),
                     _spec(time_unit=unit))
    assert isinstance(q, Quarantined) and q.reason == readers.MISSING_TIME
    assert f"a unit finer than {unit}" in q.detail and "timeUnit" in q.detail


def test_time_unit_keeps_the_checks_of_the_converted_times():
    spec = _spec(streams=[STATE], time_unit="ms")
    values = np.ones((4, 1))
    out = readers.make_episode(spec, "k", "e", "", np.array([5000, 5010, 5010, 5030]), None, {STATE: values})
    assert isinstance(out, Quarantined) and out.reason == readers.NON_MONOTONIC
    assert out.detail == "timestamp[2] = 5.01 is not after timestamp[1] = 5.01"
    out = readers.make_episode(spec, "k", "e", "", np.array([0.0, 10.0, np.nan, 30.0]), None, {STATE: values})
    assert isinstance(out, Quarantined) and out.detail == "timestamp[2] is nan"
    table = pa.table({"episode_index": [0] * 4, "timestamp": pa.array([0, 10, None, 30], pa.int64()),
                      STATE: [1.0] * 4, ACTION: [1.0] * 4})  # nulls among integers
    (out,) = _outcomes("lerobot", _parquet(table), _spec(time_unit="ms"))
    assert isinstance(out, Quarantined) and out.reason == readers.NON_FINITE


@pytest.mark.parametrize("scale, unit", [(1e3, "ms"), (1e6, "us"), (1e9, "ns")])
def test_float_timestamps_in_ms_us_or_ns_are_refused(scale: float, unit: str):
    """Taken as seconds they would stretch the episode `scale` times (ns: a 400 GB allocation)."""
    x = np.ones((100, 2), np.float32)
    times = np.arange(100) / 100.0 * scale + 1.7e9 * (scale if unit != "ms" else 1)
    (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamps=times, **{STATE: x, ACTION: x})))
    assert isinstance(ep, Quarantined) and ep.reason == readers.MISSING_TIME
    assert "ms, us or ns" in ep.detail and "seconds" in ep.detail
    jittered = times + 0.37 * (np.arange(100) % 2)  # not whole numbers: told by the rate
    (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamps=jittered, **{STATE: x, ACTION: x})))
    assert isinstance(ep, Quarantined) and ep.reason == readers.MISSING_TIME
    if unit == "ms":
        assert "below 1 Hz" in ep.detail and "ms, us or ns rather than seconds" in ep.detail


def test_timestamps_in_hours_are_refused_not_shrunk_to_a_frame():
    """500 samples over 10 s counted in hours read as 180 kHz: resampled, one frame."""
    x = np.ones((500, 2), np.float32)
    hours = np.arange(500) * 0.02 / 3600 + 0.25
    (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamps=hours, **{STATE: x, ACTION: x})))
    assert isinstance(ep, Quarantined) and ep.reason == readers.MISSING_TIME
    assert "Hz, above 100000 Hz): timestamps in minutes or hours" in ep.detail
    (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamps=hours * 3600, **{STATE: x, ACTION: x})))
    assert isinstance(ep, RawEpisode) and ep.original_rate_hz == pytest.approx(50.0)


def test_whole_millisecond_floats_of_a_fast_recording_are_refused_not_taken_as_1_hz():
    """libfranka's 1 kHz clock in ms as doubles: read as seconds it passes the 1 Hz check and
    stretches a 2 s episode to 2000 s."""
    x = np.ones((2001, 2), np.float32)
    (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamps=np.arange(2001, dtype=np.float64), **{STATE: x, ACTION: x})))
    assert isinstance(ep, Quarantined) and ep.reason == readers.MISSING_TIME
    assert ep.detail.startswith("timestamps are whole numbers (0, 1, ...), not seconds")
    # seconds that happen to be whole at the ends are fine
    ok = np.arange(2001, dtype=np.float64) / 1000.0
    (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamps=ok, **{STATE: x, ACTION: x})))
    assert isinstance(ep, RawEpisode) and ep.original_rate_hz == pytest.approx(1000.0)
    # and so are whole seconds (1 Hz) in a column the config names
    whole_seconds = npz_bytes(timestamps=np.arange(20, dtype=np.float64), **{STATE: x[:20], ACTION: x[:20]})
    (ep,) = _outcomes("npz", io.BytesIO(whole_seconds), _spec(time_key="timestamps"))
    assert isinstance(ep, RawEpisode) and ep.original_rate_hz == pytest.approx(1.0)


@pytest.mark.parametrize("step_ms", [0.5, 0.999])
def test_epoch_milliseconds_of_a_fast_or_jittery_clock_are_refused(step_ms: float):
    """Neither whole numbers nor below 1 Hz when read as seconds: 2 kHz in ms (or 1 kHz with
    jitter) would stretch a 10 s episode 1000 times."""
    rng = np.random.default_rng(0)
    times = 1.7e12 + np.arange(2000) * step_ms + rng.normal(0, 0.02, 2000)
    x = np.ones((2000, 2), np.float32)
    (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamps=np.sort(times), **{STATE: x, ACTION: x})))
    assert isinstance(ep, Quarantined) and ep.reason == readers.MISSING_TIME
    assert "beyond 1e+11 s (past the year 5000 as epoch seconds): ms, us or ns counts" in ep.detail
    # epoch seconds (and nanosecond-precise ones in float64) are seconds
    (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(timestamps=1.7e9 + np.arange(2000) / 500.0, **{STATE: x, ACTION: x})))
    assert isinstance(ep, RawEpisode) and ep.original_rate_hz == pytest.approx(500.0)


def test_a_gap_wider_than_max_gap_seconds_is_quarantined_not_interpolated():
    """2 s at 100 Hz, a 100 s hole, 2 s more: 100 s of a straight line between two poses."""
    times = np.concatenate([np.arange(200) / 100.0, 102.0 + np.arange(200) / 100.0])
    x = np.ones((400, 2), np.float32)
    blob = npz_bytes(timestamps=times, **{STATE: x, ACTION: x})
    (ep,) = _outcomes("npz", io.BytesIO(blob), _spec(max_gap_seconds=0.5))
    assert isinstance(ep, Quarantined) and ep.reason == readers.TIME_GAP
    assert ep.detail == "100.01 s between timestamp[199] = 1.99 and the next, more than maxGapSeconds 0.5"
    (ep,) = _outcomes("npz", io.BytesIO(blob), _spec(max_gap_seconds=200))
    assert isinstance(ep, RawEpisode)
    exact = npz_bytes(timestamps=np.array([0.0, 0.25, 0.75, 1.0]), **{STATE: x[:4], ACTION: x[:4]})
    (ep,) = _outcomes("npz", io.BytesIO(exact), _spec(max_gap_seconds=0.5))  # not further apart than the limit
    assert isinstance(ep, RawEpisode)
    (ep,) = _outcomes("npz", io.BytesIO(blob))  # no limit unless asked
    assert isinstance(ep, RawEpisode)


def test_datetime_timestamps_are_refused_as_no_seconds():
    spec = _spec(streams=[STATE])
    times = np.datetime64("2026-01-01") + np.arange(10) * np.timedelta64(10, "ms")
    out = readers.make_episode(spec, "k", "e", "", times, None, {STATE: np.ones((10, 1))})
    assert isinstance(out, Quarantined) and out.reason == readers.MISSING_TIME
    assert out.detail == ("timestamps are datetime64[ms], not seconds: convert them to float seconds (or to integers, "
                          ".astype('int64'), and set preprocessing.config.timeUnit: ms)")


def test_a_timestamp_jump_is_refused_and_slow_real_rates_pass():
    spec = _spec(streams=[STATE])
    values = np.ones((10, 1))
    jump = np.r_[np.arange(9) * 0.01, 1e6]  # one glitched clock reading
    out = readers.make_episode(spec, "k", "e", "", jump, None, {STATE: values})
    assert isinstance(out, Quarantined) and "widest gap is 1e+06 s after timestamp[8]" in out.detail
    slow = readers.make_episode(spec, "k", "e", "", np.arange(10) * 0.5, None, {STATE: values})  # 2 Hz
    assert isinstance(slow, RawEpisode)


def test_a_stream_without_values_per_sample_is_quarantined():
    # a zero-width first episode would otherwise fix the shard's widths and refuse every good one after it
    out = readers.make_episode(_spec(streams=[STATE]), "k", "e", "", np.arange(10) * 0.1, None,
                               {STATE: np.ones((10, 0))})
    assert isinstance(out, Quarantined) and out.reason == readers.SHAPE_MISMATCH
    assert out.detail == f"stream {STATE!r} has shape (10, 0): no values per sample"


def test_parquet_columns_of_booleans_dates_and_empty_lists():
    n = 6
    base = {"episode_index": np.zeros(n, np.int64), "frame_index": np.arange(n)}
    spec = _spec(streams=["grip"], rate_hz=30.0)
    bools = pa.array([[True, False]] * n, pa.list_(pa.bool_(), 2))
    (ep,) = _outcomes("lerobot", _parquet(pa.table({**base, "timestamp": np.arange(n) / 30, "grip": bools})), spec)
    assert isinstance(ep, RawEpisode) and ep.frames.tolist() == [[1.0, 0.0]] * n  # read as 0 and 1, as in npz
    dates = pa.array(np.datetime64("2026-01-01") + np.arange(n) * np.timedelta64(33, "ms"))
    (bad,) = _outcomes("lerobot", _parquet(pa.table({**base, "timestamp": dates, "grip": bools})), spec)
    assert isinstance(bad, Quarantined) and bad.reason == readers.MISSING_TIME
    assert bad.detail == ("column 'timestamp' has type timestamp[ms], not seconds: convert it to float seconds (or "
                          "cast it to int64 and set preprocessing.config.timeUnit: ms)")
    empty = pa.array([[]] * (n - 1) + [None], pa.list_(pa.float32()))  # no values, one row null
    (bad,) = _outcomes("lerobot", _parquet(pa.table({**base, "grip": empty})), spec)
    assert isinstance(bad, Quarantined) and bad.reason == readers.NON_FINITE


def test_an_npy_file_named_npz_is_unreadable_not_a_crash():
    buf = io.BytesIO()
    np.save(buf, np.arange(3))
    with pytest.raises(readers.UnreadableFile, match="not an npz archive"):
        _outcomes("npz", buf.getvalue())


def test_npz_layouts_and_rate_scalar():
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    single = npz_bytes(fps=np.array(4.0), **{STATE: x, ACTION: x[:, :1]})
    (ep,) = _outcomes("npz", io.BytesIO(single))
    assert ep.episode == "f" and ep.original_rate_hz == pytest.approx(4.0)
    multi = npz_bytes(**{"ep10/timestamps": np.arange(4.0), f"ep10/{STATE}": x, f"ep10/{ACTION}": x,
                         "ep2/timestamps": np.arange(4.0), f"ep2/{STATE}": x})
    out = _outcomes("npz", io.BytesIO(multi))
    assert [o.episode for o in out] == ["ep2", "ep10"]  # natural order
    assert isinstance(out[0], Quarantined) and out[0].reason == readers.MISSING_STREAM
    with pytest.raises(readers.UnreadableFile, match="none of the streams"):
        _outcomes("npz", io.BytesIO(npz_bytes(other=x)))
    # both layouts in one file: the groups' episodes would be dropped unseen
    mixed = npz_bytes(**{STATE: x, ACTION: x, f"ep1/{STATE}": x, f"ep1/{ACTION}": x})
    with pytest.raises(readers.UnreadableFile, match=r"both at the top level and in episode groups \(ep1\)"):
        _outcomes("npz", io.BytesIO(mixed))
    # one episode saved with slash-named keys: obs/ starts stream names, it is no episode group
    spec = _spec(streams=["obs/joint_pos", "action"])
    slashed = {"obs/joint_pos": x, "obs/timestamp": np.arange(4) / 10.0, "action": x}
    (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(**slashed)), spec)
    assert isinstance(ep, RawEpisode) and ep.original_rate_hz == pytest.approx(10.0)  # times found under obs/
    with pytest.raises(readers.UnreadableFile, match=r"in episode groups \(ep1\)"):
        _outcomes("npz", io.BytesIO(npz_bytes(**slashed, **{"ep1/obs/joint_pos": x, "ep1/action": x})), spec)
    out = _outcomes("npz", io.BytesIO(npz_bytes(**{f"ep{i}/{k}": v for i in (0, 1) for k, v in slashed.items()})),
                    spec)
    assert [o.episode for o in out] == ["ep0", "ep1"] and all(isinstance(o, RawEpisode) for o in out)
    # a rate and robot shared by the episodes, at the top level
    shared = npz_bytes(rate_hz=np.array(2.0), robot=np.array("ur5"), **{f"e{i}/{s}": x for i in (0, 1)
                                                                        for s in (STATE, ACTION)})
    out = _outcomes("npz", io.BytesIO(shared))
    assert [o.episode for o in out] == ["e0", "e1"] and all(isinstance(o, RawEpisode) for o in out)
    assert all(o.original_rate_hz == pytest.approx(2.0) and o.robot == "ur5" for o in out)


def test_npz_members_of_python_objects_are_never_unpickled_and_cost_only_what_needs_them():
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    notes = np.array([{"task": "pick"}], dtype=object)  # e.g. metadata saved beside the arrays
    (ep,) = _outcomes("npz", io.BytesIO(npz_bytes(fps=np.array(4.0), meta=notes, robot=notes,
                                                  **{STATE: x, ACTION: x})))
    assert isinstance(ep, RawEpisode) and ep.length == 4 and ep.robot == ""
    (bad,) = _outcomes("npz", io.BytesIO(npz_bytes(fps=np.array(4.0), **{STATE: x, ACTION: notes})))
    assert isinstance(bad, Quarantined) and bad.reason == readers.SHAPE_MISMATCH
    assert bad.detail == f"{ACTION!r} holds Python objects, which are never unpickled"


@pytest.mark.parametrize(
    "times,values,reason,detail",
    [
        ([0.0, 0.1, np.inf], [[1.0], [2.0], [3.0]], readers.NON_FINITE, "timestamp[2] is inf"),
        ([0.0, 0.1, 0.1], [[1.0], [2.0], [3.0]], readers.NON_MONOTONIC, "timestamp[2] = 0.1 is not after"),
        ([0.0, 0.1, 0.2], [[1.0], [np.nan], [3.0]], readers.NON_FINITE, "observation.state[1, 0] is nan"),
        ([0.0, 0.1, 0.2], [[1.0], [1e39], [3.0]], readers.NON_FINITE, "observation.state[1, 0] is 1e+39 (beyond float32)"),
        ([0.0, 0.1], [[1.0], [2.0], [3.0]], readers.SHAPE_MISMATCH, "2 timestamps for 3 samples"),
        ([0.0], [[1.0]], readers.TOO_SHORT, "1 samples < minLength 2"),
    ],
)
def test_validation_names_the_first_problem(times, values, reason, detail):
    spec = _spec(streams=[STATE])
    out = readers.make_episode(spec, "k", "e", "", np.array(times), None, {STATE: np.array(values)})
    assert isinstance(out, Quarantined) and out.reason == reason and detail in out.detail


def test_detect_format():
    assert readers.detect_format("raw/0/s/a.PARQUET", "auto") == "lerobot"
    assert readers.detect_format("raw/0/s/a.h5", "auto") == "robomimic"
    assert readers.detect_format("raw/0/s/a.npz", "lerobot") is None
    assert readers.detect_format("raw/0/s/meta/info.json", "auto") is None


# ----------------------------------------------------------------------- batching


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(2, 5000), st.integers(1, 3000)), min_size=0, max_size=60),
    batch_size=st.integers(1, 16),
    max_padding=st.sampled_from([0.0, 0.1, 0.25, 1.0]),
)
def test_plan_batches_bounds_padding(lengths, batch_size, max_padding):
    S = [s for s, _ in lengths]
    T = [t for _, t in lengths]
    batches = plan_batches(S, T, batch_size, max_padding, in_cost=3.0, out_cost=2.0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert 1 <= len(b) <= batch_size
        real = sum(3.0 * S[i] + 2.0 * T[i] for i in b)
        padded = len(b) * (3.0 * max(S[i] for i in b) + 2.0 * max(T[i] for i in b))
        assert len(b) == 1 or padded <= (1 + max_padding) * real + 1e-6
    assert plan_batches(S, T, batch_size, max_padding, 3.0, 2.0) == batches  # deterministic


def test_plan_batches_groups_similar_lengths():
    S = [10, 1000, 11, 1001, 12, 1002]
    assert plan_batches(S, S, 8, 0.25) == [[0, 2, 4], [1, 3, 5]]


# ------------------------------------------------------------------------- config


def test_config_rejects_two_streams_renamed_to_one():
    with pytest.raises(ValueError, match="several raw streams onto 'action'"):
        PreprocessConfig.model_validate({"streams": ["a", "b"], "renames": {"a": "action", "b": "action"}})
    with pytest.raises(ValueError, match="sources.x.streams"):
        PreprocessConfig.model_validate({"sources": {"x": {"streams": ["action", "act"], "renames": {"act": "action"}}}})
    cfg = PreprocessConfig.model_validate({"sources": {"x": {"rateHz": 15, "timeKey": "clock"}}, "maxBadFraction": 0.1})
    assert cfg.sources["x"].rate_hz == 15 and cfg.max_bad_fraction == 0.1


def test_config_rejects_renames_of_streams_that_are_not_read():
    # a typo: the raw name would reach the shards, and training refuse them once every shard is done
    with pytest.raises(ValueError, match=r"renames: 'obs/eef_pos' is not one of the streams read \(actions, "
                                         r"obs/robot0_eef_pos\)"):
        PreprocessConfig.model_validate({"streams": ["obs/robot0_eef_pos", "actions"],
                                         "renames": {"obs/eef_pos": "observation.state", "actions": "action"}})
    with pytest.raises(ValueError, match=r"sources.sim.renames: 'joint' is not one of the streams read"):
        PreprocessConfig.model_validate({"sources": {"sim": {"renames": {"joint": "observation.state"}}}})
    # the top level's renames serve the sources that read other streams with them
    cfg = PreprocessConfig.model_validate({"streams": ["observation.state", "action"], "renames": {"act": "action"},
                                           "sources": {"sim": {"streams": ["observation.state", "act"]}}})
    assert cfg.renames == {"act": "action"}


def test_config_requires_every_source_to_give_the_same_output_streams():
    # the first good episode would pick the shard's streams, and the other source's episodes be quarantined
    with pytest.raises(ValueError, match=r"sources.alpha.streams/renames give the output streams "
                                         r"\(actions, observation.state\), the top level gives \(action, "):
        PreprocessConfig.model_validate({"sources": {"alpha": {"streams": ["obs/joint_pos", "actions"],
                                                               "renames": {"obs/joint_pos": "observation.state"}}}})
    cfg = PreprocessConfig.model_validate({"sources": {"alpha": {
        "streams": ["actions", "obs/joint_pos"], "renames": {"obs/joint_pos": "observation.state", "actions": "action"}}}})
    assert cfg.sources["alpha"].streams == ["actions", "obs/joint_pos"]  # another order is the same set
    for name in ("__metadata__", ""):  # a shard with either would open as no trajflow shard (or not at all)
        with pytest.raises(ValueError, match=f"{name!r} cannot name a stream"):
            PreprocessConfig.model_validate({"renames": {"action": name}})
    with pytest.raises(ValueError, match="'' cannot name a stream"):
        PreprocessConfig.model_validate({"streams": ["", "action"]})


def test_stage_settings_name_the_bad_key(tmp_path):
    from trajflow.config import stage_settings

    path = tmp_path / "config.yaml"
    path.write_text("global: {}\nconfig: {batchSize: 0}\n")
    with pytest.raises(ConfigError, match=r"config.yaml: config.batchSize: .*greater than or equal to 1"):
        stage_settings("preprocessing", path, env={})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt,name", [("npz", "ep.npz"), ("robomimic", "d.hdf5"), ("lerobot", "ep.parquet")])
def test_a_fifo_among_the_raw_files_is_quarantined_not_waited_on(tmp_path, fmt, name):
    """A FIFO (or a device) where a raw file should be would block the read for good: it is
    refused by name, whether the file is read whole or its path goes to the parser."""
    from trajflow.storage import LocalStorage

    os.mkfifo(tmp_path / name)
    storage = LocalStorage(tmp_path)
    storage.prefetch(name)  # returns at once
    for expected_size in (1000, None):  # read whole (a size from the manifest), or by its path
        (q,) = readers.read_item(storage, name, expected_size, fmt, _spec()).outcomes
        assert (q.reason, q.episode) == (readers.UNREADABLE, ""), q
        assert q.detail == f"cannot read the file: {tmp_path / name}: not a regular file but a FIFO"


@pytest.mark.parametrize("raised", [RuntimeError, KeyError, OSError])
@pytest.mark.parametrize("where", ["data", "demo"])
def test_a_disk_read_error_under_hdf5_fails_the_read_instead_of_quarantining(tmp_path, monkeypatch, raised, where):
    """HDF5 tells of a failed read(2) (EIO) in its message only, under whatever type h5py
    raises: that is the storage failing (retried), not a corrupt file to quarantine for good."""
    import errno

    from trajflow.storage import LocalStorage

    path = tmp_path / "d.hdf5"
    write_robomimic(path, [make_episode(np.random.default_rng(0), "0", 20.0, 1.0)])
    message = ("Unable to synchronously open object (file read failed: time = Mon Dec  7 14:15:34 2026\n, filename = "
               f"'{path}', file descriptor = 3, errno = 5, error message = 'Input/output error', buf = 0x563d, "
               "total read size = 512, bytes this sub-read = 512, offset = 680)")
    real_open = readers._h5_open

    def failing_open(group, name, *args, **kwargs):
        if (where == "data") == (name == b"data"):
            raise raised(message)
        return real_open(group, name, *args, **kwargs)

    monkeypatch.setattr(readers, "_h5_open", failing_open)
    with pytest.raises(OSError, match="Input/output error under HDF5") as info:
        readers.read_item(LocalStorage(tmp_path), "d.hdf5", path.stat().st_size, "robomimic", _spec())
    assert info.value.errno == errno.EIO
    # a read that ends early in a corrupt file (errno 0) is the file's fault: quarantined
    monkeypatch.setattr(readers, "_h5_open", lambda *a, **k: (_ for _ in ()).throw(raised(message.replace(
        "errno = 5", "errno = 0"))))
    (q,) = readers.read_item(LocalStorage(tmp_path), "d.hdf5", path.stat().st_size, "robomimic", _spec()).outcomes
    assert q.reason == readers.UNREADABLE


def test_each_raw_file_is_parsed_in_a_frame_named_after_it(tmp_path, monkeypatch):
    """Stacks printed when a native parser hangs (faulthandler's carry file names only) name the file."""
    import sys

    from trajflow.storage import LocalStorage

    times = np.arange(20) / 100
    (tmp_path / "ep.npz").write_bytes(npz_bytes(timestamp=times, **{STATE: np.zeros((20, 2)), ACTION: np.zeros((20, 2))}))
    callers: list[str] = []
    parse_npz = readers.READERS["npz"]

    def reader(src, spec, source, hint):
        callers.append(sys._getframe(1).f_code.co_filename)
        return parse_npz(src, spec, source, hint)

    monkeypatch.setitem(readers.READERS, "npz", reader)
    result = readers.read_item(LocalStorage(tmp_path), "ep.npz", (tmp_path / "ep.npz").stat().st_size, "npz", _spec())
    assert callers == ["<parsing ep.npz>"] and isinstance(result.outcomes[0], RawEpisode), result.outcomes


def test_words_of_hdf5_s_read_failure_in_a_name_are_no_disk_error():
    """Only HDF5's whole read-failure message is a disk error: a dataset named with its words
    is a missing object, quarantined rather than retried for good."""
    readers._reraise_io(KeyError("Unable to open object (object 'errno = 5, error message = 'x' doesn't exist)"))
