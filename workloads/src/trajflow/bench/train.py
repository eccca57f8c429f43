"""Training throughput: samples/s for 1 vs 2 processes on CPU (gloo), and on the GPU(s)
when torch sees any (NCCL, bf16 autocast).

Each configuration is a real `trajflow train --nproc-per-node N` run (the elastic
launcher, rendezvous on 127.0.0.1) over synthetic shards. Samples/s is the median over
epochs after the first (the first pays one-off start-up costs) of training samples,
all ranks together, per second of training-loop time (evaluation and checkpoints
excluded).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trajflow.storage import LocalStorage, read_train_metrics
from trajflow.train.synthetic import (
    local_settings,
    write_config_file,
    write_synthetic_shards,
)


def _run(tmp: Path, name: str, nproc: int, threads: int | None, config: dict[str, Any]) -> dict[str, Any]:
    settings = local_settings(tmp, name, **config)
    write_synthetic_shards(LocalStorage(tmp / name), shards=4, episodes_per_shard=16, length=400)
    config_file = write_config_file(tmp / f"{name}.yaml", settings)
    env = {**os.environ, "TRAJFLOW_LOG_FORMAT": "json", "TRAJFLOW_LOG_LEVEL": "WARNING"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "trajflow.cli", "train", "--config", str(config_file), "--nproc-per-node", str(nproc)],
        env=env, capture_output=True, text=True, timeout=1800, check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark run {name} failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    doc = read_train_metrics(LocalStorage(tmp / name)) or {}
    rates = [h["samples_per_second"] for h in doc.get("history", [])[1:]] or [doc["samples_per_second"]]
    rate = statistics.median(rates)
    return {
        "name": name,
        "device": doc.get("device"),
        "processes": nproc,
        "threads_per_process": threads or "default",
        "model": config["model"],
        "batch_size_per_process": config["batch_size"],
        "window": config["window"],
        "samples_per_second": round(rate, 1),
        "step_ms": round(1000 * config["batch_size"] * nproc / rate, 3),
        "epochs": doc.get("epochs_completed"),
        "final_val_loss": doc.get("final_val_loss"),
        "wall_seconds": round(wall, 1),
    }


def run(quick: bool = False) -> tuple[dict[str, Any], str]:
    import torch

    steps = 15 if quick else 60
    epochs = 3 if quick else 4
    cpu_config = {
        "window": 16, "epochs": epochs, "batch_size": 64, "max_steps_per_epoch": steps, "device": "cpu",
        "metrics_port": 0, "log_every_steps": 1000, "early_stopping": {"enabled": False},
        "checkpoints": {"keep_last": 1}, "model": {"type": "gru", "hidden_size": 64, "num_layers": 2},
    }
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="trajflow-bench-train-") as tmp_dir:
        tmp = Path(tmp_dir)
        runs.append(_run(tmp, "cpu-1proc", 1, None, cpu_config))
        runs.append(_run(tmp, "cpu-1proc-1thread", 1, 1, cpu_config))
        runs.append(_run(tmp, "cpu-2proc", 2, 1, cpu_config))
        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            gpu_config = {**cpu_config, "device": "cuda", "batch_size": 1024, "window": 32,
                          "model": {"type": "gru", "hidden_size": 256, "num_layers": 2}}
            runs.append(_run(tmp, "gpu-1proc-gru", 1, None, gpu_config))
            tf_config = {**gpu_config, "model": {"type": "transformer", "hidden_size": 256, "num_layers": 4,
                                                 "num_heads": 8}}
            runs.append(_run(tmp, "gpu-1proc-transformer", 1, None, tf_config))
            fp32 = {**gpu_config, "bf16": False}
            runs.append(_run(tmp, "gpu-1proc-gru-fp32", 1, None, fp32))
            if gpus > 1:
                runs.append(_run(tmp, f"gpu-{gpus}proc-gru", gpus, None, gpu_config))
    by_name = {r["name"]: r for r in runs}
    scaling = by_name["cpu-2proc"]["samples_per_second"] / by_name["cpu-1proc-1thread"]["samples_per_second"]
    result = {"runs": runs, "cpu_2proc_over_1proc_1thread": round(scaling, 3), "quick": quick,
              "cpu_count": os.cpu_count()}
    lines = [
        "Samples/s = training windows per second over all processes (median of epochs after the first).",
        "",
        "| run | device | processes x threads | model | batch/process | samples/s | step ms | final val loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        model = r["model"]
        desc = f"{model['type']} {model['hidden_size']}x{model['num_layers']}"
        loss = f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else "-"
        lines.append(
            f"| {r['name']} | {r['device']} | {r['processes']} x {r['threads_per_process']} | {desc} | "
            f"{r['batch_size_per_process']} | {r['samples_per_second']:.0f} | {r['step_ms']:.2f} | {loss} |"
        )
    lines += ["", (f"2 processes over 1 process (1 thread each) on CPU: {scaling:.2f}x "
                   f"({os.cpu_count()} cores; gloo all-reduce every step).")]
    if not torch.cuda.is_available():
        lines.append("No GPU on this machine: GPU figures are recorded where one is available.")
    return result, "\n".join(lines) + "\n"
