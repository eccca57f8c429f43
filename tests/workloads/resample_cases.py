"""Shared inputs and the float64 reference for the resampling tests (torch and Triton)."""
from __future__ import annotations

import numpy as np
import torch

from trajflow.preprocess.kernels import UniformGrid

# Relative error of the norm, ||out - ref|| / ||ref||, by output dtype: float32 is limited
# by the float32 weight; half precision by rounding the output (2**-9 for bfloat16).
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# float32 *times* carry their own rounding: at t ~ 40 s one ulp is 4e-6 s against sample
# steps of 0.01 s, so weights (and grid points computed in float32) move by up to ~1e-3.
TOL_F32_TIMES = 1e-4


def reference(data, times, lengths, targets) -> np.ndarray:
    """float64 linear interpolation with held ends, one row and one channel at a time."""
    data = data.double().numpy() if data.dim() == 3 else data.double().numpy()[:, :, None]
    times, targets = times.double().numpy(), targets.double().numpy()
    B, S, D = data.shape
    out = np.empty((B, targets.shape[1], D))
    for b in range(B):
        L = S if lengths is None else int(lengths[b])
        for d in range(D):
            out[b, :, d] = np.interp(targets[b], times[b, :L], data[b, :L, d])
    return out


def rel_err(out, ref: np.ndarray) -> float:
    out = out.double().numpy().reshape(ref.shape)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))


def grid_times(grid: UniformGrid, times) -> "torch.Tensor":
    """The grid's target times in float64 (what the kernels evaluate in the time dtype)."""
    B = times.shape[0]
    start = grid.start if isinstance(grid.start, torch.Tensor) else torch.full((B,), float(grid.start))
    start = start.to(times.dtype).double().reshape(-1).expand(B)
    return start[:, None] + torch.arange(grid.num, dtype=torch.float64)[None, :] / grid.rate_hz


def make_case(seed, B, S, T, D, dtype=torch.float32, *, ragged=True, time_dtype=torch.float32,
              origin=0.0, target="explicit", poison_padding=True):
    """Random trajectories: irregular strictly increasing times (float64 first, then cast),
    ragged lengths with garbage padding, and targets that reach beyond each row's span."""
    g = torch.Generator().manual_seed(seed)
    steps = 0.01 + torch.rand(B, S, generator=g, dtype=torch.float64) * 0.05
    t64 = origin + torch.rand(B, 1, generator=g, dtype=torch.float64) + torch.cumsum(steps, 1)
    times = t64.to(time_dtype)
    data = (torch.randn(B, S, D, generator=g) * 3 + 1).to(dtype)
    if ragged:
        lengths = torch.randint(2, S + 1, (B,), generator=g)
        lengths[0] = S
        lengths[-1] = 2
    else:
        lengths = None
    L = lengths if lengths is not None else torch.full((B,), S)
    if poison_padding and lengths is not None:
        pad = torch.arange(S)[None, :] >= L[:, None]
        times = times.masked_fill(pad, float("nan"))
        times[pad & (torch.arange(S)[None, :] % 2 == 0)] = -1e30  # not monotonic either
        data = data.masked_fill(pad[:, :, None], float("nan"))
    first = times[:, 0].double()
    last = times.double().gather(1, (L - 1)[:, None])[:, 0]
    span = last - first
    if target == "explicit":
        u = torch.rand(B, T, generator=g, dtype=torch.float64) * 1.4 - 0.2  # 20% outside each end
        tgt = (first[:, None] + u * span[:, None]).to(time_dtype)
        if T >= 2:
            tgt[:, 0] = (first - 1.0).to(time_dtype)  # surely before
            tgt[:, -1] = (last + 1.0).to(time_dtype)  # surely after
        ref_t = tgt.double()
    else:
        rate = max(1.0, (T - 1) / float(span.max()) * 0.8)
        tgt = UniformGrid(start=(first - 0.1 / rate).to(time_dtype), rate_hz=rate, num=T)
        ref_t = grid_times(tgt, times)
    return data, times, lengths, tgt, ref_t
