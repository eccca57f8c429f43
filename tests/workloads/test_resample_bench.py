"""Smoke test of the resampling benchmark in quick mode: the result has the expected keys and
positive figures, and it can be written with the machine named. No timing assertions."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from trajflow.bench import resample as bench  # noqa: E402
from trajflow.bench import write_result  # noqa: E402

CPU_CONTENDERS = ["ours_grid", "ours_grid_checked", "ours_explicit", "np_interp_loop", "copy_floor",
                  "copy_fresh_output"]


@pytest.fixture(scope="module")
def quick_result():
    return bench.run(quick=True)


def test_quick_run_has_the_expected_figures(quick_result):
    result, summary = quick_result
    assert result["quick"] is True
    cpu = result["cpu"]
    assert cpu["shape"] == {"B": 64, "S": 120, "T": 100, "D": 14, "dtype": "float32", "rate_hz": 100.0}
    for name in CPU_CONTENDERS + ["torchinterp1d"]:
        fig = cpu["seconds"][name]
        assert fig["median_s"] > 0 and fig["min_s"] > 0 and fig["repeats"] >= 1
    for name in ("speedup_vs_np_interp_loop", "speedup_vs_torchinterp1d", "times_the_copy_floor",
                 "explicit_targets_times_the_copy_floor", "checked_times_the_copy_floor"):
        assert cpu["ratios"][name] > 0 and cpu["ratios_of_medians"][name] > 0
    assert set(cpu["goals"]) == {"speedup_vs_np_interp_loop >= 20", "faster than torchinterp1d",
                                 "within 3x of the copy floor"}
    assert cpu["bytes_moved"]["grid"] > 0 and cpu["threads"] >= 1
    assert cpu["max_abs_diff_vs_np_interp"] < 1e-3  # the contenders computed the same thing
    assert "## CPU" in summary and "## GPU" in summary and "## Method" in summary


def test_gpu_section_reports_honestly(quick_result):
    result, summary = quick_result
    gpu = result["gpu"]
    if not torch.cuda.is_available():
        assert gpu == {"available": False, "reason": "no GPU on this machine"}
        assert "no GPU on this machine" in summary
    else:
        assert gpu["available"] and gpu["device"]
        for row in gpu["throughput"].values():
            assert all(v["median_s"] > 0 and v["gb_per_s"] > 0 for v in row["seconds"].values())
        assert gpu["latency"]["device_s"]["median_s"] > 0


def test_result_is_written_with_the_machine(quick_result, tmp_path):
    result, summary = quick_result
    path = write_result(tmp_path, "resample", result, summary)
    doc = json.loads((tmp_path / "resample.json").read_text())
    assert doc["benchmark"] == "resample" and doc["machine"]["cpu"]
    assert doc["result"]["cpu"]["ratios"] == result["cpu"]["ratios"]
    assert path.read_text().startswith("# Benchmark: resample")


def test_summary_formats_a_gpu_section():
    """The Markdown for a GPU result (shape only: these are placeholders, not measurements)."""
    fig = {"median_s": 1.0, "min_s": 1.0, "repeats": 1, "gb_per_s": 1.0}
    row = {"B": 1, "bytes_moved": 1, "seconds": {"triton": fig, "torch": fig, "copy": fig},
           "fraction_of_copy_bandwidth": 1.0, "speedup_vs_torch_path": 1.0}
    gpu = {"available": True, "device": "placeholder", "capability": "0.0", "sms": 1, "memory_gib": 1,
           "torch_cuda": "x", "triton_version": "x", "throughput": {"float32": row, "bfloat16": row},
           "latency": {"shape": {"B": 256, "S": 100, "T": 50, "D": 32}, "backend": "triton", "device_s": fig,
                       "host_end_to_end_s": fig, "host_end_to_end_checked_s": fig, "published_ms": 0.41,
                       "speedup_vs_published_host": 1.0}}
    fake_cpu_fig = {"median_s": 1.0, "min_s": 1.0, "repeats": 1, "page_faults_per_call": 0}
    cpu = {"shape": {"B": 1, "S": 2, "T": 1, "D": 1, "rate_hz": 1.0}, "threads": 1,
           "seconds": {k: fake_cpu_fig for k in CPU_CONTENDERS},
           "ratios": {"speedup_vs_np_interp_loop": 1.0, "times_the_copy_floor": 1.0,
                      "explicit_targets_times_the_copy_floor": 1.0, "checked_times_the_copy_floor": 1.0},
           "max_abs_diff_vs_np_interp": 0.0}
    md = bench._summary({"cpu": cpu, "gpu": gpu})
    assert "Device: placeholder" in md and "Latency, B=256" in md and "| float32 | 1 | triton |" in md
