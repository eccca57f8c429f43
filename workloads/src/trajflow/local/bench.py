"""Benchmark of `make demo`: the demo dataset and the whole local pipeline, end to end.

The goal it checks is the README's: the demo finishes in about two minutes on two cores.
It runs the same two commands as `make demo` in a scratch directory laid out like the
repository root (values/local.yaml beside .trajflow/), then runs the pipeline once more
to time a rerun that has nothing to do. `quick` uses a tiny dataset and model instead.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trajflow.config.loader import find_chart_dir
from trajflow.errors import ConfigError

GOAL_SECONDS = 120.0
QUICK_DATA = ["--episodes", "12", "--rates", "30,100,333", "--min-seconds", "3", "--max-seconds", "5"]
QUICK_VALUES = [
    "downloader.shards=2", "preprocessing.shards=2", "training.inputShards=2",
    "training.config.window=8", "training.config.epochs=4", "training.config.batchSize=32",
    "training.config.model.hiddenSize=32", "training.config.model.numLayers=1",
]


def _local_values() -> Path:
    chart = find_chart_dir()
    path = chart.parent.parent / "values" / "local.yaml" if chart is not None else None
    if path is None or not path.is_file():
        raise ConfigError("values/local.yaml not found: run the demo benchmark from a trajflow checkout")
    return path


def _timed(argv: list[str], cwd: Path) -> float:
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds


def run(quick: bool = False) -> tuple[dict[str, Any], str]:
    from trajflow.local.runner import trajflow_command

    trajflow = trajflow_command()
    with tempfile.TemporaryDirectory(prefix="trajflow-bench-demo-") as tmp:
        root = Path(tmp)
        (root / "values").mkdir()
        shutil.copy(_local_values(), root / "values" / "local.yaml")
        data_args = ["demo-data", "--out", ".trajflow/demo-source", "--episodes", "96", "--seed", "0"]
        run_args = ["run", "-f", "values/local.yaml", "--plain"]
        if quick:
            data_args += QUICK_DATA
            for expression in QUICK_VALUES:
                run_args += ["--set", expression]
        demo_data = _timed([*trajflow, *data_args], root)
        pipeline = _timed([*trajflow, *run_args], root)
        summary = json.loads((root / ".trajflow" / "runs" / "demo" / "summary.json").read_text())
        rerun = _timed([*trajflow, *run_args], root)
    stages = {
        name: {k: v for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, figures in summary["stages"].items()
    }
    train = stages.get("train", {})
    ratio = train["final_val_loss"] / train["initial_val_loss"] if train.get("initial_val_loss") else None
    total = demo_data + pipeline
    result = {
        "episodes": 12 if quick else 96,
        "demo_data_seconds": round(demo_data, 2),
        "pipeline_seconds": round(pipeline, 2),
        "total_seconds": round(total, 2),
        "goal_seconds": GOAL_SECONDS,
        "within_goal": total <= GOAL_SECONDS,
        "noop_rerun_seconds": round(rerun, 2),
        "final_to_initial_val_loss": ratio,
        "stages": stages,
        "python": sys.version.split()[0],
    }
    rows = "\n".join(
        f"| {name} | {s.get('ran', 0)} of {s.get('shards', 0)} | {s.get('seconds') or 0:.1f} s |"
        for name, s in stages.items()
    )
    md = f"""The two commands of `make demo` ({result['episodes']} episodes{', quick settings' if quick else ''}),
then the same `trajflow run` again with nothing left to do.

| step | seconds |
|:--|--:|
| `trajflow demo-data` | {demo_data:.1f} |
| `trajflow run -f values/local.yaml` | {pipeline:.1f} |
| total (goal: about {GOAL_SECONDS:.0f}) | {total:.1f} |
| rerun, nothing to do | {rerun:.1f} |

| stage | shards run | wall time |
|:--|:--|--:|
{rows}

Validation loss after training: {f'{ratio:.1%} of its value before training' if ratio is not None else 'n/a'}.
"""
    return result, md
