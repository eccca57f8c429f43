"""The cluster-test harness itself, checked without a cluster."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "cluster"))

from kube import job_state  # noqa: E402


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ([], "running"),
        ([{"type": "Suspended", "status": "True"}], "running"),
        ([{"type": "SuccessCriteriaMet", "status": "True"}], "succeeded"),
        ([{"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}], "succeeded"),
        ([{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy"}], "failed"),
        ([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}], "failed"),
        ([{"type": "Failed", "status": "False"}], "running"),
    ],
)
def test_job_state_scans_every_condition(conditions: list[dict[str, str]], expected: str) -> None:
    state, _ = job_state({"status": {"conditions": conditions}})
    assert state == expected


def test_cluster_tests_collect_and_skip_without_cluster() -> None:
    env = {k: v for k, v in __import__("os").environ.items() if k != "KUBECONFIG"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(REPO / "tests" / "cluster"), "-q", "-rs", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped" in proc.stdout and "KUBECONFIG is not set" in proc.stdout
    assert "error" not in proc.stdout.lower().split("short test summary")[0]
