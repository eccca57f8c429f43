"""Grouping trajectories into padded batches, and staging them for the device.

A batch is padded to its longest input (S) and longest output (T), so mixing a 10-sample
episode with a 10 000-sample one wastes almost the whole batch. `plan_batches` sorts a
window of episodes by size and cuts a batch whenever the padded work would exceed
``(1 + max_padding) x`` the real work, so padding is bounded per batch, not just on average.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def plan_batches(in_lengths: Sequence[int], out_lengths: Sequence[int], batch_size: int, max_padding: float,
                 in_cost: float = 1.0, out_cost: float = 1.0) -> list[list[int]]:
    """Indices of the episodes grouped into batches.

    Work of a row is ``S * in_cost + T * out_cost`` (bytes per input sample and per output
    frame); a batch of ``n`` rows costs ``n * (max S * in_cost + max T * out_cost)``.
    Guarantees: every index appears once; each batch has at most ``batch_size`` rows and,
    unless it is a single row, padded work <= ``(1 + max_padding) x`` real work.
    Deterministic: ties are broken by index.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(in_lengths)
    if len(out_lengths) != n:
        raise ValueError("in_lengths and out_lengths differ in length")
    S = np.asarray(in_lengths, dtype=np.float64)
    T = np.asarray(out_lengths, dtype=np.float64)
    work = S * in_cost + T * out_cost
    order = np.lexsort((np.arange(n), T, S, work))
    batches: list[list[int]] = []
    current: list[int] = []
    s_max = t_max = real = 0.0
    limit = 1.0 + max_padding
    for i in order.tolist():
        ns, nt = max(s_max, S[i]), max(t_max, T[i])
        nreal = real + work[i]
        padded = (len(current) + 1) * (ns * in_cost + nt * out_cost)
        if current and (len(current) >= batch_size or padded > limit * nreal + 1e-9):
            batches.append(current)
            current, s_max, t_max, real = [], 0.0, 0.0, 0.0
            ns, nt, nreal = S[i], T[i], work[i]
        current.append(i)
        s_max, t_max, real = ns, nt, nreal
    if current:
        batches.append(current)
    return batches


@dataclass
class HostBatch:
    """A packed batch on the host: ``data [B, S_max, Dsum]``, ``times [B, S_max]``,
    ``lengths [B]`` (torch tensors, pinned when asked) and each row's output length."""

    data: object
    times: object
    lengths: object
    steps: list[int]
    input_bytes: int


def _copy_rows(dst: object, b: int, n: int, src: np.ndarray) -> None:
    if isinstance(dst, np.ndarray):
        with np.errstate(over="ignore"):  # beyond float16's range: inf, as torch's copy gives, without a warning
            dst[b, :n] = src
    else:
        import torch

        dst[b, :n].copy_(torch.from_numpy(src))  # type: ignore[index]


def pack(frames: Sequence[np.ndarray], times: Sequence[np.ndarray], steps: Sequence[int], data_dtype: object,
         time_dtype: object, pin: bool) -> HostBatch:
    """Copy episodes into one padded batch, converting dtypes during the copy. Padding
    beyond each row's length is left uninitialised: the kernels never read it."""
    import torch

    B = len(frames)
    s_max = max(f.shape[0] for f in frames)
    d = frames[0].shape[1]
    data = torch.empty((B, s_max, d), dtype=data_dtype, pin_memory=pin)
    t = torch.empty((B, s_max), dtype=time_dtype, pin_memory=pin)
    lengths = torch.tensor([f.shape[0] for f in frames], dtype=torch.int64)
    if pin:
        lengths = lengths.pin_memory()
    # numpy views where the dtype has one (not bfloat16): a numpy row copy costs a
    # fraction of torch's per-call overhead
    numpy_dtypes = (torch.float16, torch.float32, torch.float64)
    data_rows = data.numpy() if data.dtype in numpy_dtypes else data
    time_rows = t.numpy() if t.dtype in numpy_dtypes else t
    for b, (f, tt) in enumerate(zip(frames, times)):
        n = f.shape[0]
        _copy_rows(data_rows, b, n, f)
        _copy_rows(time_rows, b, n, tt)
    in_bytes = data.element_size() * data.numel() + t.element_size() * t.numel()
    return HostBatch(data, t, lengths, list(steps), in_bytes)
