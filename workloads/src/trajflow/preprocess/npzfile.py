"""Decode an ``.npz`` file held in memory without copying its arrays.

`numpy.load` spends about 0.2 ms per small file in Python (zipfile's member handling,
``ast.literal_eval`` of every array header, a copy of each array), which is most of what
preprocessing costs per npz episode. The files ``numpy.savez``/``savez_compressed`` write
are plain: stored or deflated members, no zip64, npy headers in numpy's own
``{'descr': ..., 'fortran_order': ..., 'shape': (...), }`` form. `load_npz` decodes that form
directly, verifying every member's CRC-32 as zipfile does, and hands anything else to
`numpy.load`, so that unusual files are read as numpy reads them and broken ones fail
with numpy's own error.
"""
from __future__ import annotations

import io
import math
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

_END = struct.Struct("<4s4H2LH")  # end of central directory record
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory file header
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header
_ZIP64_LOCATOR = b"PK\x06\x07"
_STORED, _DEFLATED = 0, 8
_PLAIN_FLAGS = 0x0808  # a data descriptor, UTF-8 names: anything else is left to zipfile
_MAGIC = b"\x93NUMPY"
_MAX_HEADER = 10000  # numpy.load's default max_header_size
# numpy's own header, exactly as numpy.lib.format writes it: the keys in order, the shape
# as Python's repr of a tuple of ints, padded with spaces and a newline
_DIM = r"(?:0|[1-9][0-9]*)"
_HEADER = re.compile(
    r"\{'descr': '([<>|=]?[a-zA-Z][0-9]*)', 'fortran_order': (False|True), "
    rf"'shape': \((|{_DIM},|{_DIM}(?:, {_DIM})+)\), \}} *\n\Z"
)


class _Unusual(Exception):
    """The file uses a feature the fast path leaves to numpy."""


def _array(member: bytes | memoryview) -> np.ndarray:
    if len(member) < 10 or bytes(member[:6]) != _MAGIC:
        raise _Unusual
    major = member[6]
    if major == 1:
        (header_len,), start = struct.unpack_from("<H", member, 8), 10
    elif major in (2, 3):
        (header_len,), start = struct.unpack_from("<I", member, 8), 12
    else:
        raise _Unusual
    if header_len > _MAX_HEADER:
        raise _Unusual
    m = _HEADER.match(bytes(member[start:start + header_len]).decode("latin1"))
    if m is None:
        raise _Unusual
    dtype = np.dtype(m.group(1))
    if dtype.hasobject:
        raise _Unusual
    shape = tuple(int(x) for x in m.group(3).split(",") if x)
    count = math.prod(shape)
    offset = start + header_len
    if offset + count * dtype.itemsize > len(member):
        raise _Unusual
    flat = np.frombuffer(member, dtype=dtype, count=count, offset=offset)
    if m.group(2) == "True":
        return flat.reshape(shape[::-1]).T
    return flat.reshape(shape)


def _members(blob: bytes, wanted: Callable[[str], bool]) -> dict[str, Any]:
    end = len(blob) - _END.size
    if end < 0:
        raise _Unusual
    sig, disk, dir_disk, entries_here, entries, dir_size, dir_offset, comment = _END.unpack_from(blob, end)
    if (sig != b"PK\x05\x06" or comment or disk or dir_disk or entries_here != entries
            or 0xFFFF == entries or 0xFFFFFFFF in (dir_size, dir_offset)  # zip64 markers
            or blob[max(end - 20, 0):max(end - 16, 0)] == _ZIP64_LOCATOR
            or dir_offset + dir_size != end):
        raise _Unusual
    view = memoryview(blob)
    out: dict[str, np.ndarray] = {}
    pos = dir_offset
    for _ in range(entries):
        if pos + _CENTRAL.size > end:
            raise _Unusual
        (sig, _, _, flags, method, _, _, crc, packed_size, size, name_len, extra_len, comment_len, _, _, _,
         local) = _CENTRAL.unpack_from(blob, pos)
        if sig != b"PK\x01\x02" or flags & ~_PLAIN_FLAGS or method not in (_STORED, _DEFLATED):
            raise _Unusual
        raw_name = bytes(view[pos + _CENTRAL.size:pos + _CENTRAL.size + name_len])
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")  # as zipfile decodes names
        pos += _CENTRAL.size + name_len + extra_len + comment_len
        if not name.endswith(".npy") or local + _LOCAL.size > dir_offset:
            raise _Unusual
        head = _LOCAL.unpack_from(blob, local)
        begin = local + _LOCAL.size + head[9] + head[10]
        member: bytes | memoryview = view[begin:begin + packed_size]
        if (head[0] != b"PK\x03\x04" or bytes(view[local + _LOCAL.size:local + _LOCAL.size + head[9]]) != raw_name
                or begin + packed_size > dir_offset):
            raise _Unusual
        if not wanted(name[:-4]):
            out[name[:-4]] = UnreadMember(name[:-4])
            continue
        if method == _DEFLATED:
            # no more than the size the directory records: a deflate bomb stops there (numpy decides)
            inflate = zlib.decompressobj(-15)
            try:
                member = inflate.decompress(member, size + 1)
            except zlib.error:
                raise _Unusual from None
            if not inflate.eof:
                raise _Unusual
        if len(member) != size or zlib.crc32(member) != crc:
            raise _Unusual
        out[name[:-4]] = _array(member)
    if pos != end:  # the directory holds more (or less) than the entries counted
        raise _Unusual
    return out


def load_npz(blob: bytes, wanted: Callable[[str], bool] = lambda name: True) -> dict[str, Any]:
    """The arrays of the npz file ``blob`` by name (read-only views into ``blob`` where
    stored uncompressed); members not `wanted` are named but never decoded (an UnreadMember:
    camera frames no stream needs would inflate to gigabytes). Raises what `numpy.load`
    raises for a file it cannot read."""
    try:
        return _members(blob, wanted)
    except (_Unusual, struct.error, ValueError, TypeError):  # odd or broken: numpy decides
        pass
    if not blob.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):
        # numpy would take it for a pickle, and advise allowing those
        what = f"it starts with {bytes(blob[:8])!r}" if blob else "it is empty"
        raise ValueError(f"not an npz (zip) archive: {what}")
    loaded = np.load(io.BytesIO(blob), allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"not an npz archive but a single {type(loaded).__name__} (an .npy file?)")
    out: dict[str, Any] = {}
    with loaded as z:
        names = {(n[:-4] if n.endswith(".npy") else n): n for n in z.zip.namelist()}  # as NpzFile maps them
        for k in z.files:
            if not wanted(k):
                out[k] = UnreadMember(k)
                continue
            _check_declared_size(z.zip, names[k], len(blob))
            try:
                out[k] = z[k]
            except ValueError as exc:
                if "Object arrays cannot be loaded" not in str(exc):
                    raise
                out[k] = PickledMember(k)  # never unpickled: that would run the file's code
    return out


# deflate turns one byte into at most 1032: no member holds more than this times its compressed size
_MAX_INFLATE = 1032


def _check_declared_size(zf: zipfile.ZipFile, name: str, archive_size: int) -> None:
    """Raise ValueError when member ``name``'s npy header declares more array bytes than
    the member can hold: numpy allocates the declared size before it reads (a header
    declaring terabytes over a few bytes would be a MemoryError, a few GB an OOM kill)."""
    info = zf.getinfo(name)
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        # numpy never writes them, and nothing bounds what they inflate to but the size the
        # file itself records (numpy would allocate it)
        raise ValueError(f"member {name!r} is compressed with zip method {info.compress_type}, not stored or "
                         "deflated as numpy.savez writes it")
    with zf.open(info) as fp:
        try:
            version = np.lib.format.read_magic(fp)
            # version 3 differs from 2 only in encoding field names as UTF-8, which latin-1 reads as other names
            # of the same byte length: the shape and item size are what count here
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(fp)
        except Exception:  # noqa: BLE001  not an npy member, or a header numpy itself refuses when reading it
            return
        if dtype.hasobject:  # never loaded: see PickledMember
            return
        declared = math.prod(shape) * dtype.itemsize
        # the uncompressed size the zip records, and what the compressed bytes can inflate to
        packed = min(info.compress_size, archive_size)
        room = info.file_size
        if info.compress_type == zipfile.ZIP_STORED:
            room = min(room, packed)
        else:
            room = min(room, packed * _MAX_INFLATE)
        room -= fp.tell()  # the header is not array data
    if declared > room:
        raise ValueError(f"member {name!r} declares a {dtype} array of shape {shape} ({declared} bytes) but holds "
                         f"at most {max(room, 0)} bytes of data")


@dataclass(frozen=True)
class UnreadMember:
    """A member the caller did not want: named, never decoded."""

    name: str


@dataclass(frozen=True)
class PickledMember:
    """A member holding Python objects (a dict, a list of strings). Unpickling runs code
    from the file, so it is not loaded; the other members stay usable."""

    name: str
