"""Argument types and host-side normalisation shared by every resampling backend.

Everything here looks only at shapes, dtypes and devices: nothing reads tensor values, so
nothing here synchronises a GPU. Value checks (ordering, NaN/Inf, lengths) live in
`validate.py` and run only with ``check=True``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Sequence, Union

import torch

DATA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TIME_DTYPES = (torch.float32, torch.float64)


class ResampleError(ValueError):
    """Bad input to the resampler: wrong shape/dtype/device, or (with ``check=True``)
    bad values, with the first offending row named in the message."""


# the slowest grid whose period (1 / rate) is a finite float32, as the Triton kernel takes it
MIN_RATE_HZ = 1e-38


@dataclass(frozen=True)
class UniformGrid:
    """A uniform target grid generated inside the kernel: no target array is read.

    ``target_t[b, j] = start[b] + j / rate_hz`` for ``j in range(num)``.

    - ``start``: a number (the same for every row) or a tensor ``[B]`` (or 0-d) of
      float32/float64 on the data's device.
    - ``rate_hz``: the grid rate, a finite number >= ``MIN_RATE_HZ`` (1e-38).
    - ``num``: the number of grid points T (>= 0).

    The grid is evaluated in the time dtype (see `resample`): float64 when the times or a
    tensor ``start`` are float64, otherwise float32.
    """

    start: Union[float, torch.Tensor]
    rate_hz: float
    num: int


Target = Union[torch.Tensor, UniformGrid]


@dataclass
class Problem:
    """A normalised resampling problem: every stream is ``[B, S, D_k]``."""

    streams: list[torch.Tensor]
    labels: list[str]  # how errors name each stream ("data", "stream 'action'")
    squeezed: list[bool]  # the stream was 2-D [B, S]; its output is [B, T]
    times: torch.Tensor  # [B, S], float32/float64
    lengths: torch.Tensor | None  # [B], integer, on device; None: all S valid
    targets: torch.Tensor | None  # [B, T] (maybe a stride-0 broadcast view), time dtype
    start: torch.Tensor | None  # [B] (maybe a stride-0 broadcast view), time dtype
    rate_hz: float | None
    B: int
    S: int
    T: int
    time_dtype: torch.dtype
    device: torch.device

    @property
    def uniform(self) -> bool:
        return self.targets is None

    def empty(self) -> bool:
        """Nothing to compute: the outputs have a zero-sized dimension."""
        return self.B == 0 or self.T == 0

    def new_outputs(self) -> list[torch.Tensor]:
        return [
            torch.empty((self.B, self.T, x.shape[2]), dtype=x.dtype, device=self.device)
            for x in self.streams
        ]

    def rows(self, r0: int, r1: int) -> "Problem":
        """The sub-problem of rows [r0, r1) (views, no copies)."""
        return dataclasses.replace(
            self,
            streams=[x[r0:r1] for x in self.streams],
            times=self.times[r0:r1],
            lengths=None if self.lengths is None else self.lengths[r0:r1],
            targets=None if self.targets is None else self.targets[r0:r1],
            start=None if self.start is None else self.start[r0:r1],
            B=max(0, min(r1, self.B) - r0),
        )

    def finish(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [o.squeeze(2) if sq else o for o, sq in zip(outs, self.squeezed)]


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def prepare(
    streams: Sequence[torch.Tensor],
    labels: Sequence[str],
    times: torch.Tensor,
    target: Target,
    lengths: torch.Tensor | Sequence[int] | None,
) -> Problem:
    """Check shapes, dtypes and devices (host-side only) and normalise the arguments."""
    if not isinstance(times, torch.Tensor):
        raise ResampleError(f"times must be a torch.Tensor [B, S], got {type(times).__name__}")
    if times.dim() != 2:
        raise ResampleError(f"times must be 2-D [B, S], got shape {tuple(times.shape)}")
    if times.dtype not in TIME_DTYPES:
        raise ResampleError(
            f"times must be float32 or float64, got {times.dtype} (half precision cannot hold "
            "timestamps; convert integer timestamps, e.g. nanoseconds, with "
            "(t - t[:, :1]).double() * 1e-9)"
        )
    B, S = times.shape
    device = times.device
    if not streams:
        raise ResampleError("no data streams given")

    norm: list[torch.Tensor] = []
    squeezed: list[bool] = []
    for x, label in zip(streams, labels):
        if not isinstance(x, torch.Tensor):
            raise ResampleError(f"{label} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3):
            raise ResampleError(f"{label} must be [B, S, D] (or [B, S]), got shape {tuple(x.shape)}")
        if tuple(x.shape[:2]) != (B, S):
            raise ResampleError(
                f"{label} has shape {tuple(x.shape)} but times has shape {(B, S)}: "
                "the first two dimensions (B, S) must match"
            )
        if x.dtype not in DATA_DTYPES:
            raise ResampleError(
                f"{label} has dtype {x.dtype}; supported: float32, bfloat16, float16 (the math is "
                "float32 and the output keeps the input dtype; cast float64 data with .float())"
            )
        if x.device != device:
            raise ResampleError(f"{label} is on {x.device} but times is on {device}")
        squeezed.append(x.dim() == 2)
        norm.append(x.unsqueeze(2) if x.dim() == 2 else x)

    if lengths is not None:
        if not isinstance(lengths, torch.Tensor):
            lengths = torch.as_tensor(lengths, device=device)
        if lengths.dim() != 1 or lengths.shape[0] != B:
            raise ResampleError(f"lengths must be 1-D [B={B}], got shape {tuple(lengths.shape)}")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise ResampleError(f"lengths must be an integer tensor, got {lengths.dtype}")
        if lengths.device != device:
            raise ResampleError(f"lengths is on {lengths.device} but times is on {device}")

    if B > 0 and S < 2:
        raise ResampleError(
            f"row 0: length {S} < 2: a row needs at least 2 samples to interpolate (times is {(B, S)})"
        )

    time_dtype = times.dtype
    targets = start = None
    rate_hz = None
    if isinstance(target, UniformGrid):
        num = target.num
        if not isinstance(num, numbers.Integral) or isinstance(num, bool) or num < 0:
            raise ResampleError(f"UniformGrid.num must be an integer >= 0, got {num!r}")
        T = int(num)
        rate = target.rate_hz
        if not _is_number(rate) or not math.isfinite(float(rate)) or float(rate) < MIN_RATE_HZ:
            raise ResampleError(f"UniformGrid.rate_hz must be a finite number >= {MIN_RATE_HZ:g} (a period float32 "
                                f"holds), got {rate!r}")
        rate_hz = float(rate)
        st = target.start
        if isinstance(st, torch.Tensor):
            if st.dtype not in TIME_DTYPES:
                raise ResampleError(f"UniformGrid.start must be float32 or float64, got {st.dtype}")
            if st.device != device:
                raise ResampleError(f"UniformGrid.start is on {st.device} but times is on {device}")
            if st.dim() == 0:
                st = st.reshape(1)
            if st.dim() != 1 or st.shape[0] not in (1, B):
                raise ResampleError(
                    f"UniformGrid.start must be a number, a 0-d tensor or [B={B}], got shape "
                    f"{tuple(st.shape)}"
                )
            if st.dtype == torch.float64:
                time_dtype = torch.float64
            start = st.to(time_dtype)
        elif _is_number(st):
            # torch.full is an async fill on a GPU (no host-to-device copy, no sync).
            start = torch.full((1,), float(st), dtype=time_dtype, device=device)
        else:
            raise ResampleError(f"UniformGrid.start must be a number or a tensor, got {type(st).__name__}")
        start = start.expand(B) if start.shape[0] == 1 else start
    elif isinstance(target, torch.Tensor):
        if target.dtype not in TIME_DTYPES:
            raise ResampleError(f"target times must be float32 or float64, got {target.dtype}")
        if target.device != device:
            raise ResampleError(f"target times are on {target.device} but times is on {device}")
        if target.dim() == 1:
            target = target.unsqueeze(0).expand(B, target.shape[0])
        if target.dim() != 2 or target.shape[0] != B:
            raise ResampleError(
                f"target times must be [B={B}, T] (or [T], shared by every row), got shape "
                f"{tuple(target.shape)}"
            )
        T = target.shape[1]
        if target.dtype == torch.float64:
            time_dtype = torch.float64
        targets = target.to(time_dtype)
    else:
        raise ResampleError(
            f"target must be a tensor of target times [B, T] or a UniformGrid, got {type(target).__name__}"
        )

    return Problem(
        streams=norm,
        labels=list(labels),
        squeezed=squeezed,
        times=times,
        lengths=lengths,
        targets=targets,
        start=start,
        rate_hz=rate_hz,
        B=B,
        S=S,
        T=T,
        time_dtype=time_dtype,
        device=device,
    )
