"""The chart on a real cluster: upgrades scale in place, the pipeline completes, and a new
image makes a new Job.

The tests share one release and run in file order: scaling first, while the download is
most likely still running (DESIGN: `helm upgrade --set downloader.parallelism=N` scales a
running Job in place); the new-image upgrade last, since its tag is never built.
"""
from __future__ import annotations

from typing import Any

from kube import (
    CHART,
    NEXT_IMAGE_TAG,
    SCALED_PARALLELISM,
    e2e_run_id,
    helm_values_args,
    jobs_of,
    kubectl_json,
    run,
    run_pod,
    wait_for_job,
)

# Not marked `cluster`: the root conftest would skip such tests without KUBECONFIG before
# conftest.py here can fail them under TRAJFLOW_E2E_REQUIRE_CLUSTER.


def _only_job(namespace: str, release: str, component: str) -> dict[str, Any]:
    jobs = jobs_of(namespace, release, component)
    assert len(jobs) == 1, f"expected one {component} Job, found {[j['metadata']['name'] for j in jobs]}"
    return jobs[0]


def test_scaling_patches_job_in_place(release: tuple[str, str]) -> None:
    name, namespace = release
    before = _only_job(namespace, name, "downloader")
    assert before["spec"]["parallelism"] != SCALED_PARALLELISM
    run("helm", "upgrade", name, str(CHART), "-n", namespace, *helm_values_args({"downloader.parallelism": SCALED_PARALLELISM}))
    after = _only_job(namespace, name, "downloader")
    assert after["metadata"]["uid"] == before["metadata"]["uid"], "scaling replaced the Job instead of patching it"
    assert after["spec"]["parallelism"] == SCALED_PARALLELISM


def test_pipeline_completes(release: tuple[str, str]) -> None:
    name, namespace = release
    for component, timeout in (("downloader", 300), ("preprocessing", 600), ("training", 900)):
        job = _only_job(namespace, name, component)
        wait_for_job(namespace, job["metadata"]["name"], timeout)
    # the artifacts rank 0 wrote are on the shared volume: list them from a throwaway pod
    pvc = kubectl_json("get", "pvc", "-l", f"app.kubernetes.io/instance={name}", namespace=namespace)["items"]
    assert pvc, "the release created no PersistentVolumeClaim"
    downloader = _only_job(namespace, name, "downloader")["spec"]["template"]["spec"]["containers"][0]
    artifacts = f"/data/{e2e_run_id()}/train/artifacts"
    out = run_pod(
        namespace,
        "artifacts",
        {
            "containers": [
                {
                    "name": "ls",
                    # the image (and pull policy) the chart gave the downloader: one kind has loaded
                    "image": downloader["image"],
                    "imagePullPolicy": downloader["imagePullPolicy"],
                    "command": ["python", "-c", f"import os; print(sorted(os.listdir({artifacts!r})))"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
                }
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": pvc[0]["metadata"]["name"]}}],
        },
        timeout_s=300,
    )
    assert "metrics.json" in out and "model.safetensors" in out, f"artifacts missing: {out}"


def test_new_image_makes_new_job(release: tuple[str, str]) -> None:
    name, namespace = release
    before = {j["metadata"]["name"] for j in jobs_of(namespace, name, "downloader")}
    proc = run(
        "helm", "upgrade", name, str(CHART), "-n", namespace,
        *helm_values_args({"downloader.image.tag": NEXT_IMAGE_TAG}), check=False,
    )
    assert proc.returncode == 0, f"upgrade failed: {proc.stderr}"
    assert "field is immutable" not in proc.stderr
    after = {j["metadata"]["name"] for j in jobs_of(namespace, name, "downloader")}
    assert after - before, "a new image tag must render a new Job name"
