"""The in-memory npz decoder: numpy's results for every file numpy writes, numpy's errors
for broken ones."""
from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest

from trajflow.preprocess import npzfile
from trajflow.preprocess.npzfile import PickledMember, load_npz


def _npz(compressed: bool = False, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "timestamps": np.cumsum(rng.uniform(0.001, 0.01, 57)),
        "observation.state": rng.standard_normal((57, 14)).astype(np.float32),
        "ep_3/action": rng.standard_normal((57, 7)).astype(">f8"),
        "fortran": np.asfortranarray(rng.standard_normal((5, 3))),
        "cube": rng.integers(-5, 5, (2, 3, 4), dtype=np.int16),
        "rate_hz": np.float64(50.0),
        "robot": np.array("koch"),
        "flags": rng.random(9) > 0.5,
        "empty": np.zeros((0, 7), np.float32),
    }


@pytest.mark.parametrize("compressed", [False, True])
def test_numpy_files_decode_without_numpy_load(monkeypatch, compressed):
    arrays = _arrays(np.random.default_rng(compressed))
    blob = _npz(compressed, **arrays)

    def refuse(*args, **kwargs):
        raise AssertionError("the fast path handed a plain numpy file to numpy.load")

    monkeypatch.setattr(npzfile.np, "load", refuse)
    out = load_npz(blob)
    assert sorted(out) == sorted(arrays)
    for name, want in arrays.items():
        got = out[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_stored_arrays_are_views_of_the_file():
    blob = _npz(x=np.arange(1000, dtype=np.float32))
    x = load_npz(blob)["x"]
    assert not x.flags.writeable and not x.flags.owndata  # no copy of the file's bytes


def test_unusual_members_are_left_to_numpy():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes.txt", b"not an array")
        with z.open("x.npy", "w") as member:
            np.save(member, np.arange(3))
    out = load_npz(buf.getvalue())
    assert out["notes.txt"] == b"not an array"  # numpy's own answer for a non-.npy member
    np.testing.assert_array_equal(out["x"], np.arange(3))


def test_object_arrays_are_never_unpickled_and_the_other_members_still_load():
    blob = _npz(x=np.array([{"a": 1}], dtype=object), y=np.arange(3))
    out = load_npz(blob)
    assert out["x"] == PickledMember("x")
    np.testing.assert_array_equal(out["y"], np.arange(3))


def test_a_corrupt_member_fails_its_checksum():
    blob = bytearray(_npz(x=np.arange(100, dtype=np.float64)))
    blob[200] ^= 0xFF  # inside the array's bytes
    with pytest.raises(zipfile.BadZipFile, match="CRC"):
        load_npz(bytes(blob))


@pytest.mark.parametrize("keep", [0, 1, 10, 100, -30, -1])
def test_truncated_files_fail_as_numpy_fails(keep):
    blob = _npz(x=np.arange(100, dtype=np.float64), y=np.ones((4, 4)))
    if 0 <= keep < 4:  # too short to start as a zip archive: numpy would take it for a pickle
        with pytest.raises(ValueError, match="not an npz \\(zip\\) archive"):
            load_npz(blob[:keep])
        return
    expected = _numpy_says(blob[:keep])
    assert isinstance(expected, Exception), expected
    with pytest.raises(type(expected)) as info:
        load_npz(blob[:keep])
    assert type(info.value) is type(expected) and str(info.value) == str(expected)


def _numpy_says(blob: bytes):
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - whatever numpy raises is the expectation
        return exc


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _npy(header: str, data: bytes) -> bytes:
    raw = header.encode("latin1")
    raw += b" " * (-(10 + len(raw) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw)) + raw + data


def _edit(blob: bytes, old: bytes, new: bytes, count: int = 1) -> bytes:
    assert blob.count(old) >= count
    return blob.replace(old, new, count)


_HEADER = "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }"
_THREE = np.arange(3.0).tobytes()
_PLAIN = _npz(xx=np.arange(3.0), yy=np.arange(4.0))


@pytest.mark.parametrize("blob", [
    pytest.param(_edit(_PLAIN, b"xx.npy", b"zz.npy"), id="local-name-differs-from-directory"),
    pytest.param(_zip({"x.npy": _npy(_HEADER.replace("(3,)", "(3)"), _THREE)}), id="shape-not-a-tuple"),
    pytest.param(_zip({"x.npy": _npy(_HEADER.replace("(3,)", "(03,)"), _THREE)}), id="shape-leading-zero"),
    pytest.param(_zip({"x.npy": _npy(_HEADER + "\xa0", _THREE)}), id="non-ascii-padding"),
    pytest.param(_zip({"x.npy": _npy(_HEADER + " " * 20000, _THREE)}), id="header-over-numpy-limit"),
    pytest.param(_npy("{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }", bytes(8)), id="a-single-npy-file"),
])
def test_malformed_files_get_numpy_s_answer(blob):
    expected = _numpy_says(blob)
    if isinstance(expected, Exception):
        with pytest.raises(Exception) as info:
            load_npz(blob)
        # numpy.load gave an array, not an archive (`with array:` fails as TypeError, before 3.11 AttributeError)
        if isinstance(expected, (TypeError, AttributeError)):
            assert isinstance(info.value, ValueError) and "not an npz archive" in str(info.value)
        else:
            assert type(info.value) is type(expected) and str(info.value) == str(expected)
    else:
        got = load_npz(blob)
        assert sorted(got) == sorted(expected)


def test_an_end_record_that_undercounts_is_not_trusted():
    end = _PLAIN.rindex(b"PK\x05\x06")
    wrong = bytearray(_PLAIN)
    struct.pack_into("<HH", wrong, end + 8, 1, 1)  # says one entry; the directory holds two
    assert sorted(load_npz(bytes(wrong))) == sorted(_numpy_says(bytes(wrong))) == ["xx", "yy"]


def test_archives_with_zip64_entry_counts_keep_every_array():
    member = io.BytesIO()
    np.save(member, np.arange(2, dtype=np.int8))
    blob = _zip({f"a{i}.npy": member.getvalue() for i in range(0x10000 + 5)})  # past the 16-bit count
    assert len(load_npz(blob)) == 0x10000 + 5


@pytest.mark.parametrize("blob", [b"PAR1 a parquet file", b"\x89HDF\r\n\x1a\n", b"", b"junk" + _PLAIN])
def test_a_file_that_is_no_zip_archive_is_named_so(blob):
    """numpy would take it for a pickle and advise allowing those."""
    with pytest.raises(ValueError, match="not an npz \\(zip\\) archive: it (starts with|is empty)") as info:
        load_npz(blob)
    assert "pickle" not in str(info.value)


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_members_numpy_never_writes_are_refused_before_anything_is_allocated(method):
    """Only the size the file records bounds what bzip2 or LZMA inflate to: numpy would allocate it."""
    huge = _npy("{'descr': '<f8', 'fortran_order': False, 'shape': (10000000000,), }", b"")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        zf.writestr("x.npy", huge)
    with pytest.raises(ValueError, match=f"member 'x.npy' is compressed with zip method {method}, not stored or deflated"):
        load_npz(buf.getvalue())
