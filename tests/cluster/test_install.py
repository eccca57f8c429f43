"""The chart on a real cluster: the pipeline completes, and upgrades scale in place."""
from __future__ import annotations

import json
from typing import Any

from kube import CHART, helm_values_args, jobs_of, kubectl_json, run, wait_for_job


def _only_job(namespace: str, release: str, component: str) -> dict[str, Any]:
    jobs = jobs_of(namespace, release, component)
    assert len(jobs) == 1, f"expected one {component} Job, found {[j['metadata']['name'] for j in jobs]}"
    return jobs[0]


def test_pipeline_completes(release: tuple[str, str]) -> None:
    name, namespace = release
    for component, timeout in (("downloader", 600), ("preprocessing", 900), ("training", 1200)):
        job = _only_job(namespace, name, component)
        wait_for_job(namespace, job["metadata"]["name"], timeout)
    # the artifacts rank 0 wrote are on the shared volume: list them from a throwaway pod
    pvc = kubectl_json("get", "pvc", "-l", f"app.kubernetes.io/instance={name}", namespace=namespace)["items"]
    assert pvc, "the release created no PersistentVolumeClaim"
    overrides = {
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "ls",
                    "image": "trajflow-downloader:e2e",
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", "import os; print(sorted(os.listdir('/data/e2e/train/artifacts')))"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": pvc[0]["metadata"]["name"]}}],
        }
    }
    out = run(
        "kubectl", "-n", namespace, "run", "artifacts", "--image=trajflow-downloader:e2e", "--restart=Never",
        "--rm", "-i", "--quiet", f"--overrides={json.dumps(overrides)}", timeout=300,
    ).stdout
    assert "metrics.json" in out and "model" in out, f"artifacts missing: {out}"


def test_scaling_patches_job_in_place(release: tuple[str, str]) -> None:
    name, namespace = release
    before = _only_job(namespace, name, "downloader")
    run("helm", "upgrade", name, str(CHART), "-n", namespace, *helm_values_args({"downloader.parallelism": "3"}))
    after = _only_job(namespace, name, "downloader")
    assert after["metadata"]["uid"] == before["metadata"]["uid"], "scaling replaced the Job instead of patching it"
    assert after["spec"]["parallelism"] in (0, 3)  # a finished Indexed Job may report 0


def test_new_image_makes_new_job(release: tuple[str, str]) -> None:
    name, namespace = release
    before = {j["metadata"]["name"] for j in jobs_of(namespace, name, "downloader")}
    proc = run(
        "helm", "upgrade", name, str(CHART), "-n", namespace,
        *helm_values_args({"downloader.image.tag": "e2e-next"}), check=False,
    )
    assert proc.returncode == 0, f"upgrade failed: {proc.stderr}"
    assert "field is immutable" not in proc.stderr
    after = {j["metadata"]["name"] for j in jobs_of(namespace, name, "downloader")}
    assert after - before, "a new image tag must render a new Job name"
