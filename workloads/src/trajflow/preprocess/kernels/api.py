"""The public resampling entry points and the backend dispatcher."""
from __future__ import annotations

import math
from typing import Literal, Mapping, Sequence, overload

import torch

from . import torch_impl, triton_impl
from .common import Problem, ResampleError, Target, UniformGrid, prepare
from .validate import check_values

Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend that ``backend`` means for tensors on ``device``: "auto" is Triton on
    CUDA (when triton is importable) and the torch path everywhere else. "triton" with
    CPU tensors runs Triton's interpreter: correct but slow, meant for tests."""
    if backend not in BACKENDS:
        raise ResampleError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_impl.available() else "torch"
    if backend == "triton" and not triton_impl.available():
        raise RuntimeError(f"backend='triton' is not available: {triton_impl.unavailable_reason()}")
    return backend


def _run(p: Problem, backend: str, check: bool) -> list[torch.Tensor]:
    which = resolve_backend(backend, p.device)
    if which == "triton" and backend == "auto" and p.S > triton_impl.MAX_ROW_SAMPLES:
        which = "torch"  # rows too long for the kernel's 32-bit sample positions
    if check:
        check_values(p)
    if which == "triton":
        outs = triton_impl.resample(p)
    else:
        outs = torch_impl.resample(p)
    return p.finish(outs)


def resample(
    data: torch.Tensor,
    times: torch.Tensor,
    target: Target,
    lengths: torch.Tensor | Sequence[int] | None = None,
    *,
    backend: Backend = "auto",
    check: bool = True,
) -> torch.Tensor:
    """Linearly interpolate ``data`` sampled at ``times`` onto ``target`` times.

    Args:
        data: ``[B, S, D]`` (or ``[B, S]``) float32, bfloat16 or float16. Any strides.
        times: ``[B, S]`` float32 or float64 sample times, strictly increasing within each
            row's valid prefix. Pass float64 for absolute timestamps (e.g. epoch seconds):
            the search and the segment weights are computed in the time dtype, so nothing
            is rounded to float32 before the weight itself.
        target: target times ``[B, T]`` (or ``[T]`` shared by every row), float32/float64,
            or a `UniformGrid` (``start[b] + j / rate_hz``), generated inside the kernel.
        lengths: ``[B]`` integers, the number of valid samples per row (>= 2). Samples at
            ``s >= lengths[b]`` are padding and never influence the result. ``None``: all S.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
        check: validate values (lengths in [2, S], finite and strictly increasing times,
            finite targets and data) and raise `ResampleError` naming the first bad row.
            Costs one host/device synchronisation. ``check=False`` trusts the input: the
            result is then unspecified for bad values, but memory is never read out of
            bounds.

    Returns:
        ``[B, T, D]`` (or ``[B, T]``) in ``data``'s dtype. Interpolation is in float32; a
        target before the first or after the last valid sample holds that sample's value.
        The time dtype is float64 when ``times``, ``target`` or a tensor
        ``UniformGrid.start`` is float64, else float32.
    """
    p = prepare([data], ["data"], times, target, lengths)
    return _run(p, backend, check)[0]


@overload
def resample_streams(
    streams: Mapping[str, torch.Tensor],
    times: torch.Tensor,
    target: Target,
    lengths: torch.Tensor | Sequence[int] | None = ...,
    *,
    backend: Backend = ...,
    check: bool = ...,
) -> dict[str, torch.Tensor]: ...


@overload
def resample_streams(
    streams: Sequence[torch.Tensor],
    times: torch.Tensor,
    target: Target,
    lengths: torch.Tensor | Sequence[int] | None = ...,
    *,
    backend: Backend = ...,
    check: bool = ...,
) -> list[torch.Tensor]: ...


def resample_streams(streams, times, target, lengths=None, *, backend="auto", check=True):
    """Resample several streams of the same trajectories (e.g. state and action, each
    ``[B, S, D_k]`` with its own D and dtype) onto one target grid in a single kernel
    launch: the search over ``times`` is done once and shared by every stream.

    Takes a dict (returns a dict with the same keys) or a list/tuple (returns a list).
    Other arguments as in `resample`.
    """
    if isinstance(streams, Mapping):
        names = list(streams)
        tensors = [streams[n] for n in names]
        labels = [f"stream {n!r}" for n in names]
    elif isinstance(streams, (list, tuple)):
        names = None
        tensors = list(streams)
        labels = [f"stream {i}" for i in range(len(tensors))]
    else:
        raise ResampleError(f"streams must be a dict or a list of tensors, got {type(streams).__name__}")
    p = prepare(tensors, labels, times, target, lengths)
    outs = _run(p, backend, check)
    return dict(zip(names, outs)) if names is not None else outs


# A grid point within this many steps past the last sample still counts (rounding slack).
_STEP_SLACK = 1e-6
# whole milliseconds are a whole step at 1 kHz: the slack for them must not add a frame
_MAX_SLACK = 0.49


def uniform_grid_steps(
    times: torch.Tensor, rate_hz: float, lengths: torch.Tensor | Sequence[int] | None = None,
    time_rounding: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Per-row number of uniform-grid points that cover each row's span, starting at its
    first sample: ``T_b = floor((t_last - t_first) * rate_hz) + 1`` (int64 ``[B]``),
    computed in float64 with a slack of 1e-6 steps, or of ``time_rounding`` seconds (per
    row or for all: how far the times may be off by the rounding of how they were stored)
    where that is more, but never half a step, so that a span of exactly k periods gives
    k + 1 points despite rounding. No synchronisation.
    """
    if not isinstance(times, torch.Tensor) or times.dim() != 2 or not times.dtype.is_floating_point:
        raise ResampleError("times must be a floating [B, S] tensor")
    if not math.isfinite(float(rate_hz)) or float(rate_hz) <= 0:
        raise ResampleError(f"rate_hz must be a finite number > 0, got {rate_hz!r}")
    B, S = times.shape
    if S == 0:
        return torch.zeros(B, dtype=torch.int64, device=times.device)
    t = times.to(torch.float64)
    if lengths is None:
        last = t[:, -1]
    else:
        lengths = torch.as_tensor(lengths, device=times.device).to(torch.int64).clamp(1, S)
        last = t.gather(1, (lengths - 1)[:, None])[:, 0]
    slack = torch.as_tensor(time_rounding, dtype=torch.float64, device=times.device) * float(rate_hz)
    steps = torch.floor((last - t[:, 0]) * float(rate_hz) + slack.clamp(min=_STEP_SLACK, max=_MAX_SLACK))
    return steps.clamp(min=0).to(torch.int64) + 1


def uniform_grid_for(
    times: torch.Tensor, rate_hz: float, lengths: torch.Tensor | Sequence[int] | None = None
) -> tuple[UniformGrid, torch.Tensor]:
    """A `UniformGrid` starting at each row's first sample, long enough for the longest
    row, and the per-row step counts (`uniform_grid_steps`): output ``[b, :steps[b]]`` is
    row b's resampled trajectory, the rest holds its last value. One synchronisation (the
    max)."""
    steps = uniform_grid_steps(times, rate_hz, lengths)
    num = int(steps.max()) if steps.numel() else 0
    return UniformGrid(start=times[:, 0], rate_hz=float(rate_hz), num=num), steps
