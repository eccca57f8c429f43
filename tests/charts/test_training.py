"""The training chart: `trajflow train` as the elastic launcher over an Indexed Job with a headless
Service, or a PyTorchJob."""
from __future__ import annotations

import re

import pytest
import yaml
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
    without_rerun,
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


def test_production_spreads_the_training_pods_of_its_own_release_over_nodes():
    _, job = training(release="team-a")
    spread = pod_spec(job)["topologySpreadConstraints"]
    assert spread == [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
                       "labelSelector": {"matchLabels": {
                           "app.kubernetes.io/name": "trajflow", "app.kubernetes.io/instance": "team-a",
                           "app.kubernetes.io/component": "training"}}}]
    assert spread[0]["labelSelector"]["matchLabels"].items() <= job["spec"]["template"]["metadata"]["labels"].items()


# What the pods run in production (2 nodes, 8 H100 each): `trajflow train` itself is the
# elastic agent, so the pod exits with its workers' code (plain torchrun always exits 1).
LAUNCHER_ARGS = [
    "train", "--config", "/etc/trajflow/config.yaml",
    "--nnodes=2",
    "--nproc-per-node=8",
    "--rdzv-backend=c10d",
    "--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT)",
    "--rdzv-id=$(JOB_NAME)",
    "--rdzv-conf=join_timeout=1800,read_timeout=1800",
    "--max-restarts=3",
    "--local-addr=$(POD_IP)",
]


def test_rank_zero_is_master_addr_and_the_launcher_uses_c10d():
    objs, job = training()
    train = container(job, "train")
    env = env_of(train)
    service = one(objs, "Service", "training")["metadata"]["name"]
    # The pod reads its Job's name from the label Kubernetes sets: the name holds a hash of
    # this very template, so it cannot be written into it.
    assert env["JOB_NAME"] == {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["MASTER_ADDR"] == f"$(JOB_NAME)-0.{service}.$(POD_NAMESPACE).svc.cluster.local"
    names = [e["name"] for e in train["env"]]
    assert names.index("JOB_NAME") < names.index("MASTER_ADDR") and names.index("POD_NAMESPACE") < names.index(
        "MASTER_ADDR"), "dependent variables must come after the ones they expand"
    assert train["command"] == ["trajflow"]
    assert train["args"] == LAUNCHER_ARGS
    assert env["MASTER_PORT"] == "29400"


@pytest.mark.parametrize("gpus, nproc, expected", [(8, None, 8), (4, None, 4), (None, None, 1), (8, 8, 8),
                                                   ("2", None, 2), (None, 3, 3)])
def test_processes_per_node(gpus, nproc, expected):
    _, job = training({"training.resources.limits.nvidia\\.com/gpu": gpus, "training.nprocPerNode": nproc},
                         files=("dev",))
    assert f"--nproc-per-node={expected}" in container(job, "train")["args"]
    metrics = [p for p in container(job, "train")["ports"] if p["name"].startswith("metrics")]
    # local rank i serves /metrics on metricsPort + i
    assert [p["containerPort"] for p in metrics] == [9400 + i for i in range(expected)]


@pytest.mark.parametrize("nproc, words", [(4, r"2 local rank\(s\) would have no GPU\. Set nprocPerNode to 2"), (1, "1 would sit idle")])
def test_processes_per_node_must_match_the_gpus(nproc, words):
    # found at render, not by the workers after the wait for every preprocessed shard
    with pytest.raises(helm.HelmRenderError, match=f"training.nprocPerNode is {nproc}, but each training pod has 2 GPU.*{words}"):
        training({"training.resources.limits.nvidia\\.com/gpu": 2, "training.nprocPerNode": nproc}, files=("staging",))


def test_processes_per_node_are_free_on_cpu():
    _, job = training({"training.resources.limits.nvidia\\.com/gpu": 2, "training.nprocPerNode": 3,
                       "training.config.device": "cpu"}, files=("dev",))
    assert "--nproc-per-node=3" in container(job, "train")["args"]


def test_every_pod_waits_for_all_preprocessed_shards():
    _, job = training()
    wait = container(job, "wait-preprocess")
    assert wait["args"] == ["wait", "--stage", "preprocess", "--shards", "0-63", "--expect-shards", "64", "--timeout", "48h",
                            "--config", "/etc/trajflow/config.yaml", "--check-config", "training"]
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


PYTORCHJOB_ARGS = [*("--rdzv-endpoint=$(JOB_NAME)-worker-0:29400" if a.startswith("--rdzv-endpoint=") else a
                     for a in LAUNCHER_ARGS), "--input-shards=64", "--wait=48h"]


def test_pytorchjob_renders_where_the_api_exists():
    objs = render([env_file("production")], {"training.launcher": "pytorchjob"},
                  api_versions=[*PROMETHEUS_OPERATOR_APIS, *KUBEFLOW_APIS])
    assert not select(objs, "Job", "training") and not select(objs, "Service", "training")
    job = one(objs, "PyTorchJob", "training")
    assert job["apiVersion"] == "kubeflow.org/v1"
    # Worker only: with a Master the operator adds each Worker an init container that fails
    # (and burns backoffLimit) when the Master starts slowly
    (role,) = job["spec"]["pytorchReplicaSpecs"]
    replica = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert role == "Worker" and replica["replicas"] == 2 and replica["restartPolicy"] == "OnFailure"
    # the operator's PET_NPROC_PER_NODE (from spec.nprocPerNode) agrees with the launcher's flag
    assert job["spec"]["nprocPerNode"] == "8" and "--nproc-per-node=8" in LAUNCHER_ARGS
    spec = replica["template"]["spec"]
    main = [c for c in spec["containers"] if c["name"] == "pytorch"]
    assert main, "the training operator requires the container to be named pytorch"
    assert {"name": "pytorchjob-port", "containerPort": 29400, "protocol": "TCP"} in main[0]["ports"]
    # the same launcher, its store on worker 0 (the operator's per-pod headless Service);
    # it waits for preprocessing itself: a failing init container in a pod that restarts on
    # failure would be restarted forever
    assert main[0]["command"] == ["trajflow"]
    assert main[0]["args"] == PYTORCHJOB_ARGS
    assert not {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"} & env_of(main[0]).keys()
    assert env_of(main[0])["JOB_NAME"] == {
        "fieldRef": {"fieldPath": "metadata.labels['training.kubeflow.org/job-name']"}}
    assert env_of(main[0])["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env_of(main[0])["TRAJFLOW_KEEP_FINAL_FAILURE"] == "1"  # a restart repeats a final failure at once
    # pushed metrics get the shard label the PodMonitor gives this pod: <replica type>-<index>
    env = [e["name"] for e in main[0]["env"]]
    assert env.index("TRAJFLOW_REPLICA_TYPE") < env.index("TRAJFLOW_METRICS_SHARD")  # defined before use
    assert env.index("TRAJFLOW_REPLICA_INDEX") < env.index("TRAJFLOW_METRICS_SHARD")
    assert env_of(main[0])["TRAJFLOW_METRICS_SHARD"] == "$(TRAJFLOW_REPLICA_TYPE)-$(TRAJFLOW_REPLICA_INDEX)"
    assert env_of(main[0])["TRAJFLOW_REPLICA_INDEX"] == {
        "fieldRef": {"fieldPath": "metadata.labels['training.kubeflow.org/replica-index']"}}
    assert "initContainers" not in spec
    # the operator sets it from the replica spec, with a Warning event per pod if the template has one
    assert "restartPolicy" not in spec
    # the pod template is still a valid Kubernetes pod template
    kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                 "template": replica["template"]}, "1.31.0", strict=True)


def pytorchjob(values):
    objs = render([env_file("production")], {"training.launcher": "pytorchjob", **values},
                  api_versions=[*PROMETHEUS_OPERATOR_APIS, *KUBEFLOW_APIS])
    return one(objs, "PyTorchJob", "training")


@pytest.mark.parametrize("nodes", [1, 3])
def test_a_pytorchjob_is_nodes_workers_and_no_master(nodes):
    replicas = pytorchjob({"training.nodes": nodes})["spec"]["pytorchReplicaSpecs"]
    assert "Master" not in replicas
    assert replicas["Worker"]["replicas"] == nodes


def test_a_pytorchjob_frees_a_finished_jobs_running_pods():
    # None can leave a failed job's pods (and GPUs) running (kubeflow/trainer#3419)
    assert pytorchjob({})["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"


def test_a_pytorchjobs_backoff_limit_allows_backoff_limit_per_index_failures_of_every_node():
    # the job-wide limit counts all pods' restarts: one crash of the store host restarts all 3
    run_policy = pytorchjob({"training.nodes": 3, "training.backoffLimitPerIndex": 2})["spec"]["runPolicy"]
    assert run_policy["backoffLimit"] == 3 * 2 + 1


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
    # a longer deadline for a long run is patched in, as on a Job: a new name would restart it
    d = one(render([env_file("production")], {**base, "training.activeDeadlineSeconds": 999999}, api_versions=apis),
            "PyTorchJob", "training")
    assert d["spec"]["runPolicy"]["activeDeadlineSeconds"] == 999999
    e = one(render([env_file("production")], {**base, "training.rerun": 1}, api_versions=apis), "PyTorchJob", "training")
    assert a["metadata"]["name"] == b["metadata"]["name"] == d["metadata"]["name"] != c["metadata"]["name"]
    assert e["metadata"]["name"] not in (a["metadata"]["name"], c["metadata"]["name"])
    assert without_rerun(e["spec"]) == without_rerun(a["spec"])


def test_the_training_chart_renders_on_its_own():
    objs = render(chart=SUBCHARTS / "training")
    job = one(objs, "Job", "training")
    assert job["spec"]["completions"] == 1
    assert one(objs, "Service", "training")


def both_launchers(launcher):
    """The rendered training workload and its training container under `launcher`."""
    objs = render([env_file("production")], {"training.launcher": launcher},
                  api_versions=[*PROMETHEUS_OPERATOR_APIS, *KUBEFLOW_APIS])
    if launcher == "job":
        workload = one(objs, "Job", "training")
        return objs, workload, container(workload, "train")
    workload = one(objs, "PyTorchJob", "training")
    return objs, workload, container(workload, "pytorch")


def expand(value, env):
    """Kubernetes' `$(VAR)` expansion in args and env values; unknown references stay."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def kubelet_environment(train, downward, added):
    """The container's variables as the kubelet sets them: `downward` stands for the
    fieldRefs, `added` for what an operator appends; a value expands the ones before it."""
    env = {}
    for var in [*train["env"], *({"name": k, "value": v} for k, v in added.items())]:
        env[var["name"]] = expand(var["value"], env) if "value" in var else downward[var["name"]]
    return env


@pytest.mark.parametrize("launcher", ["job", "pytorchjob"])
@pytest.mark.parametrize("worker_codes, pod_code, fails_job", [
    ([5, 1], 5, True),  # one rank diverged, another crashed on the broken collective
    ([3], 3, True),
    ([1, 2], 2, True),
    ([4], 4, False),  # transient: retried
    ([-9], 1, False),  # a worker killed by a signal: an error, retried
])
def test_the_pod_exits_with_its_workers_code(launcher, worker_codes, pod_code, fails_job, tmp_path, monkeypatch):
    """The rendered command, run through the real `trajflow` parser, the config loader and
    torch's launcher argument parsing up to where torch would start the workers: a worker's
    exit code becomes the pod's, which podFailurePolicy's exit-code rule can match."""
    torch_run = pytest.importorskip("torch.distributed.run")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    from trajflow.cli import build_parser

    objs, workload, train = both_launchers(launcher)
    assert train["command"] == ["trajflow"]
    job_name = "trajflow-training-5f6d7c"
    downward = {"JOB_NAME": job_name, "POD_NAMESPACE": "trajflow", "POD_IP": "10.4.0.17",
                "TRAJFLOW_REPLICA_TYPE": "worker", "TRAJFLOW_REPLICA_INDEX": "0"}
    if launcher == "job":
        added, store = {}, f"{job_name}-0.trajflow-training.trajflow.svc.cluster.local:29400"
    else:  # what the training operator adds to a Worker of a Worker-only job (no MASTER_*/RANK)
        port = next(p["containerPort"] for p in train["ports"] if p["name"] == "pytorchjob-port")
        added = {"PYTHONUNBUFFERED": "0", "PET_NPROC_PER_NODE": workload["spec"]["nprocPerNode"], "PET_NNODES": "2"}
        store = f"{job_name}-worker-0:{port}"  # the operator's headless Service of pod worker-0
    env = kubelet_environment(train, downward, added)
    if launcher == "pytorchjob":
        assert env["TRAJFLOW_METRICS_SHARD"] == "worker-0"  # the shard label the PodMonitor gives this pod
    config = tmp_path / "config.yaml"
    config.write_text(one(objs, "ConfigMap", "training")["data"]["config.yaml"])
    argv = [str(config) if a == "/etc/trajflow/config.yaml" else expand(a, env) for a in train["args"]]

    for name in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):  # the launcher, not a worker under torchrun
        monkeypatch.delenv(name, raising=False)
    for name, value in added.items():  # torch's option parser reads PET_* from the environment
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TRAJFLOW_KEEP_FINAL_FAILURE", raising=False)  # its marker would land in /tmp
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # the launcher's setdefault leaves it as is
    launched = []

    def workers_fail(options):
        launched.append(options)
        no_file = str(tmp_path / "no-error-file")
        raise ChildFailedError("trajflow", {rank: ProcessFailure(rank, 4000 + rank, code, no_file)
                                            for rank, code in enumerate(worker_codes)})

    monkeypatch.setattr(torch_run, "run", workers_fail)
    waited = []  # a PyTorchJob's launcher waits for preprocessing (a Job's init container does)
    monkeypatch.setattr("trajflow.storage.wait.wait_in_run_root",
                        lambda glob, stage, shards, timeout_s, expect_shards, download_generation:
                        waited.append((stage, shards, timeout_s)))
    args = build_parser().parse_args(argv)
    assert args._run(args) == pod_code
    assert waited == ([] if launcher == "job" else [("preprocess", set(range(64)), 48 * 3600.0)])

    (options,) = launched
    assert (options.nnodes, options.nproc_per_node, options.max_restarts) == ("2", "8", 3)
    assert (options.rdzv_backend, options.rdzv_endpoint, options.rdzv_id) == ("c10d", store, job_name)
    assert options.rdzv_conf == "join_timeout=1800,read_timeout=1800" and options.local_addr == "10.4.0.17"
    assert options.training_script_args[-3:] == ["train", "--config", str(config)]
    if launcher == "job":
        rule = next(r for r in workload["spec"]["podFailurePolicy"]["rules"] if r["action"] == "FailJob")
        assert (pod_code in rule["onExitCodes"]["values"]) is fails_job


@pytest.mark.parametrize("launcher", ["job", "pytorchjob"])
def test_metrics_ports_pod_monitor_and_network_policy_agree(launcher):
    objs, workload, train = both_launchers(launcher)
    template = workload["spec"]["pytorchReplicaSpecs"]["Worker"]["template"] if launcher == "pytorchjob" \
        else workload["spec"]["template"]
    labels = template["metadata"]["labels"]
    base = yaml.safe_load(one(objs, "ConfigMap", "training")["data"]["config.yaml"])["config"]["metricsPort"]
    (endpoint,) = one(objs, "PodMonitor", "training")["spec"]["podMetricsEndpoints"]
    keep = next(r["regex"] for r in endpoint["relabelings"] if r.get("action") == "keep")
    rank_of = next(r["regex"] for r in endpoint["relabelings"] if r.get("targetLabel") == "local_rank" and "regex" in r)
    scraped = [p for p in train["ports"] if re.fullmatch(keep, p["name"])]
    assert len(scraped) == 8  # one /metrics per local rank
    for port in scraped:
        match = re.fullmatch(rank_of, port["name"])
        local_rank = int(match.group(1)) if match else 0
        # trajflow.train.loop.MetricsEndpoint: local rank i serves metricsPort + i
        assert port["containerPort"] == base + local_rank

    policy = next(p for p in select(objs, "NetworkPolicy", "training") if p["spec"]["podSelector"]["matchLabels"]
                  .items() <= labels.items())["spec"]
    # c10d store, gloo and NCCL listen on ports of their choosing: everything between training pods
    peers = [rule for rule in policy["ingress"] if "ports" not in rule]
    assert peers and all(peer["podSelector"]["matchLabels"].items() <= labels.items()
                         for rule in peers for peer in rule["from"])
    assert any("ports" not in rule and rule["to"] == peers[0]["from"] for rule in policy["egress"])
    scrape = [port for rule in policy["ingress"] for port in rule.get("ports", [])]
    assert scrape == [{"protocol": "TCP", "port": base, "endPort": base + 7}]


def test_metrics_ports_may_not_take_the_rendezvous_port():
    with pytest.raises(helm.HelmRenderError, match="rendezvous.port 9403 is one of the /metrics ports 9400-9407"):
        render([env_file("production")], {"training.rendezvous.port": 9403}, api_versions=PROMETHEUS_OPERATOR_APIS)
    with pytest.raises(helm.HelmRenderError, match="over 65535"):
        render([env_file("production")], {"training.config.metricsPort": 65530}, api_versions=PROMETHEUS_OPERATOR_APIS)


@pytest.mark.parametrize("launcher", ["job", "pytorchjob"])
def test_store_read_timeout_follows_the_join_timeout(launcher):
    # c10d's store client times out after read_timeout (torch default 60 s): a worker pod
    # whose store host (pod 0 / worker 0) is still Pending must wait as long as the join does,
    # not exit 1 after a minute and burn a retry.
    objs = render([env_file("production")], {"training.launcher": launcher,
                                             "training.rendezvous.joinTimeoutSeconds": 900},
                  api_versions=[*PROMETHEUS_OPERATOR_APIS, *KUBEFLOW_APIS])
    if launcher == "job":
        train = container(one(objs, "Job", "training"), "train")
    else:
        train = container(one(objs, "PyTorchJob", "training"), "pytorch")
    (conf,) = [a for a in train["args"] if a.startswith("--rdzv-conf=")]
    assert conf == "--rdzv-conf=join_timeout=900,read_timeout=900"
    from torch.distributed.elastic.rendezvous.utils import _parse_rendezvous_config as parse_rendezvous_config
    parsed = parse_rendezvous_config(conf.split("=", 1)[1])
    assert parsed == {"join_timeout": "900", "read_timeout": "900"}


@pytest.mark.parametrize("launcher", ["job", "pytorchjob"])
def test_workers_get_the_grace_period_to_checkpoint(launcher):
    """A SIGTERM (drain, preemption, an upgrade replacing the Job) gives the workers the pod's
    grace period to reach their next step and checkpoint; torch's agent otherwise kills them
    after 30 s, whatever the grace period."""
    from torch.distributed.run import config_from_args, parse_args

    objs = render([env_file("production")], {"training.launcher": launcher, "training.terminationGracePeriodSeconds": 600},
                  api_versions=[*PROMETHEUS_OPERATOR_APIS, *KUBEFLOW_APIS])
    workload = one(objs, "Job" if launcher == "job" else "PyTorchJob", "training")
    spec = pod_spec(workload)
    assert spec["terminationGracePeriodSeconds"] == 600
    train = next(c for c in spec["containers"])
    timeout = env_of(train)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]
    assert 0 < int(timeout) < 600
    # the variable is the one the launcher's torch reads (its --shutdown-timeout default)
    import os
    from unittest import mock
    with mock.patch.dict(os.environ, {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": timeout}):
        config, _, _ = config_from_args(parse_args(["--nnodes=1", "--nproc-per-node=1", "x.py"]))
    assert config.shutdown_timeout == int(timeout)


def test_a_grace_period_too_short_for_the_launcher_is_refused():
    with pytest.raises(helm.HelmValuesError, match="terminationGracePeriodSeconds"):
        render(set_values={"training.terminationGracePeriodSeconds": 20})
