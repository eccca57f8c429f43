"""The training chart: torchrun over an Indexed Job with a headless Service, or a PyTorchJob."""
from __future__ import annotations

import pytest
from helmrender import (
    KUBEFLOW_APIS,
    PROMETHEUS_OPERATOR_APIS,
    SUBCHARTS,
    container,
    env_file,
    env_of,
    helm,
    one,
    pod_spec,
    render,
    select,
)

kv = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate is not installed")


def training(set_values=None, files=("production",), **kwargs):
    objs = render([env_file(f) for f in files], set_values, api_versions=PROMETHEUS_OPERATOR_APIS, **kwargs)
    return objs, one(objs, "Job", "training")


def test_nodes_are_completions_and_parallelism_of_an_indexed_job():
    _, job = training({"training.nodes": 4})
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 4
    assert spec["maxFailedIndexes"] == 0  # every rank is needed
    assert pod_spec(job)["restartPolicy"] == "Never"


def test_headless_service_names_the_pods():
    objs, job = training()
    service = one(objs, "Service", "training")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert pod_spec(job)["subdomain"] == service["metadata"]["name"]
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port = service["spec"]["ports"][0]
    assert port["port"] == 29400 and port["targetPort"] == "rdzv"
    assert {"name": "rdzv", "containerPort": 29400, "protocol": "TCP"} in container(job, "train")["ports"]


def test_rank_zero_is_master_addr_and_torchrun_uses_c10d():
    objs, job = training()
    train = container(job, "train")
    env = env_of(train)
    service = one(objs, "Service", "training")["metadata"]["name"]
    # The pod reads its Job's name from the label Kubernetes sets: the name holds a hash of
    # this very template, so it cannot be written into it.
    assert env["JOB_NAME"] == {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["MASTER_ADDR"] == f"$(JOB_NAME)-0.{service}.$(POD_NAMESPACE).svc.cluster.local"
    names = [e["name"] for e in train["env"]]
    assert names.index("JOB_NAME") < names.index("MASTER_ADDR") and names.index("POD_NAMESPACE") < names.index(
        "MASTER_ADDR"), "dependent variables must come after the ones they expand"
    assert train["command"] == ["torchrun"]
    assert train["args"] == [
        "--nnodes=2",
        "--nproc-per-node=8",  # production: 8 H100 per pod
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT)",
        "--rdzv-id=$(JOB_NAME)",
        "--rdzv-conf=join_timeout=1800",
        "--max-restarts=3",
        "--no-python", "trajflow", "train", "--config", "/etc/trajflow/config.yaml",
    ]
    assert env["MASTER_PORT"] == "29400"


@pytest.mark.parametrize("gpus, nproc, expected", [(8, None, 8), (4, None, 4), (None, None, 1), (8, 2, 2),
                                                   (None, 3, 3)])
def test_processes_per_node(gpus, nproc, expected):
    _, job = training({"training.resources.limits.nvidia\\.com/gpu": gpus, "training.nprocPerNode": nproc},
                         files=("dev",))
    assert f"--nproc-per-node={expected}" in container(job, "train")["args"]
    metrics = [p for p in container(job, "train")["ports"] if p["name"].startswith("metrics")]
    # local rank i serves /metrics on metricsPort + i
    assert [p["containerPort"] for p in metrics] == [9400 + i for i in range(expected)]


def test_every_pod_waits_for_all_preprocessed_shards():
    _, job = training()
    wait = container(job, "wait-preprocess")
    assert wait["args"] == ["wait", "--stage", "preprocess", "--shards", "0-63", "--timeout", "48h",
                            "--config", "/etc/trajflow/config.yaml"]
    assert wait["command"] == ["trajflow"]
    assert wait["resources"]["limits"]["memory"]
    # the wait runs without GPUs
    assert "nvidia.com/gpu" not in wait["resources"].get("limits", {})


def test_shared_memory_is_a_memory_volume():
    _, job = training()
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "128Gi"}
    assert {"name": "shm", "mountPath": "/dev/shm"} in container(job, "train")["volumeMounts"]


def test_failure_policy_fails_the_job_on_permanent_codes():
    _, job = training()
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail_job = [r for r in rules if r["action"] == "FailJob"]
    assert fail_job[0]["onExitCodes"] == {"operator": "In", "values": [2, 3, 5]}
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules


def test_pytorchjob_renders_where_the_api_exists():
    objs = render([env_file("production")], {"training.launcher": "pytorchjob"},
                  api_versions=[*PROMETHEUS_OPERATOR_APIS, *KUBEFLOW_APIS])
    assert not select(objs, "Job", "training") and not select(objs, "Service", "training")
    job = one(objs, "PyTorchJob", "training")
    assert job["apiVersion"] == "kubeflow.org/v1"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    assert job["spec"]["nprocPerNode"] == "8"
    assert job["spec"]["runPolicy"]["backoffLimit"] == 3
    for role in ("Master", "Worker"):
        spec = replicas[role]["template"]["spec"]
        main = [c for c in spec["containers"] if c["name"] == "pytorch"]
        assert main, "the training operator requires the container to be named pytorch"
        assert {"name": "pytorchjob-port", "containerPort": 29400, "protocol": "TCP"} in main[0]["ports"]
        assert "--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT)" in main[0]["args"]
        assert spec["initContainers"][0]["name"] == "wait-preprocess"
        assert spec["restartPolicy"] == replicas[role]["restartPolicy"] == "OnFailure"
        # the pod template is still a valid Kubernetes pod template
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                     "template": replicas[role]["template"]}, "1.31.0", strict=True)


def test_pytorchjob_without_the_api_fails_clearly():
    with pytest.raises(helm.HelmRenderError) as info:
        render([env_file("production")], {"training.launcher": "pytorchjob"}, api_versions=PROMETHEUS_OPERATOR_APIS)
    message = str(info.value)
    assert "training.launcher is pytorchjob" in message and "kubeflow.org/v1 PyTorchJob" in message


def test_pytorchjob_name_follows_the_same_hash_rules():
    apis = [*PROMETHEUS_OPERATOR_APIS, *KUBEFLOW_APIS]
    base = {"training.launcher": "pytorchjob"}
    a = one(render([env_file("production")], base, api_versions=apis), "PyTorchJob", "training")
    b = one(render([env_file("production")], {**base, "training.ttlSecondsAfterFinished": 5}, api_versions=apis),
            "PyTorchJob", "training")
    c = one(render([env_file("production")], {**base, "training.nodes": 3}, api_versions=apis),
            "PyTorchJob", "training")
    assert a["metadata"]["name"] == b["metadata"]["name"] != c["metadata"]["name"]


def test_the_training_chart_renders_on_its_own():
    objs = render(chart=SUBCHARTS / "training")
    job = one(objs, "Job", "training")
    assert job["spec"]["completions"] == 1
    assert one(objs, "Service", "training")
