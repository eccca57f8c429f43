"""The Triton resampling kernel.

One program handles one row ``b`` and a block of ``BLOCK_T`` targets:

1. the block's target times are loaded (explicit targets) or generated from the uniform
   grid ``start[b] + j / rate_hz`` (no target array in memory);
2. a vectorised binary search (``upper_bound``) over the row's ``lengths[b]`` valid
   samples finds, per target, the number of samples ``<=`` the target. The loop runs
   ``bit_length(S)`` times for every row, so any S works; loads are masked to the valid
   range, so padding is never read;
3. the segment weight is computed in the time dtype (float64 when the times are float64:
   no precision is lost on absolute timestamps) and clamped to [0, 1], which holds the end
   values outside the row's span;
4. for every stream (the fused variant passes several in one launch, sharing steps 1-3),
   the ``lo``/``hi`` sample vectors are gathered as ``[BLOCK_T, BLOCK_D]`` tiles along the
   contiguous D axis (coalesced; unit strides are specialised by Triton) and lerped in
   float32 with the same formula as ``torch.lerp``, then stored in the stream's dtype.

The grid is 1-D (``B * cdiv(T, BLOCK_T)`` programs) so B is not limited by the 65535 cap
on CUDA's y/z grid dimensions (batches beyond 2**31 - 1 programs are split across
launches); memory offsets are 64-bit.

Interpreter mode: with CPU tensors (or ``interpret=True``) the same kernel source runs
under Triton's interpreter. ``TRITON_INTERPRET=1`` only takes effect if set before
``@triton.jit`` runs (at import), so the interpreted kernel is built on demand under
``triton.knobs.runtime.scope()`` instead: it works whenever and however the module was
imported. The kernel therefore calls no ``triton.language.standard`` helpers (``cdiv``,
``zeros``, ...): they are jit functions that this scoped mode would not convert.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterator

import torch

# The kernel takes tuples of tensors (one per stream) as arguments: triton >= 3.2.
MIN_TRITON = (3, 2)

try:  # triton is a Linux/x86-64 extra; the torch path works without it
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Exception | None = None
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < MIN_TRITON:
        _IMPORT_ERROR = ImportError(f"triton {triton.__version__} is too old (need >= 3.2)")
        triton = None  # type: ignore[assignment]
except ImportError as exc:  # pragma: no cover - depends on the platform
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _IMPORT_ERROR = exc

from .common import Problem

MAX_BLOCK_D = 64
MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on the x dimension of a grid


def available() -> bool:
    return triton is not None


def unavailable_reason() -> str:
    return f"triton is not importable: {_IMPORT_ERROR}" if _IMPORT_ERROR else ""


def _resample_kernel(
    data_ptrs,  # tuple of pointers, one per stream: [B, S, D_k]
    out_ptrs,  # tuple of pointers: [B, T, D_k]
    Ds,  # tuple of D_k
    data_strides,  # tuple of (stride_b, stride_s, stride_d)
    out_strides,  # tuple of (stride_b, stride_t, stride_d)
    times_ptr,  # [B, S]
    lengths_ptr,  # [B] (unused without HAS_LENGTHS)
    tgt_ptr,  # [B, T] explicit targets (unused when UNIFORM)
    start_ptr,  # [B] grid starts (unused unless UNIFORM)
    S,
    T,
    n_iter,  # bit_length(S): binary-search steps that cover any length <= S
    stride_tb,
    stride_ts,
    stride_lb,
    stride_gb,
    stride_gt,
    stride_sb,
    period_hi,  # 1 / rate_hz == period_hi + period_lo (two float32s carry a float64)
    period_lo,
    T_KEY,  # autotuning keys only
    D_KEY,
    NUM_STREAMS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    UNIFORM: tl.constexpr,
    TIME_F64: tl.constexpr,
    BLOCK_DS: tl.constexpr,  # tuple: BLOCK_D per stream
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    # no triton.language.standard helpers (cdiv, zeros, ...): see the module docstring
    n_tblocks = (T + BLOCK_T - 1) // BLOCK_T
    row = pid // n_tblocks
    tblk = pid - row * n_tblocks
    row64 = row.to(tl.int64)
    offs_t = tblk * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T

    if HAS_LENGTHS:
        n_valid = tl.load(lengths_ptr + row64 * stride_lb).to(tl.int32)
        n_valid = tl.minimum(tl.maximum(n_valid, 1), S)  # unchecked input stays in bounds
    else:
        n_valid = S

    t_row = times_ptr + row64 * stride_tb
    if UNIFORM:
        t0 = tl.load(start_ptr + row64 * stride_sb)
        if TIME_F64:
            period = tl.cast(period_hi, tl.float64) + tl.cast(period_lo, tl.float64)
            tq = t0.to(tl.float64) + offs_t.to(tl.float64) * period
        else:
            tq = t0.to(tl.float32) + offs_t.to(tl.float32) * period_hi
    else:
        tq = tl.load(tgt_ptr + row64 * stride_gb + offs_t.to(tl.int64) * stride_gt, mask=mask_t, other=0.0)
        if TIME_F64:
            tq = tq.to(tl.float64)
        else:
            tq = tq.to(tl.float32)

    # upper_bound over [0, n_valid): lo ends as the number of valid samples <= tq
    lo = offs_t * 0
    hi = lo + n_valid
    for _ in range(n_iter):
        active = lo < hi
        mid = (lo + hi) >> 1
        tm = tl.load(t_row + mid.to(tl.int64) * stride_ts, mask=active & mask_t, other=0.0)
        if TIME_F64:
            tm = tm.to(tl.float64)
        else:
            tm = tm.to(tl.float32)
        go_right = tm <= tq
        lo = tl.where(active & go_right, mid + 1, lo)
        hi = tl.where(active & (tm > tq), mid, hi)

    i_hi = tl.minimum(tl.maximum(lo, 1), n_valid - 1)
    i_lo = tl.maximum(i_hi - 1, 0)
    t_lo = tl.load(t_row + i_lo.to(tl.int64) * stride_ts, mask=mask_t, other=0.0)
    t_hi = tl.load(t_row + i_hi.to(tl.int64) * stride_ts, mask=mask_t, other=1.0)
    if TIME_F64:
        t_lo = t_lo.to(tl.float64)
        t_hi = t_hi.to(tl.float64)
    else:
        t_lo = t_lo.to(tl.float32)
        t_hi = t_hi.to(tl.float32)
    den = t_hi - t_lo
    safe_den = tl.where(den > 0, den, 1.0)
    w = tl.where(den > 0, (tq - t_lo) / safe_den, 0.0)
    w = tl.minimum(tl.maximum(w, 0.0), 1.0).to(tl.float32)
    w2 = w[:, None]
    i_lo64 = i_lo.to(tl.int64)
    i_hi64 = i_hi.to(tl.int64)
    offs_t64 = offs_t.to(tl.int64)

    for k in tl.static_range(NUM_STREAMS):
        D = Ds[k]
        ds = data_strides[k]
        os_ = out_strides[k]
        d_row = data_ptrs[k] + row64 * ds[0]
        o_row = out_ptrs[k] + row64 * os_[0]
        a_off = (i_lo64 * ds[1])[:, None]
        b_off = (i_hi64 * ds[1])[:, None]
        o_off = (offs_t64 * os_[1])[:, None]
        for d0 in range(0, D, BLOCK_DS[k]):
            offs_d = d0 + tl.arange(0, BLOCK_DS[k])
            m = mask_t[:, None] & (offs_d < D)[None, :]
            offs_d64 = offs_d.to(tl.int64)
            d_off = (offs_d64 * ds[2])[None, :]
            a = tl.load(d_row + a_off + d_off, mask=m, other=0.0).to(tl.float32)
            b = tl.load(d_row + b_off + d_off, mask=m, other=0.0).to(tl.float32)
            diff = b - a
            # torch.lerp's formula: exact at both ends
            r = tl.where(w2 < 0.5, a + w2 * diff, b - diff * (1.0 - w2))
            tl.store(o_row + o_off + (offs_d64 * os_[2])[None, :], r.to(out_ptrs[k].dtype.element_ty), mask=m)


_AUTOTUNE_BLOCKS = [(16, 1), (32, 1), (32, 2), (64, 2), (64, 4), (128, 4), (128, 8), (256, 4), (256, 8)]


def _prune(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Drop block shapes far larger than the problem: BLOCK_T beyond the (power-of-two
    rounded) T, or tiles of more than 16K elements."""
    args = {**named_args, **kwargs}  # the launch passes everything by keyword
    t_key = args["T_KEY"]
    d_key = args["D_KEY"]
    keep = [
        c
        for c in configs
        if c.kwargs["BLOCK_T"] <= max(16, t_key) and c.kwargs["BLOCK_T"] * d_key <= 16384
    ]
    return keep or configs[:1]


@contextlib.contextmanager
def jit_mode(interpret: bool) -> Iterator[None]:
    """Make ``triton.jit`` build an interpreted (or a compiled) function whatever
    ``TRITON_INTERPRET`` says, then restore the knobs and the environment."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.runtime, "scope"):
        with knobs.runtime.scope():
            knobs.runtime.interpret = interpret
            yield
        return
    old = os.environ.get("TRITON_INTERPRET")  # older triton read the variable at decoration
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


@functools.lru_cache(maxsize=None)
def kernel(interpret: bool) -> Any:
    """The kernel, compiled for the GPU (autotuned) or for Triton's interpreter."""
    if triton is None:
        raise RuntimeError(unavailable_reason())
    if interpret:
        with jit_mode(True):
            return triton.jit(_resample_kernel)
    # Compiled otherwise, unless TRITON_INTERPRET=1 asks for Triton's usual behaviour.
    configs = [triton.Config({"BLOCK_T": bt}, num_warps=nw) for bt, nw in _AUTOTUNE_BLOCKS]
    return triton.autotune(
        configs=configs,
        key=["T_KEY", "D_KEY", "NUM_STREAMS", "HAS_LENGTHS", "UNIFORM", "TIME_F64"],
        prune_configs_by={"early_config_prune": _prune},
    )(triton.jit(_resample_kernel))


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _period_pair(rate_hz: float) -> tuple[float, float]:
    period = 1.0 / rate_hz
    hi = float(torch.tensor(period, dtype=torch.float32))
    lo = float(torch.tensor(period - hi, dtype=torch.float32))
    return hi, lo


def kernel_args(p: Problem, outs: list[torch.Tensor]) -> dict[str, Any] | None:
    """The kernel's arguments (all but BLOCK_T) for problem ``p`` writing ``outs``; None
    when there is nothing to compute."""
    if p.empty():
        return None
    # D == 0 streams have nothing to write; the kernel takes the others
    live = [k for k, x in enumerate(p.streams) if x.shape[2] > 0]
    if not live:
        return None
    xs = [p.streams[k] for k in live]
    os_ = [outs[k] for k in live]
    block_ds = tuple(min(MAX_BLOCK_D, _next_pow2(x.shape[2])) for x in xs)

    times = p.times
    if p.uniform:
        tgt, st = times, p.start
        stride_gb = stride_gt = 0
        stride_sb = p.start.stride(0)
        period_hi, period_lo = _period_pair(p.rate_hz)
    else:
        tgt, st = p.targets, times
        stride_gb, stride_gt = p.targets.stride()
        stride_sb = 0
        period_hi = period_lo = 0.0
    # unused pointer arguments get a harmless valid tensor
    lengths = p.lengths if p.lengths is not None else times
    stride_lb = p.lengths.stride(0) if p.lengths is not None else 0
    return dict(
        data_ptrs=tuple(xs),
        out_ptrs=tuple(os_),
        Ds=tuple(int(x.shape[2]) for x in xs),
        data_strides=tuple(tuple(int(s) for s in x.stride()) for x in xs),
        out_strides=tuple(tuple(int(s) for s in o.stride()) for o in os_),
        times_ptr=times,
        lengths_ptr=lengths,
        tgt_ptr=tgt,
        start_ptr=st,
        S=p.S,
        T=p.T,
        n_iter=int(p.S).bit_length(),
        stride_tb=times.stride(0),
        stride_ts=times.stride(1),
        stride_lb=stride_lb,
        stride_gb=stride_gb,
        stride_gt=stride_gt,
        stride_sb=stride_sb,
        period_hi=period_hi,
        period_lo=period_lo,
        T_KEY=min(4096, max(16, _next_pow2(p.T))),
        D_KEY=max(block_ds),
        NUM_STREAMS=len(xs),
        HAS_LENGTHS=p.lengths is not None,
        UNIFORM=p.uniform,
        TIME_F64=p.time_dtype == torch.float64,
        BLOCK_DS=block_ds,
    )


def resample(p: Problem, interpret: bool | None = None, block_t: int | None = None) -> list[torch.Tensor]:
    """Launch the kernel once for all streams of ``p``; returns ``[B, T, D_k]`` outputs.

    ``interpret=None`` uses Triton's interpreter for CPU tensors and the compiled kernel
    for CUDA tensors; ``block_t`` fixes BLOCK_T (the interpreter's default is 32; on the
    GPU it is autotuned).
    """
    if triton is None:
        raise RuntimeError(unavailable_reason())
    if interpret is None:
        interpret = p.device.type != "cuda"
    outs = p.new_outputs()
    if p.empty():
        return outs
    fn = kernel(interpret)
    # The 1-D grid holds at most 2**31 - 1 programs: split taller batches into launches
    # (never at realistic sizes; there is no silent cap either way).
    smallest_block = block_t or (32 if interpret else min(bt for bt, _ in _AUTOTUNE_BLOCKS))
    rows = max(1, MAX_PROGRAMS // triton.cdiv(p.T, smallest_block))
    for r0 in range(0, p.B, rows):
        sub = p if rows >= p.B else p.rows(r0, r0 + rows)
        args = kernel_args(sub, [o[r0:r0 + rows] for o in outs])
        if args is None:
            continue
        if interpret or block_t is not None:
            bt = block_t or 32
            grid = (sub.B * triton.cdiv(sub.T, bt),)
            if interpret:
                fn[grid](BLOCK_T=bt, **args)
            else:
                fn.fn[grid](BLOCK_T=bt, num_warps=4, enable_fp_fusion=True, **args)
        else:
            # FMA contraction of the lerp is wanted; saying so also silences triton's warning
            fn[lambda meta, n=sub.B: (n * triton.cdiv(p.T, meta["BLOCK_T"]),)](enable_fp_fusion=True, **args)
    return outs
