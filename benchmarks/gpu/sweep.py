"""GPU diagnostics for the Triton resampling kernel, beyond what `trajflow bench resample`
reports: every block-shape candidate at a chip-filling batch against a device copy of the
same bytes, and where the host time of one small call goes. Run by `check.sh` on a GPU
machine; writes JSON to the path given and prints a short table."""
from __future__ import annotations

import json
import sys
import time

import torch
from triton.testing import do_bench

from trajflow.bench.resample import _host_time, _trajectories
from trajflow.preprocess.kernels import UniformGrid, resample, triton_impl
from trajflow.preprocess.kernels.common import prepare


def host_us(fn) -> float:
    """Median host microseconds of call + synchronise."""
    return _host_time(torch, fn, repeats=400, warmup=20)["median_s"] * 1e6


def issue_us(fn, repeats: int = 400) -> float:
    """Mean host microseconds to issue one call (no synchronise in between)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / repeats * 1e6


def device_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def sweep_blocks(dtype: torch.dtype, B: int, S: int = 120, T: int = 100, D: int = 14) -> dict:
    data, times = _trajectories(torch, B, S, D, device="cuda", dtype=dtype)
    grid = UniformGrid(start=times[:, 0], rate_hz=100.0, num=T)
    p = prepare([data], ["data"], times, grid, None)
    outs = p.new_outputs()
    args = triton_impl.kernel_args(p, outs)
    nbytes = data.nbytes + times.nbytes + outs[0].nbytes
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = device_ms(lambda: dst.copy_(src))
    ref = resample(data, times, grid, backend="torch", check=False).float()
    jit = triton_impl.kernel(False).fn
    rows = []
    for config in triton_impl._configs():
        kw = config.all_kwargs()
        if triton_impl.segment(config) > 128:
            continue
        programs = (B * triton_impl._cdiv(T, triton_impl.segment(config)),)

        def launch(kw=kw, programs=programs):
            jit[programs](enable_fp_fusion=True, **kw, **args)

        outs[0].fill_(float("nan"))
        launch()
        err = float((outs[0].float() - ref).norm() / ref.norm())
        ms = device_ms(launch)
        rows.append({"config": {k: v for k, v in kw.items() if v is not None}, "ms": ms, "gb_s": nbytes / ms / 1e6,
                     "of_copy": copy / ms, "rel_err_vs_torch": err})
    torch_ms = device_ms(lambda: resample(data, times, grid, backend="torch", check=False))
    auto_ms = device_ms(lambda: resample(data, times, grid, backend="triton", check=False))
    return {"dtype": str(dtype), "B": B, "bytes": nbytes, "copy_ms": copy, "copy_gb_s": nbytes / copy / 1e6,
            "torch_ms": torch_ms, "autotuned_ms": auto_ms, "configs": rows}


def latency() -> dict:
    B, S, T, D = 256, 100, 50, 32
    data, times = _trajectories(torch, B, S, D, device="cuda", dtype=torch.bfloat16)
    grid = UniformGrid(start=times[:, 0], rate_hz=50.0, num=T)
    call = lambda: resample(data, times, grid, backend="triton", check=False)  # noqa: E731
    p = prepare([data], ["data"], times, grid, None)
    outs = p.new_outputs()
    args = triton_impl.kernel_args(p, outs)
    fn = triton_impl.kernel(False)
    call()  # autotune
    best = fn.best_config
    g = (B * triton_impl._cdiv(T, triton_impl.segment(best)),)
    raw = lambda: fn.fn[g](enable_fp_fusion=True, **best.all_kwargs(), **args)  # noqa: E731
    tuned = lambda: fn[lambda meta: (B * triton_impl._cdiv(T, triton_impl.segment(meta)),)](  # noqa: E731
        enable_fp_fusion=True, **args)
    x = torch.empty(1, device="cuda")
    res = {
        "best_config": str(best),
        "device_us": device_ms(call) * 1e3,
        "end_to_end_us": host_us(call),
        "end_to_end_checked_us": host_us(lambda: resample(data, times, grid, backend="triton", check=True)),
        "issue_resample_us": issue_us(call),
        "issue_prepare_us": issue_us(lambda: prepare([data], ["data"], times, grid, None)),
        "issue_kernel_args_us": issue_us(lambda: triton_impl.kernel_args(p, outs)),
        "issue_raw_launch_us": issue_us(raw),
        "issue_autotuner_launch_us": issue_us(tuned),
        "end_to_end_raw_launch_us": host_us(raw),
        "end_to_end_tiny_torch_op_us": host_us(lambda: x.add_(1)),
    }
    try:  # what a caller capturing the call in a CUDA graph would see
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            call()
        res["end_to_end_graph_replay_us"] = host_us(graph.replay)
    except Exception as exc:  # noqa: BLE001 - a diagnostic, recorded rather than fatal
        res["graph_error"] = repr(exc)
    return res


def main() -> None:
    out = sys.argv[1]
    free, _ = torch.cuda.mem_get_info()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton_impl.triton.__version__, "free_gib": free / 2**30}
    for key, run in (("latency", latency), ("f32", lambda: sweep_blocks(torch.float32, 1 << 20)),
                     ("bf16", lambda: sweep_blocks(torch.bfloat16, 1 << 20))):
        try:
            result[key] = run()
        except Exception as exc:  # noqa: BLE001 - keep the other sections
            result[key] = {"error": repr(exc)}
        torch.cuda.empty_cache()
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
    print(json.dumps(result["latency"], indent=1))
    for key in ("f32", "bf16"):
        r = result[key]
        if "error" in r:
            print(key, r["error"])
            continue
        print(f"{key}: B={r['B']} copy {r['copy_ms']:.3f} ms ({r['copy_gb_s']:.0f} GB/s), torch {r['torch_ms']:.3f} ms, "
              f"autotuned {r['autotuned_ms']:.3f} ms")
        for c in sorted(r["configs"], key=lambda c: c["ms"]):
            k = c["config"]
            shape = f"{'window' if k['WINDOW'] else 'binary'} T{k['BLOCK_T']}x{k['STEPS']} S{k['BLOCK_S']} w{k['num_warps']}"
            print(f"  {shape:28s} {c['ms']:.3f} ms {c['gb_s']:.0f} GB/s {c['of_copy']:.2f} of copy "
                  f"err {c['rel_err_vs_torch']:.1e}")


if __name__ == "__main__":
    main()
