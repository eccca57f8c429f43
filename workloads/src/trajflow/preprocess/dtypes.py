"""Shard dtypes on the numpy side: numpy has no bfloat16, so bf16 travels as uint16 bits."""
from __future__ import annotations

import numpy as np

from trajflow.preprocess.shards import DTYPES


def to_storage_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` (any float array) in the numpy dtype a ``dtype`` shard stores; bf16 is rounded
    to nearest-even like torch, and returned as its uint16 bit patterns."""
    if dtype not in DTYPES:
        raise ValueError(f"unsupported shard dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    if dtype != "bfloat16":
        return np.asarray(x, dtype=DTYPES[dtype][1])
    if x.dtype == np.uint16:
        return x  # already bf16 bits
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded
