"""The Triton resampling kernel.

One program handles one row ``b`` and a segment of ``STEPS`` blocks of ``BLOCK_T``
targets, one block after another:

1. the block's target times are loaded (explicit targets) or generated from the uniform
   grid ``start[b] + j / rate_hz`` (no target array in memory);
2. the search finds, per target, the number of valid samples ``<=`` the target, in one of
   two ways that the autotuner chooses between:

   - binary search (any targets): a vectorised ``upper_bound`` over the row's
     ``lengths[b]`` valid samples, ``bit_length(S)`` steps, so any S works;
   - windowed counting (uniform grids, whose targets ascend): a block's targets lie at or
     after the previous block's, so their counts start from the previous block's last
     count; the samples after it are compared with the block's targets in coalesced
     chunks of ``BLOCK_S`` until a chunk ends beyond the block. One scalar binary search
     places the segment's first target. This replaces a chain of dependent loads per
     block (the binary search) by one chunk load, for any S and any rate ratio.

   Loads are masked to the valid range, so padding is never read;
3. the segment weight is computed in the time dtype (float64 when the times are float64:
   no precision is lost on absolute timestamps) and clamped to [0, 1], which holds the end
   values outside the row's span;
4. for every stream (the fused variant passes several in one launch, sharing steps 1-3),
   the ``lo``/``hi`` sample vectors are gathered as ``[BLOCK_T, BLOCK_D]`` tiles along the
   contiguous D axis (coalesced; unit strides are specialised by Triton) and lerped in
   float32 with the same formula as ``torch.lerp``, then stored in the stream's dtype.

The grid is 1-D (``B * cdiv(T, BLOCK_T * STEPS)`` programs) so B is not limited by the
65535 cap on CUDA's y/z grid dimensions (batches beyond 2**31 - 1 programs are split across
launches); memory offsets are 64-bit.

Interpreter mode: with CPU tensors (or ``interpret=True``) the same kernel source runs
under Triton's interpreter. ``TRITON_INTERPRET=1`` only takes effect if set before
``@triton.jit`` runs (at import), so the interpreted kernel is built on demand under
``triton.knobs.runtime.scope()`` instead: it works whenever and however the module was
imported. The kernel therefore calls no ``triton.language.standard`` helpers (``cdiv``,
``zeros``, ``sum``, ...): they are jit functions that this scoped mode would not convert;
reductions go through ``tl.reduce``, which the interpreter implements itself. Loops over a
runtime count are ``while`` loops: some interpreters (triton 3.6 with numpy >= 2.4) cannot
turn a runtime scalar into a ``range`` bound.
"""
from __future__ import annotations

import contextlib
import functools
import os
import struct
from typing import Any, Iterator

import torch

# The kernel takes tuples of tensors (one per stream) as arguments and indexes tuples of
# constexprs (a block size per stream): triton >= 3.4 (3.2 and 3.3 fail to compile it).
MIN_TRITON = (3, 4)

try:  # triton is a Linux/x86-64 extra; the torch path works without it
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Exception | None = None
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < MIN_TRITON:
        _IMPORT_ERROR = ImportError(f"triton {triton.__version__} is too old (need >= {'.'.join(map(str, MIN_TRITON))})")
        triton = None  # type: ignore[assignment]
except ImportError as exc:  # pragma: no cover - depends on the platform
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _IMPORT_ERROR = exc

from .common import Problem, ResampleError

if triton is not None:
    # The combine functions behind tl.sum and tl.max, called through tl.reduce: the
    # interpreter runs these two natively, where calling tl.sum itself would fail.
    _sum = tl.standard._sum_combine
    _max = tl.standard._elementwise_max

MAX_BLOCK_D = 64
MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on the x dimension of a grid
# sample positions are int32 and searches add two of them, chunks step past the end
MAX_ROW_SAMPLES = 2**30 - 1024
# rows reaching this many elements get 64-bit offsets; shorter ones 32-bit (fewer registers)
WIDE_REACH = 2**30


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
    ELEM_KEY: tl.constexpr,  # (Triton's own key leaves out the dtypes inside tuples)
    WIDE: tl.constexpr,  # offsets within a row need 64 bits
    NUM_STREAMS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    UNIFORM: tl.constexpr,
    TIME_F64: tl.constexpr,
    BLOCK_DS: tl.constexpr,  # tuple: BLOCK_D per stream
    BLOCK_T: tl.constexpr,  # targets per block
    STEPS: tl.constexpr,  # blocks of targets per program, one after another
    WINDOW: tl.constexpr,  # search: windowed counting (uniform grids) or binary search
    BLOCK_S: tl.constexpr,  # samples per chunk of the windowed count
):
    pid = tl.program_id(0)
    # no triton.language.standard helpers (cdiv, zeros, ...): see the module docstring
    n_segs = (T + BLOCK_T * STEPS - 1) // (BLOCK_T * STEPS)
    row = pid // n_segs
    seg = pid - row * n_segs
    row64 = row.to(tl.int64)
    # offsets within a row: 32-bit unless a row spans 2**30 elements (fewer registers)
    if WIDE:
        IDX = tl.int64
    else:
        IDX = tl.int32

    if HAS_LENGTHS:
        n_valid = tl.load(lengths_ptr + row64 * stride_lb).to(tl.int32)
        n_valid = tl.minimum(tl.maximum(n_valid, 1), S)  # unchecked input stays in bounds
    else:
        n_valid = S

    t_row = times_ptr + row64 * stride_tb
    # Times are compared relative to t0, a uniform grid's start: its targets j * period are
    # then exact to the time dtype however far the grid lies from 0 (epoch seconds in
    # float64, 1e4 s in float32), as the torch path's grid units are
    if UNIFORM:
        t0 = tl.load(start_ptr + row64 * stride_sb)
        if TIME_F64:
            t0 = t0.to(tl.float64)
            period = tl.cast(period_hi, tl.float64) + tl.cast(period_lo, tl.float64)
        else:
            t0 = t0.to(tl.float32)
            period = period_hi
    else:
        t0 = 0.0  # explicit targets are compared as given

    if WINDOW:
        # Uniform targets ascend, so the samples <= a block's targets are those <= the
        # previous block's last target plus a short run after them. `base` carries that
        # count from block to block (any base up to the true count gives exact counts,
        # only more chunks); one scalar search places the segment's first target.
        first = seg * (BLOCK_T * STEPS)
        if TIME_F64:
            tq_first = first.to(tl.float64) * period
        else:
            tq_first = first.to(tl.float32) * period
        base = first * 0
        top = base + n_valid
        it = 0
        while it < n_iter:  # not `for range(n_iter)`: see the interpreter note above
            it += 1
            live = base < top
            mid = (base + top) >> 1
            tm = tl.load(t_row + mid.to(IDX) * stride_ts, mask=live, other=0.0)
            if TIME_F64:
                tm = tm.to(tl.float64) - t0
            else:
                tm = tm.to(tl.float32) - t0
            # lower_bound (samples < tq_first): a count that is never too high, even if
            # this scalar rounds differently from the block's first target
            right = live & (tm < tq_first)
            top = tl.where(live & (tm >= tq_first), mid, top)
            base = tl.where(right, mid + 1, base)

    for step in range(STEPS):
        offs_t = seg * (BLOCK_T * STEPS) + step * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        if UNIFORM:
            if TIME_F64:
                tq = offs_t.to(tl.float64) * period
            else:
                tq = offs_t.to(tl.float32) * period
        else:
            tq = tl.load(tgt_ptr + row64 * stride_gb + offs_t.to(IDX) * stride_gt, mask=mask_t, other=0.0)
            if TIME_F64:
                tq = tq.to(tl.float64)
            else:
                tq = tq.to(tl.float32)

        if WINDOW:
            # count the samples <= each target over coalesced chunks of times from `base`
            tq_last = tl.reduce(tl.where(mask_t, tq, -float("inf")), 0, _max)
            lo = offs_t * 0 + base
            s0 = base
            more = s0 < n_valid
            while more:
                offs_s = s0 + tl.arange(0, BLOCK_S)
                mask_s = offs_s < n_valid
                ts = tl.load(t_row + offs_s.to(IDX) * stride_ts, mask=mask_s, other=0.0)
                if TIME_F64:
                    ts = ts.to(tl.float64) - t0
                else:
                    ts = ts.to(tl.float32) - t0
                le = (ts[None, :] <= tq[:, None]) & mask_s[None, :]
                lo += tl.reduce(le.to(tl.int32), 1, _sum)
                # a later chunk can still hold samples <= the block's last target only if
                # this one is full and its last sample is
                s0 += BLOCK_S
                chunk_last = tl.load(t_row + (tl.minimum(s0, n_valid) - 1).to(IDX) * stride_ts)
                if TIME_F64:
                    chunk_last = chunk_last.to(tl.float64) - t0
                else:
                    chunk_last = chunk_last.to(tl.float32) - t0
                more = (s0 < n_valid) & (chunk_last <= tq_last)
            base = tl.reduce(tl.where(mask_t, lo, 0), 0, _max)
        else:
            # upper_bound over [0, n_valid): lo ends as the number of valid samples <= tq
            lo = offs_t * 0
            hi = lo + n_valid
            it = 0
            while it < n_iter:
                it += 1
                active = lo < hi
                mid = (lo + hi) >> 1
                tm = tl.load(t_row + mid.to(IDX) * stride_ts, mask=active & mask_t, other=0.0)
                if TIME_F64:
                    tm = tm.to(tl.float64) - t0
                else:
                    tm = tm.to(tl.float32) - t0
                go_right = tm <= tq
                lo = tl.where(active & go_right, mid + 1, lo)
                hi = tl.where(active & (tm > tq), mid, hi)

        i_hi = tl.minimum(tl.maximum(lo, 1), n_valid - 1)
        i_lo = tl.maximum(i_hi - 1, 0)
        t_lo = tl.load(t_row + i_lo.to(IDX) * stride_ts, mask=mask_t, other=0.0)
        t_hi = tl.load(t_row + i_hi.to(IDX) * stride_ts, mask=mask_t, other=1.0)
        if TIME_F64:
            t_lo = t_lo.to(tl.float64) - t0
            t_hi = t_hi.to(tl.float64) - t0
        else:
            t_lo = t_lo.to(tl.float32) - t0
            t_hi = t_hi.to(tl.float32) - t0
        den = t_hi - t_lo
        safe_den = tl.where(den > 0, den, 1.0)
        w = tl.where(den > 0, (tq - t_lo) / safe_den, 0.0)
        w = tl.minimum(tl.maximum(w, 0.0), 1.0).to(tl.float32)
        w2 = w[:, None]
        i_lo_x = i_lo.to(IDX)
        i_hi_x = i_hi.to(IDX)
        offs_t_x = offs_t.to(IDX)

        for k in tl.static_range(NUM_STREAMS):
            D = Ds[k]
            ds = data_strides[k]
            os_ = out_strides[k]
            d_row = data_ptrs[k] + row64 * ds[0]
            o_row = out_ptrs[k] + row64 * os_[0]
            a_off = (i_lo_x * ds[1])[:, None]
            b_off = (i_hi_x * ds[1])[:, None]
            o_off = (offs_t_x * os_[1])[:, None]
            d0 = 0
            while d0 < D:
                offs_d = d0 + tl.arange(0, BLOCK_DS[k])
                m = mask_t[:, None] & (offs_d < D)[None, :]
                offs_d_x = offs_d.to(IDX)
                d_off = (offs_d_x * ds[2])[None, :]
                a = tl.load(d_row + a_off + d_off, mask=m, other=0.0).to(tl.float32)
                b = tl.load(d_row + b_off + d_off, mask=m, other=0.0).to(tl.float32)
                # the torch path's blend, exact at both ends; a + w * (b - a) would overflow
                # to inf (and NaN at the samples) for values of opposite signs beyond 1.7e38
                r = a * (1.0 - w2) + b * w2
                tl.store(o_row + o_off + (offs_d_x * os_[2])[None, :], r.to(out_ptrs[k].dtype.element_ty), mask=m)
                d0 += BLOCK_DS[k]


# Search strategies and block shapes the autotuner chooses among, as Config kwargs:
# per-target binary search, one block of targets per program ...
# (chosen from a sweep of twenty shapes on an H200, benchmarks/gpu/NOTES.md)
_BINARY = [(16, 1), (16, 2), (32, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8)]
# ... and, for uniform grids, windowed counting over STEPS blocks per program
# (BLOCK_T, STEPS, BLOCK_S, num_warps)
_WINDOW = [(16, 4, 32, 1), (16, 8, 32, 2), (32, 4, 64, 2), (32, 4, 64, 4), (32, 8, 64, 4), (64, 2, 128, 4),
           (64, 4, 64, 4), (32, 16, 64, 4)]


# the fewest targets one program handles, under any configuration
_SHORTEST_SEGMENT = min([bt for bt, _ in _BINARY] + [bt * st for bt, st, _, _ in _WINDOW])


def _configs() -> list[Any]:
    binary = [triton.Config({"BLOCK_T": bt, "STEPS": 1, "WINDOW": False, "BLOCK_S": 16}, num_warps=nw)
              for bt, nw in _BINARY]
    window = [triton.Config({"BLOCK_T": bt, "STEPS": st, "WINDOW": True, "BLOCK_S": bs}, num_warps=nw)
              for bt, st, bs, nw in _WINDOW]
    return binary + window


def segment(config: Any) -> int:
    """Targets per program under ``config`` (a Config's kwargs or a dict of them)."""
    meta = getattr(config, "kwargs", config)
    return meta["BLOCK_T"] * meta["STEPS"]


def _prune(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Drop what cannot apply or is far larger than the problem: windowed counting for
    explicit targets (they need not ascend), blocks or segments of targets beyond the
    (power-of-two rounded) T, tiles of more than 16K (gather) or 8K (count) elements."""
    args = {**named_args, **kwargs}  # the launch passes everything by keyword
    t_cap = max(16, args["T_KEY"])
    d_key = args["D_KEY"]
    keep = [
        c
        for c in configs
        if (args["UNIFORM"] or not c.kwargs["WINDOW"])
        and segment(c) <= t_cap
        and c.kwargs["BLOCK_T"] * d_key <= 16384
        and c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_S"] <= 8192
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


# the kernel arguments the autotuner chooses a configuration by
_TUNING_KEY = ("T_KEY", "D_KEY", "ELEM_KEY", "NUM_STREAMS", "HAS_LENGTHS", "UNIFORM", "TIME_F64")


@functools.lru_cache(maxsize=None)
def kernel(interpret: bool) -> Any:
    """The kernel, compiled for the GPU (autotuned) or for Triton's interpreter."""
    if triton is None:
        raise RuntimeError(unavailable_reason())
    if interpret:
        with jit_mode(True):
            return triton.jit(_resample_kernel)
    # Compiled otherwise, unless TRITON_INTERPRET=1 asks for Triton's usual behaviour.
    return triton.autotune(
        configs=_configs(),
        key=list(_TUNING_KEY),
        prune_configs_by={"early_config_prune": _prune},
    )(triton.jit(_resample_kernel))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # not triton.cdiv: calling a jit function from the host costs microseconds


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _to_f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _period_pair(rate_hz: float) -> tuple[float, float]:
    period = 1.0 / rate_hz
    hi = _to_f32(period)
    return hi, _to_f32(period - hi)


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
    x_strides = tuple(x.stride() for x in xs)
    o_strides = tuple(o.stride() for o in os_)
    Ds = tuple(x.shape[2] for x in xs)

    times = p.times
    stride_tb, stride_ts = times.stride()
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
    # the furthest element offset within one row of any input or output (half the int32
    # range leaves room for the blocks that step past a row's end, masked)
    reach = max((p.S - 1) * abs(stride_ts), (p.T - 1) * abs(stride_gt),
                *((p.S - 1) * abs(xs_[1]) + (d - 1) * abs(xs_[2]) for xs_, d in zip(x_strides, Ds)),
                *((p.T - 1) * abs(os_s[1]) + (d - 1) * abs(os_s[2]) for os_s, d in zip(o_strides, Ds)))
    return dict(
        data_ptrs=tuple(xs),
        out_ptrs=tuple(os_),
        Ds=Ds,
        data_strides=x_strides,
        out_strides=o_strides,
        times_ptr=times,
        lengths_ptr=lengths,
        tgt_ptr=tgt,
        start_ptr=st,
        S=p.S,
        T=p.T,
        n_iter=int(p.S).bit_length(),
        stride_tb=stride_tb,
        stride_ts=stride_ts,
        stride_lb=stride_lb,
        stride_gb=stride_gb,
        stride_gt=stride_gt,
        stride_sb=stride_sb,
        period_hi=period_hi,
        period_lo=period_lo,
        T_KEY=min(4096, max(16, _next_pow2(p.T))),
        D_KEY=max(block_ds),
        ELEM_KEY=max(x.element_size() for x in xs),
        WIDE=reach >= WIDE_REACH,
        NUM_STREAMS=len(xs),
        HAS_LENGTHS=p.lengths is not None,
        UNIFORM=p.uniform,
        TIME_F64=p.time_dtype == torch.float64,
        BLOCK_DS=block_ds,
    )


def _check_config(config: dict[str, Any], p: Problem) -> None:
    missing = [k for k in ("BLOCK_T", "STEPS", "WINDOW", "BLOCK_S", "num_warps") if k not in config]
    if missing:
        raise ValueError(f"kernel config {config} lacks {', '.join(missing)}")
    if config["WINDOW"] and not p.uniform:
        raise ValueError("windowed counting (WINDOW=True) needs a UniformGrid: explicit targets need not ascend")


def default_config(p: Problem) -> dict[str, Any]:
    """The interpreter's fixed configuration: windowed counting for uniform grids, binary
    search otherwise, in blocks of 32 targets."""
    if p.uniform:
        return {"BLOCK_T": 32, "STEPS": 2, "WINDOW": True, "BLOCK_S": 16, "num_warps": 4}
    return {"BLOCK_T": 32, "STEPS": 1, "WINDOW": False, "BLOCK_S": 16, "num_warps": 4}


def resample(p: Problem, interpret: bool | None = None, config: dict[str, Any] | None = None) -> list[torch.Tensor]:
    """Launch the kernel once for all streams of ``p``; returns ``[B, T, D_k]`` outputs.

    ``interpret=None`` uses Triton's interpreter for CPU tensors and the compiled kernel
    for CUDA tensors. ``config`` fixes the search and block shape (BLOCK_T, STEPS, WINDOW,
    BLOCK_S, num_warps); without it the GPU autotunes and the interpreter uses
    `default_config`.
    """
    if triton is None:
        raise RuntimeError(unavailable_reason())
    if interpret is None:
        interpret = p.device.type != "cuda"
    if p.S > MAX_ROW_SAMPLES:
        raise ResampleError(f"the Triton kernel takes rows of at most {MAX_ROW_SAMPLES} samples (its positions are "
                            f"32-bit), got S={p.S}; use backend='torch'")
    outs = p.new_outputs()
    if p.empty():
        return outs
    fn = kernel(interpret)
    if config is None and interpret:
        config = default_config(p)
    if config is not None:
        _check_config(config, p)
    # The 1-D grid holds at most 2**31 - 1 programs: split taller batches into launches
    # (never at realistic sizes; there is no silent cap either way).
    shortest = segment(config) if config else _SHORTEST_SEGMENT
    rows = max(1, MAX_PROGRAMS // _cdiv(p.T, shortest))
    for r0 in range(0, p.B, rows):
        sub = p if rows >= p.B else p.rows(r0, r0 + rows)
        args = kernel_args(sub, outs if sub is p else [o[r0:r0 + rows] for o in outs])
        if args is None:
            continue
        if config is None:
            _launch_tuned(fn, sub, args)
            continue
        meta = {k: v for k, v in config.items() if k != "num_warps"}
        grid = (sub.B * _cdiv(sub.T, segment(meta)),)
        if interpret:
            fn[grid](**meta, **args)
        else:
            fn.fn[grid](num_warps=config["num_warps"], enable_fp_fusion=True, **meta, **args)
    return outs


# autotuning key (and the device) -> the configuration chosen
_tuned: dict[tuple[Any, ...], Any] = {}


def _launch_tuned(fn: Any, p: Problem, args: dict[str, Any]) -> None:
    """Launch through the autotuner the first time a key is seen, then straight through
    the jitted kernel with the configuration it chose: that skips the autotuner's own
    per-call work, which costs about as much again as the launch itself."""
    key = (*(args[k] for k in _TUNING_KEY), p.device)
    config = _tuned.get(key)
    if config is None:
        # FMA contraction of the lerp is wanted; saying so also silences triton's warning
        fn[lambda meta: (p.B * _cdiv(p.T, segment(meta)),)](enable_fp_fusion=True, **args)
        _tuned[key] = fn.best_config
        return
    fn.fn[(p.B * _cdiv(p.T, segment(config)),)](enable_fp_fusion=True, **config.all_kwargs(), **args)
