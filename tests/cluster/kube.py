"""Helpers for the cluster tests: helm/kubectl calls, a Job waiter and a throwaway pod.

The images are the ones .github/workflows/e2e.yaml builds and loads into kind; their
repositories, tag and pull policy come from values/kind.yaml alone, so the tests set no image.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "trajflow"
# `helm -f` in this order; tests/images/test_cluster_harness.py renders exactly these.
E2E_VALUES = [REPO / "values" / "kind.yaml", Path(__file__).with_name("values-e2e.yaml")]
# The scaling upgrade, and an image tag that is never built (only the Job's name matters).
SCALED_PARALLELISM = 3
NEXT_IMAGE_TAG = "e2e-next"

SUCCESS_CONDITIONS = ("SuccessCriteriaMet", "Complete")
FAILURE_CONDITIONS = ("FailureTarget", "Failed")


def run(*cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def kubectl_json(*args: str, namespace: str) -> dict[str, Any]:
    return json.loads(run("kubectl", "-n", namespace, *args, "-o", "json").stdout)


def helm_values_args(extra_sets: dict[str, Any] | None = None) -> list[str]:
    args: list[str] = []
    for f in E2E_VALUES:
        args += ["-f", str(f)]
    for key, value in (extra_sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


def e2e_run_id() -> str:
    """global.runId as Helm merges E2E_VALUES: the last file that sets it wins."""
    run_id = ""
    for f in E2E_VALUES:
        run_id = ((yaml.safe_load(f.read_text()) or {}).get("global") or {}).get("runId", run_id)
    assert run_id, f"no global.runId in {[str(f) for f in E2E_VALUES]}"
    return run_id


class JobFailed(AssertionError):
    pass


def job_state(job: dict[str, Any]) -> tuple[str, str]:
    """("succeeded" | "failed" | "running", detail) from every condition of a Job.

    Newer Kubernetes adds SuccessCriteriaMet / FailureTarget before Complete / Failed, and
    the terminal one may arrive later; a Job also keeps non-terminal conditions (Suspended)
    in any position. So every condition is read, and a failure wins over anything else.
    """
    true = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]

    def detail(types: tuple[str, ...]) -> str:
        return "; ".join(
            f"{c['type']}: {c.get('reason', '')} {c.get('message', '')}".strip() for c in true if c.get("type") in types
        )

    if any(c.get("type") in FAILURE_CONDITIONS for c in true):
        return "failed", detail(FAILURE_CONDITIONS)
    if any(c.get("type") in SUCCESS_CONDITIONS for c in true):
        return "succeeded", detail(SUCCESS_CONDITIONS)
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


def run_pod(namespace: str, name: str, spec: dict[str, Any], timeout_s: float) -> str:
    """Run a one-off pod to completion and return its log.

    Polled rather than attached (`kubectl run -i`), which can miss the output of a pod that
    exits before the attach.
    """
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {"restartPolicy": "Never", **spec}}
    proc = subprocess.run(
        ["kubectl", "-n", namespace, "apply", "-f", "-"], input=json.dumps(pod), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"creating pod {name} failed:\n{proc.stdout}\n{proc.stderr}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            phase = kubectl_json("get", "pod", name, namespace=namespace).get("status", {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"pod {name} still {phase} after {timeout_s:.0f}s")
            time.sleep(2)
        logs = run("kubectl", "-n", namespace, "logs", name).stdout
        assert phase == "Succeeded", f"pod {name} failed:\n{logs}"
        return logs
    finally:
        run("kubectl", "-n", namespace, "delete", "pod", name, "--wait=false", check=False)
