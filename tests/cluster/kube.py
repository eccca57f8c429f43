"""Helpers for the cluster tests: helm/kubectl calls and a Job waiter."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "trajflow"
E2E_VALUES = [REPO / "values" / "kind.yaml", Path(__file__).with_name("values-e2e.yaml")]


def run(*cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def kubectl_json(*args: str, namespace: str) -> dict[str, Any]:
    return json.loads(run("kubectl", "-n", namespace, *args, "-o", "json").stdout)


def helm_values_args(extra_sets: dict[str, str] | None = None) -> list[str]:
    args: list[str] = []
    for f in E2E_VALUES:
        args += ["-f", str(f)]
    tag = os.environ.get("TRAJFLOW_E2E_IMAGE_TAG", "e2e")
    for stage in ("downloader", "preprocessing", "training"):
        args += ["--set", f"{stage}.image.tag={tag}"]
    for key, value in (extra_sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


class JobFailed(AssertionError):
    pass


def job_state(job: dict[str, Any]) -> tuple[str, str]:
    """("succeeded" | "failed" | "running", detail) from every condition of a Job.

    Newer Kubernetes adds SuccessCriteriaMet / FailureTarget before Complete / Failed; the
    terminal condition may arrive later, so both count.
    """
    for cond in job.get("status", {}).get("conditions", []) or []:
        if cond.get("status") != "True":
            continue
        kind = cond.get("type")
        detail = f"{kind}: {cond.get('reason', '')} {cond.get('message', '')}".strip()
        if kind in ("Complete", "SuccessCriteriaMet"):
            return "succeeded", detail
        if kind in ("Failed", "FailureTarget"):
            return "failed", detail
    return "running", ""


def wait_for_job(namespace: str, name: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = kubectl_json("get", "job", name, namespace=namespace)
        state, detail = job_state(job)
        if state == "succeeded":
            return job
        if state == "failed":
            logs = run("kubectl", "-n", namespace, "logs", f"job/{name}", "--all-containers", "--tail=100", check=False)
            raise JobFailed(f"Job {name} failed ({detail}):\n{logs.stdout}{logs.stderr}")
        if time.monotonic() > deadline:
            raise JobFailed(f"Job {name} did not finish in {timeout_s:.0f}s; status: {job.get('status')}")
        time.sleep(5)


def jobs_of(namespace: str, release: str, component: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component={component}"
    return kubectl_json("get", "jobs", "-l", selector, namespace=namespace)["items"]
