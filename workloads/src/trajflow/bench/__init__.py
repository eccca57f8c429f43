"""Benchmarks behind `trajflow bench`: each module in BENCHMARKS has
`run(quick: bool) -> tuple[dict, str]` (figures, Markdown summary).

Results are written to `<out>/<name>.json` and `<out>/<name>.md`, always with the machine
they ran on, so figures are never read without knowing where they came from.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

from trajflow.errors import ConfigError

log = logging.getLogger(__name__)

# name -> module under trajflow.bench
BENCHMARKS = {
    "storage": "trajflow.bench.storage",
    "resample": "trajflow.bench.resample",
    "download": "trajflow.bench.download",
    "preprocess": "trajflow.bench.preprocess",
    "train": "trajflow.bench.train",
    "demo": "trajflow.local.bench",
}


def machine() -> dict[str, Any]:
    """Describe the machine: CPU model, cores, memory, and the GPU when torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    desc: dict[str, Any] = {
        "hostname": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": None,
    }
    try:
        # other work on the machine shifts every figure; keep the load next to them
        desc["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import torch

        desc["torch"] = torch.__version__
        if torch.cuda.is_available():
            desc["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return desc


def write_result(out_dir: str | Path, name: str, result: dict[str, Any], summary_md: str) -> Path:
    """Write one benchmark's figures (JSON) and a human summary (Markdown), machine included."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "result": result,
    }
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    m = doc["machine"]
    header = (
        f"# Benchmark: {name}\n\n"
        f"- date: {doc['date']}\n- machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}"
        + (f", load average {' / '.join(map(str, m['load_average']))} (1/5/15 min)" if m.get("load_average") else "")
        + "\n\n"
    )
    path = out / f"{name}.md"
    path.write_text(header + summary_md.rstrip() + "\n")
    return path


def run(names: list[str] | None, out_dir: str | Path, quick: bool = False) -> int:
    selected = names or list(BENCHMARKS)
    unknown = [n for n in selected if n not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    failed = 0
    for name in selected:
        try:
            module = importlib.import_module(BENCHMARKS[name])
        except ModuleNotFoundError as exc:
            log.warning("benchmark %s is not available: %s", name, exc)
            continue
        log.info("running benchmark %s", name)
        try:
            result, summary = module.run(quick=quick)
        except Exception:  # one broken benchmark must not hide the others' figures
            log.exception("benchmark %s failed", name)
            failed += 1
            continue
        path = write_result(out_dir, name, {**result, "quick": quick}, summary)
        log.info("benchmark %s written to %s", name, path)
    return 1 if failed else 0
