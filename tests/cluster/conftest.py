"""Cluster tests: install the chart on a real cluster (kind in CI) and watch it work.

They need KUBECONFIG pointing at a cluster, the `helm` and `kubectl` binaries, and the
images loaded into the cluster (see .github/workflows/e2e.yaml). Without them every test
here skips with the reason, unless TRAJFLOW_E2E_REQUIRE_CLUSTER=1 (set by the e2e
workflow) turns the skip into a failure: a CI run that tested nothing must not pass.
TRAJFLOW_E2E_KEEP_RELEASE=1 leaves the release and its namespace in place for inspection
(the workflow's diagnostics step reads them; the kind cluster is thrown away anyway).
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from kube import CHART, helm_values_args, run


def _missing_prerequisite() -> str | None:
    kubeconfig = os.environ.get("KUBECONFIG", "")
    if not kubeconfig:
        return "KUBECONFIG is not set: no cluster to install into"
    if not all(Path(p).is_file() for p in kubeconfig.split(os.pathsep) if p):
        return f"KUBECONFIG={kubeconfig} does not name an existing file"
    for tool in ("helm", "kubectl"):
        if shutil.which(tool) is None:
            return f"the {tool} binary is not on PATH"
    return None


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


# module scope: it must run before the module-scoped `release` fixture asks for a cluster
@pytest.fixture(scope="module", autouse=True)
def _requires_cluster() -> None:
    reason = _missing_prerequisite()
    if reason and _flag("TRAJFLOW_E2E_REQUIRE_CLUSTER"):
        pytest.fail(f"TRAJFLOW_E2E_REQUIRE_CLUSTER is set but {reason}", pytrace=False)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def release(kube_cluster: Any) -> Any:
    """A fresh namespace with the chart installed; uninstalled and deleted afterwards."""
    namespace = f"trajflow-e2e-{uuid.uuid4().hex[:6]}"
    name = "tf"
    run("kubectl", "create", "namespace", namespace)
    try:
        run("helm", "install", name, str(CHART), "-n", namespace, *helm_values_args(), "--wait=false")
        yield name, namespace
    finally:
        if not _flag("TRAJFLOW_E2E_KEEP_RELEASE"):
            run("helm", "uninstall", name, "-n", namespace, "--wait", check=False)
            run("kubectl", "delete", "namespace", namespace, "--wait=false", check=False)
