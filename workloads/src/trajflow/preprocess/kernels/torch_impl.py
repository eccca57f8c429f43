"""The plain-PyTorch resampler: the reference for the Triton kernel and the CPU fast path.

Vectorised over the whole batch (no Python loop over rows), in three steps:

1. search: for each target, ``idx`` = the number of valid samples with ``t <= target``.
   Explicit targets use a batched ``torch.searchsorted`` over the row's times, with the
   padding replaced by +inf. A uniform grid is cheaper to invert: in grid units
   ``c_s = (t_s - start) * rate_hz`` sample ``s`` counts for every grid index
   ``j >= ceil(c_s)``, so a scatter-add of ones at ``ceil(c_s)`` and a cumulative sum give
   ``idx`` in O(S + T) per row instead of O(T log S). (The two can disagree only for a
   target within rounding of a sample time, where both neighbouring segments give the
   same value to rounding.)
2. ``hi = clamp(idx, 1, L - 1)``, ``lo = hi - 1`` and the weight
   ``w = clamp((q - c[lo]) / (c[hi] - c[lo]), 0, 1)``, computed in the time dtype and cast
   to float32; the clamp holds the end values outside the row's span.
3. one fused gather-and-blend: ``F.embedding_bag(mode="sum")`` over the flattened
   ``[B*S, D]`` samples with the index pairs ``(lo, hi)`` and per-sample weights
   ``(1 - w, w)`` reads each needed sample row once and writes the output once, in
   float32 (half-precision data is upcast first).

Padding beyond ``lengths`` never influences the result: it is masked before the search
and never gathered. The number of large temporaries is kept small and their sizes are
``[B, S]`` or ``[B, T]`` (never ``[B, T, D]``): on CPUs, fresh memory is expensive.

Not compiled: the same math through ``torch.compile`` (Inductor, dynamic sizes) took
about 0.7x the eager time on the benchmark's batch, still 3-4x the copy floor, while its
first call compiles for seconds, more than a CPU shard spends resampling (about 0.03 s of
0.34 s in ``benchmarks/results/preprocess.md``).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .common import Problem


def search(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs and blend weights for the whole batch.

    Returns ``idx`` (int32 ``[B * T, 2]``: rows ``b * S + lo`` and ``b * S + hi`` of the
    flattened ``[B * S, D]`` data) and ``wts`` (float32 ``[B * T, 2]``: ``1 - w`` and
    ``w``), so that ``out[b, j] = wts[.., 0] * x[idx[.., 0]] + wts[.., 1] * x[idx[.., 1]]``.
    """
    B, S, T = p.B, p.S, p.T
    dev, td = p.device, p.time_dtype
    times = p.times.to(td).contiguous()  # the pair gather views it flat (column-major input is not)
    valid = None
    if p.lengths is not None:
        # Clamped so that unchecked (check=False) lengths never index out of bounds; a
        # row with length < 2 is invalid input and its (unchecked) output is unspecified.
        L = p.lengths.to(torch.int32).clamp(2, S)
        valid = torch.arange(S, device=dev, dtype=torch.int32)[None, :] < L[:, None]

    if p.uniform:
        # grid units: target j sits exactly at query j
        coord = (times - p.start[:, None]).mul_(p.rate_hz)
        query = torch.arange(T, device=dev, dtype=td)
        # clamped before the cast, which cannot hold coordinates beyond int64; NaN (unchecked
        # input) converts to an out-of-range integer that the second clamp catches
        pos = torch.ceil(coord).clamp_(0, T).to(torch.int64).clamp_(0, T)
        if valid is not None:
            pos.masked_fill_(~valid, T)
        counts = torch.zeros((B, T + 1), dtype=torch.int32, device=dev)
        ones = torch.ones((1, 1), dtype=torch.int32, device=dev).expand(B, S)
        hi = counts.scatter_add_(1, pos, ones)[:, :T].cumsum(1, dtype=torch.int32)
    else:
        coord = times
        query = p.targets
        sorted_times = times if valid is None else times.masked_fill(~valid, float("inf"))
        hi = torch.searchsorted(sorted_times.contiguous(), query.contiguous(), right=True, out_int32=True)

    if valid is not None:
        hi = torch.minimum(hi.clamp_(min=1), (L - 1)[:, None])
    else:
        hi = hi.clamp_(1, S - 1)
    # r = b * S + lo, the flat row of the segment's first sample (lo = hi - 1 >= 0);
    # int32 indices are faster, int64 ones take batches of 2**31 samples or more
    small = B * S < 2**31 - 1
    itype = torch.int32 if small else torch.int64
    r = (hi.to(itype) + torch.arange(-1, B * S - 1, S, device=dev, dtype=itype)[:, None]).view(-1)

    # one gather of (c[s], c[s + 1]) pairs, packed as complex numbers
    pairs = torch.view_as_real(torch.complex(coord, coord.roll(-1, 1)).view(-1).index_select(0, r)).view(B, T, 2)
    c_lo = pairs[..., 0]
    # den > 0 for checked input; 0/0 and x/0 (unchecked duplicates) become a finite weight
    w = (query - c_lo).div_(pairs[..., 1] - c_lo).nan_to_num_(nan=0.0).clamp_(0.0, 1.0)
    w = w.to(torch.float32).reshape(-1)  # a copy only when the targets were not row-major
    wts = torch.view_as_real(torch.complex(1.0 - w, w))

    if small and sys.byteorder == "little":
        # the int32 pair (r, r + 1) is the int64 r + (r + 1) * 2**32
        idx = r.to(torch.int64).mul_((1 << 32) + 1).add_(1 << 32).view(torch.int32).view(-1, 2)
    else:  # pragma: no cover
        idx = torch.stack([r, r + 1], dim=1)
    return idx, wts


def blend(x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
    """Gather and blend the rows of ``x`` [B, S, D] named by ``search``; ``[B, T, D]``."""
    B, S, D = x.shape
    T = idx.shape[0] // B if B else 0
    if D == 0 or B == 0:
        return x.new_empty((B, T, 0))
    # strided inputs are made contiguous explicitly (embedding_bag's fast path needs it),
    # half precision is upcast so the blend runs in float32
    flat = x.reshape(B * S, D).contiguous().to(torch.float32)
    out = F.embedding_bag(idx, flat, mode="sum", per_sample_weights=wts)
    return out.view(B, T, D).to(x.dtype)


def resample(p: Problem) -> list[torch.Tensor]:
    """Resample every stream of ``p``; returns ``[B, T, D_k]`` tensors in each stream's dtype."""
    if p.empty():
        return p.new_outputs()
    idx, wts = search(p)
    return [blend(x, idx, wts) for x in p.streams]
