"""Resampling kernels: the preprocessing hot path.

    out = resample(data, times, target, lengths=None, backend="auto", check=True)

- ``data [B, S, D]`` float32/bfloat16/float16, ``times [B, S]`` float32/float64 strictly
  increasing within each row's ``lengths[b]`` valid samples (padding is never read);
- ``target``: explicit times ``[B, T]`` or ``UniformGrid(start, rate_hz, num)``, the grid
  ``start[b] + j / rate_hz`` generated inside the kernel;
- linear interpolation in float32, output in the data dtype; targets outside a row's span
  hold the end values; any S, T, D.

Backends: a Triton kernel (``triton_impl``; auto-selected on CUDA) and a vectorised
PyTorch implementation (``torch_impl``; the reference and the CPU path).
``resample_streams`` resamples several streams of the same trajectories in one launch.
``check=True`` validates values with one device synchronisation and raises
`ResampleError` (a ValueError) naming the first bad row.
"""
from .api import (
    BACKENDS,
    resample,
    resample_streams,
    resolve_backend,
    uniform_grid_for,
    uniform_grid_steps,
)
from .common import ResampleError, UniformGrid
from .triton_impl import available as triton_available

__all__ = [
    "BACKENDS",
    "ResampleError",
    "UniformGrid",
    "resample",
    "resample_streams",
    "resolve_backend",
    "triton_available",
    "uniform_grid_for",
    "uniform_grid_steps",
]
