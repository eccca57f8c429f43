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
import zlib
from typing import Any

import numpy as np

_END = struct.Struct("<4s4H2LH")  # end of central directory record
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory file header
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header
_STORED, _DEFLATED = 0, 8
_ZIP64 = 0xFFFFFFFF
_MAGIC = b"\x93NUMPY"
_HEADER = re.compile(
    r"\{'descr': '([<>|=]?[a-zA-Z]\d*)', 'fortran_order': (False|True), 'shape': \(((?:\d+, ?)*\d*)\), \}\s*\Z"
)


class _Unusual(Exception):
    """The file uses a feature the fast path leaves to numpy."""


def _array(member: bytes | memoryview) -> np.ndarray:
    if bytes(member[:6]) != _MAGIC or len(member) < 10:
        raise _Unusual
    major = member[6]
    if major == 1:
        (header_len,), start = struct.unpack_from("<H", member, 8), 10
    elif major in (2, 3):
        (header_len,), start = struct.unpack_from("<I", member, 8), 12
    else:
        raise _Unusual
    header = bytes(member[start:start + header_len]).decode("latin1")
    m = _HEADER.match(header)
    if m is None:
        raise _Unusual
    dtype = np.dtype(m.group(1))
    if dtype.hasobject:
        raise _Unusual
    shape = tuple(int(x) for x in m.group(3).split(",") if x.strip())
    count = math.prod(shape)
    offset = start + header_len
    if offset + count * dtype.itemsize > len(member):
        raise _Unusual
    flat = np.frombuffer(member, dtype=dtype, count=count, offset=offset)
    if m.group(2) == "True":
        return flat.reshape(shape[::-1]).T
    return flat.reshape(shape)


def _members(blob: bytes) -> dict[str, np.ndarray]:
    if len(blob) < _END.size:
        raise _Unusual
    sig, _, _, _, entries, dir_size, dir_offset, comment = _END.unpack_from(blob, len(blob) - _END.size)
    if sig != b"PK\x05\x06" or comment or dir_offset == _ZIP64 or dir_offset + dir_size > len(blob):
        raise _Unusual
    view = memoryview(blob)
    out: dict[str, np.ndarray] = {}
    pos = dir_offset
    for _ in range(entries):
        if pos + _CENTRAL.size > len(blob):
            raise _Unusual
        (sig, _, _, flags, method, _, _, crc, packed_size, size, name_len, extra_len, comment_len, _, _, _,
         local) = _CENTRAL.unpack_from(blob, pos)
        if sig != b"PK\x01\x02" or flags & 1 or method not in (_STORED, _DEFLATED) or _ZIP64 in (packed_size, size, local):
            raise _Unusual
        name = bytes(view[pos + _CENTRAL.size:pos + _CENTRAL.size + name_len]).decode("utf-8")
        pos += _CENTRAL.size + name_len + extra_len + comment_len
        if not name.endswith(".npy") or local + _LOCAL.size > len(blob):
            raise _Unusual
        head = _LOCAL.unpack_from(blob, local)
        begin = local + _LOCAL.size + head[9] + head[10]
        member: bytes | memoryview = view[begin:begin + packed_size]
        if head[0] != b"PK\x03\x04" or len(member) != packed_size:
            raise _Unusual
        if method == _DEFLATED:
            try:
                member = zlib.decompress(member, -15)
            except zlib.error:
                raise _Unusual from None
        if len(member) != size or zlib.crc32(member) != crc:
            raise _Unusual
        out[name[:-4]] = _array(member)
    return out


def load_npz(blob: bytes) -> dict[str, Any]:
    """The arrays of the npz file ``blob`` by name (read-only views into ``blob`` where
    stored uncompressed). Raises what `numpy.load` raises for a file it cannot read."""
    try:
        return _members(blob)
    except (_Unusual, struct.error, ValueError, TypeError):  # odd or broken: numpy decides
        pass
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
