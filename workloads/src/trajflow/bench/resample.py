"""Resampling hot path: our kernels against the usual baselines and the memory-copy floor.

CPU, one process, one run: B=4096 trajectories of S=120 irregular samples (~110 Hz, each
sample jittered by up to 30% of a period), D=14 float32 channels, onto a 100 Hz uniform grid of T=100 points:

- ours: ``resample(..., backend="torch")`` (the vectorised torch path), with the grid
  generated from ``UniformGrid`` and, separately, with explicit target times; unchecked
  (``check=False``) and checked;
- the usual baseline: a Python loop over trajectories calling ``np.interp`` per channel;
- ``torchinterp1d.interp1d``, with D folded into its batch (its layout copies are timed
  apart from its call, and the ratio uses its call alone: the comparison most favourable
  to it);
- the floor: one memory copy moving the same number of bytes (inputs read + output
  written), into a preallocated buffer (and, for reference, into a fresh one).

GPU, when torch sees one: the Triton kernel (autotuned; tuning happens in the warm-up),
the torch path on the GPU and a device-to-device copy of the same bytes, at a batch that
fills the chip (float32 and bfloat16), timed with CUDA events; and the latency of one call
at B=256, S=100 -> T=50, D=32 bfloat16, both on the device (events) and end to end on the
host (launch overhead included).

Every figure is timed over repeats in the same process; the median and the minimum are both
recorded. CPU ratios use the minimum (best of N): interference from other processes only ever
adds time, and shared CI machines have plenty of it (the load average and CPU pressure at the
end of the run are recorded next to the figures); ratios of medians are recorded too. GPU
ratios use medians of CUDA-event timings. Nothing is extrapolated: without a GPU the GPU
section says so.
"""
from __future__ import annotations

import math
import os
import resource
import statistics
import time
from typing import Any, Callable

import numpy as np

PUBLISHED_GPU_LATENCY_MS = 0.41  # a published GPU resampler's figure at B=256, S=100 -> T=50, D=32 bf16


def _timeit(fn: Callable[[], Any], *, min_repeats: int = 5, max_repeats: int = 50, budget_s: float = 2.0,
            warmup: int = 2) -> dict[str, float]:
    """Wall-clock seconds per call: warm-up, then repeats until the budget is spent."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / len(times)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": len(times),
            "page_faults_per_call": round(faults, 1)}


def _trajectories(torch: Any, B: int, S: int, D: int, *, seed: int = 0, device: str = "cpu",
                  dtype: Any = None) -> tuple[Any, Any]:
    g = torch.Generator(device=device).manual_seed(seed)  # generated where it is used
    f64 = dict(generator=g, dtype=torch.float64, device=device)
    # ~110 Hz: sample s at (s + u) / 110 with |u| <= 0.3, so every span exceeds 1 s
    jitter = 0.6 * torch.rand(B, S, **f64) - 0.3
    times = (torch.rand(B, 1, **f64) * 5 + (torch.arange(S, dtype=torch.float64, device=device) + jitter) / 110.0)
    data = torch.randn(B, S, D, generator=g, device=device)
    return data.to(dtype or torch.float32), times.float()


def _contention() -> dict[str, Any]:
    """What else the CPUs were doing: load averages and (Linux PSI) CPU pressure."""
    info: dict[str, Any] = {}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        with open("/proc/pressure/cpu") as fh:
            some = fh.readline().split()  # some avg10=.. avg60=.. avg300=.. total=..
        info["pressure_some_pct"] = {k: float(v) for k, v in (kv.split("=") for kv in some[1:4])}
    except (OSError, ValueError):
        pass
    return info


def _cpu(quick: bool) -> dict[str, Any]:
    import torch

    from trajflow.preprocess.kernels import UniformGrid, resample

    B, S, T, D, rate = (64 if quick else 4096), 120, 100, 14, 100.0
    budget = 0.1 if quick else 2.0
    data, times = _trajectories(torch, B, S, D)
    grid = UniformGrid(start=times[:, 0].contiguous(), rate_hz=rate, num=T)
    targets = (times[:, :1].double() + torch.arange(T, dtype=torch.float64) / rate).float()
    # the grid must lie inside every row's span, so all contenders compute the same thing
    assert bool((targets[:, -1] <= times[:, -1]).all())

    out = resample(data, times, grid, backend="torch", check=False)
    bytes_grid = data.nbytes + times.nbytes + out.nbytes
    bytes_explicit = bytes_grid + targets.nbytes

    figures: dict[str, Any] = {}
    figures["ours_grid"] = _timeit(lambda: resample(data, times, grid, backend="torch", check=False), budget_s=budget)
    figures["ours_grid_checked"] = _timeit(lambda: resample(data, times, grid, backend="torch", check=True),
                                           budget_s=budget)
    figures["ours_explicit"] = _timeit(lambda: resample(data, times, targets, backend="torch", check=False),
                                       budget_s=budget)

    t_np, x_np = times.double().numpy(), data.numpy()

    def np_loop() -> np.ndarray:
        res = np.empty((B, T, D), dtype=np.float32)
        for b in range(B):
            t = t_np[b]
            tq = t[0] + np.arange(T) / rate
            for d in range(D):
                res[b, :, d] = np.interp(tq, t, x_np[b, :, d])
        return res

    figures["np_interp_loop"] = _timeit(np_loop, min_repeats=3, max_repeats=10, budget_s=budget * 2, warmup=1)
    ref = np_loop()
    max_abs_err = float(np.abs(out.numpy() - ref).max())

    try:
        import torchinterp1d
    except ImportError:
        torchinterp1d = None
    if torchinterp1d is not None:
        def layout() -> tuple[Any, Any, Any]:
            x = times[:, None, :].expand(B, D, S).reshape(B * D, S)
            y = data.permute(0, 2, 1).reshape(B * D, S)
            xn = targets[:, None, :].expand(B, D, T).reshape(B * D, T)
            return x, y, xn

        x, y, xn = layout()
        figures["torchinterp1d"] = _timeit(lambda: torchinterp1d.interp1d(x, y, xn), min_repeats=3,
                                           max_repeats=20, budget_s=budget)
        figures["torchinterp1d_layout_copies"] = _timeit(layout, min_repeats=3, max_repeats=20, budget_s=budget)

    # the floor: read n bytes and write n bytes, n = half the bytes our call moves
    n = bytes_grid // 2
    src = torch.empty(n, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    figures["copy_floor"] = _timeit(lambda: dst.copy_(src), budget_s=budget)
    figures["copy_fresh_output"] = _timeit(lambda: src.clone(), budget_s=budget)

    def ratios_of(stat: str) -> dict[str, float]:
        v = {k: f[stat] for k, f in figures.items()}
        out = {
            "speedup_vs_np_interp_loop": v["np_interp_loop"] / v["ours_grid"],
            "times_the_copy_floor": v["ours_grid"] / v["copy_floor"],
            "explicit_targets_times_the_copy_floor": v["ours_explicit"] / v["copy_floor"],
            "checked_times_the_copy_floor": v["ours_grid_checked"] / v["copy_floor"],
        }
        if "torchinterp1d" in v:
            out["speedup_vs_torchinterp1d"] = v["torchinterp1d"] / v["ours_grid"]
        return out

    ratios = ratios_of("min_s")
    return {
        "shape": {"B": B, "S": S, "T": T, "D": D, "dtype": "float32", "rate_hz": rate},
        "threads": torch.get_num_threads(),
        "cpu_contention": _contention(),
        "ratios_basis": "best of the repeats (min): other processes only ever add time",
        "ratios_of_medians": ratios_of("median_s"),
        "bytes_moved": {"grid": bytes_grid, "explicit": bytes_explicit},
        "seconds": figures,
        "ratios": ratios,
        "goals": {
            "speedup_vs_np_interp_loop >= 20": ratios["speedup_vs_np_interp_loop"] >= 20,
            "faster than torchinterp1d": ratios.get("speedup_vs_torchinterp1d", 0) > 1,
            "within 3x of the copy floor": ratios["times_the_copy_floor"] <= 3,
        },
        "max_abs_diff_vs_np_interp": max_abs_err,
    }


def _cuda_time(torch: Any, fn: Callable[[], Any], *, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Device seconds per call from CUDA events, one event pair per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        pairs.append((a, b))
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) / 1e3 for a, b in pairs]
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def _host_time(torch: Any, fn: Callable[[], Any], *, repeats: int = 200, warmup: int = 10) -> dict[str, float]:
    """End-to-end seconds of one call as the host sees it: synchronise, call, synchronise."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def _gpu(quick: bool) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"available": False, "reason": "torch is not installed"}
    if not torch.cuda.is_available():
        return {"available": False, "reason": "no GPU on this machine"}
    from trajflow.preprocess.kernels import UniformGrid, resample, triton_available, triton_impl

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    info: dict[str, Any] = {
        "available": True,
        "device": torch.cuda.get_device_name(dev),
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "sms": props.multi_processor_count,
        "torch_cuda": torch.version.cuda,
        "triton": triton_available(),
    }
    if not triton_available():
        info["reason"] = "triton is not importable: only the torch path could run"
    try:
        import triton

        info["triton_version"] = triton.__version__
    except ImportError:
        pass

    S, T, D, rate = 120, 100, 14, 100.0
    free, _ = torch.cuda.mem_get_info()
    per_row = S * D * 4 + S * 4 + T * D * 4  # float32 data, times, output
    # a batch that fills the chip: ~1/6 of free memory (the torch path needs temporaries too)
    B = 16384 if quick else int(min(1 << 20, max(65536, free // 6 // per_row)))
    throughput: dict[str, Any] = {}
    for dtype_name in ("float32", "bfloat16"):
        dtype = getattr(torch, dtype_name)
        data, times = _trajectories(torch, B, S, D, device="cuda", dtype=dtype)
        grid = UniformGrid(start=times[:, 0], rate_hz=rate, num=T)
        out = resample(data, times, grid, backend="torch", check=False)
        nbytes = data.nbytes + times.nbytes + out.nbytes
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        row: dict[str, Any] = {"B": B, "bytes_moved": nbytes}
        fig = {}
        if triton_available():
            fig["triton"] = _cuda_time(torch, lambda: resample(data, times, grid, backend="triton", check=False))
            row["triton_config"] = str(triton_impl.kernel(False).best_config)
        fig["torch"] = _cuda_time(torch, lambda: resample(data, times, grid, backend="torch", check=False))
        fig["copy"] = _cuda_time(torch, lambda: dst.copy_(src))
        for k, v in fig.items():
            v["gb_per_s"] = nbytes / v["median_s"] / 1e9
        row["seconds"] = fig
        if "triton" in fig:
            tri = resample(data, times, grid, backend="triton", check=False)
            row["max_abs_diff_triton_vs_torch"] = float((tri.float() - out.float()).abs().max())
            row["fraction_of_copy_bandwidth"] = fig["triton"]["gb_per_s"] / fig["copy"]["gb_per_s"]
            row["speedup_vs_torch_path"] = fig["torch"]["median_s"] / fig["triton"]["median_s"]
        throughput[dtype_name] = row
        data = times = out = src = dst = None  # free the batch before the next one
        torch.cuda.empty_cache()
    info["throughput"] = throughput

    # latency at the published point
    Bl, Sl, Tl, Dl = 256, 100, 50, 32
    data, times = _trajectories(torch, Bl, Sl, Dl, device="cuda", dtype=torch.bfloat16)
    grid = UniformGrid(start=times[:, 0], rate_hz=50.0, num=Tl)
    backend = "triton" if triton_available() else "torch"
    lat = {
        "shape": {"B": Bl, "S": Sl, "T": Tl, "D": Dl, "dtype": "bfloat16"},
        "backend": backend,
        "device_s": _cuda_time(torch, lambda: resample(data, times, grid, backend=backend, check=False), repeats=100),
        "host_end_to_end_s": _host_time(torch, lambda: resample(data, times, grid, backend=backend, check=False)),
        "host_end_to_end_checked_s": _host_time(torch, lambda: resample(data, times, grid, backend=backend,
                                                                       check=True)),
        "published_ms": PUBLISHED_GPU_LATENCY_MS,
    }
    lat["speedup_vs_published_host"] = PUBLISHED_GPU_LATENCY_MS / 1e3 / lat["host_end_to_end_s"]["median_s"]
    lat["speedup_vs_published_device"] = PUBLISHED_GPU_LATENCY_MS / 1e3 / lat["device_s"]["median_s"]
    info["latency"] = lat
    goals = {"10x lower latency than published (host, end to end)": lat["speedup_vs_published_host"] >= 10}
    f32 = throughput["float32"]
    if "fraction_of_copy_bandwidth" in f32:
        goals[">= 80% of copy bandwidth (float32)"] = f32["fraction_of_copy_bandwidth"] >= 0.8
        goals[">= 5x the torch path (float32)"] = f32["speedup_vs_torch_path"] >= 5
    info["goals"] = goals
    return info


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 10 else f"{s:.1f} s"


def _summary(result: dict[str, Any]) -> str:
    c = result["cpu"]
    sh = c["shape"]
    sec = c["seconds"]
    r = c["ratios"]
    cont = c.get("cpu_contention", {})
    lines = [
        "Resampling hot path (`trajflow.preprocess.kernels`), one process, one run. CPU ratios are "
        "best-of-N (min) times of this run; ratios of medians are in the JSON.",
        "",
        f"## CPU: B={sh['B']}, S={sh['S']} -> T={sh['T']}, D={sh['D']} float32, {sh['rate_hz']:g} Hz grid, "
        f"{c['threads']} torch threads",
        "",
        f"Contention at the end of the run: load average {cont.get('load_average', 'n/a')}, "
        f"CPU pressure (some, %) {cont.get('pressure_some_pct', 'n/a')}.",
        "",
        "| contender | min | median | page faults/call |",
        "|---|---:|---:|---:|",
    ]
    names = {
        "ours_grid": "ours, torch path, UniformGrid, check=False",
        "ours_grid_checked": "ours, torch path, UniformGrid, check=True",
        "ours_explicit": "ours, torch path, explicit targets, check=False",
        "np_interp_loop": "np.interp loop (per trajectory, per channel)",
        "torchinterp1d": "torchinterp1d.interp1d (call only)",
        "torchinterp1d_layout_copies": "torchinterp1d: folding D into the batch (copies)",
        "copy_floor": "memory copy of the same bytes (preallocated)",
        "copy_fresh_output": "memory copy of the same bytes (fresh output)",
    }
    for k, label in names.items():
        if k in sec:
            v = sec[k]
            lines.append(f"| {label} | {_ms(v['min_s'])} | {_ms(v['median_s'])} | {v['page_faults_per_call']:g} |")
    lines += [
        "",
        f"- vs the np.interp loop: **{r['speedup_vs_np_interp_loop']:.1f}x** faster (goal >= 20x)",
    ]
    if "speedup_vs_torchinterp1d" in r:
        lines.append(f"- vs torchinterp1d: **{r['speedup_vs_torchinterp1d']:.1f}x** faster (goal > 1x)")
    lines += [
        f"- vs the copy floor: **{r['times_the_copy_floor']:.1f}x** the copy time (goal <= 3x); "
        f"explicit targets {r['explicit_targets_times_the_copy_floor']:.1f}x, "
        f"check=True {r['checked_times_the_copy_floor']:.1f}x",
        f"- max |ours - np.interp| = {c['max_abs_diff_vs_np_interp']:.2e}",
        "",
    ]
    g = result["gpu"]
    lines.append("## GPU")
    lines.append("")
    if not g.get("available"):
        lines.append(f"Not measured: {g.get('reason', 'no GPU')}. No GPU figures are reported.")
    else:
        lines.append(f"Device: {g['device']} (sm {g['capability']}, {g['sms']} SMs, {g['memory_gib']} GiB), "
                     f"CUDA {g['torch_cuda']}, triton {g.get('triton_version', 'n/a')}.")
        lines += ["", "| dtype | B | contender | median | GB/s |", "|---|---:|---|---:|---:|"]
        for dt, row in g["throughput"].items():
            for k, v in row["seconds"].items():
                lines.append(f"| {dt} | {row['B']} | {k} | {_ms(v['median_s'])} | {v['gb_per_s']:.0f} |")
        for dt, row in g["throughput"].items():
            if "fraction_of_copy_bandwidth" in row:
                lines.append(f"- {dt}: Triton reaches {row['fraction_of_copy_bandwidth']:.0%} of copy bandwidth "
                             f"(goal >= 80%), {row['speedup_vs_torch_path']:.1f}x the torch path (goal >= 5x); "
                             f"autotuned to {row.get('triton_config', 'n/a')}")
        lat = g["latency"]
        s = lat["shape"]
        lines += [
            "",
            f"Latency, B={s['B']}, S={s['S']} -> T={s['T']}, D={s['D']} bf16 ({lat['backend']}): "
            f"device {_ms(lat['device_s']['median_s'])}, host end to end {_ms(lat['host_end_to_end_s']['median_s'])} "
            f"(checked: {_ms(lat['host_end_to_end_checked_s']['median_s'])}); published "
            f"{lat['published_ms']} ms -> {lat['speedup_vs_published_host']:.1f}x lower end to end (goal >= 10x).",
        ]
    lines += ["", "## Method", "", (__doc__ or "").strip()]
    return "\n".join(lines) + "\n"


def run(quick: bool = False) -> tuple[dict[str, Any], str]:
    """Figures (JSON-able) and a Markdown summary; `quick` uses small sizes (for tests)."""
    result: dict[str, Any] = {"quick": quick, "cpu": _cpu(quick), "gpu": _gpu(quick)}
    _round(result)
    return result, _summary(result)


def _round(obj: Any) -> Any:
    """Round floats in place to 4 significant digits for readable JSON."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _round(v)
    elif isinstance(obj, list):
        return [_round(v) for v in obj]
    elif isinstance(obj, float) and math.isfinite(obj) and obj != 0:
        return float(f"{obj:.4g}")
    return obj
