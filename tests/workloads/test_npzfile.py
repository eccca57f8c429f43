"""The in-memory npz decoder: numpy's results for every file numpy writes, numpy's errors
for broken ones."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from trajflow.preprocess import npzfile
from trajflow.preprocess.npzfile import load_npz


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


def test_object_arrays_are_refused_as_numpy_refuses_them():
    blob = _npz(x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npz(blob)


def test_a_corrupt_member_fails_its_checksum():
    blob = bytearray(_npz(x=np.arange(100, dtype=np.float64)))
    blob[200] ^= 0xFF  # inside the array's bytes
    with pytest.raises(zipfile.BadZipFile, match="CRC"):
        load_npz(bytes(blob))


@pytest.mark.parametrize("keep", [0, 10, 100, -30, -1])
def test_truncated_files_fail_as_numpy_fails(keep):
    blob = _npz(x=np.arange(100, dtype=np.float64), y=np.ones((4, 4)))
    with pytest.raises((zipfile.BadZipFile, EOFError, ValueError, OSError)):
        load_npz(blob[:keep])
