"""Download and preprocessing Jobs, storage, network policies and the install notes."""
from __future__ import annotations

import re

import pytest
import yaml
from helmrender import (
    CHART,
    KUBEFLOW_APIS,
    PROMETHEUS_OPERATOR_APIS,
    ROOT,
    SUBCHARTS,
    container,
    env_file,
    env_of,
    helm,
    notes,
    one,
    pod_spec,
    render,
    select,
)

from trajflow.resources import parse_bytes


def test_download_job_is_indexed_over_the_shards():
    objs = render([env_file("production")], api_versions=PROMETHEUS_OPERATOR_APIS)
    job = one(objs, "Job", "downloader")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert (spec["completions"], spec["parallelism"], spec["backoffLimitPerIndex"]) == (64, 16, 5)
    assert spec["activeDeadlineSeconds"] == 86400 and "ttlSecondsAfterFinished" not in spec
    download = container(job, "download")
    assert download["command"] == ["trajflow"]
    assert download["args"] == ["download", "--config", "/etc/trajflow/config.yaml"]
    assert download["image"] == "ghcr.io/trajflow/trajflow-downloader:0.1.0"
    assert env_of(download)["TRAJFLOW_SHARDS"] == "64"
    assert "initContainers" not in pod_spec(job)


def test_default_failure_policy_follows_the_exit_codes():
    job = one(render(), "Job", "downloader")
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules == [
        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}},
        {"action": "FailIndex", "onExitCodes": {"operator": "In", "values": [3]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]


def test_a_wait_timeout_in_seconds_reaches_the_commands_as_whole_seconds():
    # values files give numbers as floats: 1000000 must not become 1e+06, which no duration parser takes
    objs = render([env_file("dev")], {"preprocessing.waitTimeout": 1000000, "training.waitTimeout": 86400})
    pre, train = one(objs, "Job", "preprocessing"), one(objs, "Job", "training")
    assert container(pre, "wait-download")["args"][7:9] == ["--timeout", "1000000"]
    assert container(pre, "preprocess")["args"][-2:] == ["--wait", "1000000"]
    assert "86400" in pod_spec(train)["initContainers"][0]["args"]
    # beyond 2^63 an integer conversion wrapped to a negative, which the wait refused
    huge = one(render([env_file("dev")], {"preprocessing.waitTimeout": 2**63 - 1}), "Job", "preprocessing")
    assert container(huge, "wait-download")["args"][7:9] == ["--timeout", "9223372036854775808"]


def test_preprocessing_shard_waits_for_its_download_shard():
    objs = render([env_file("production")], api_versions=PROMETHEUS_OPERATOR_APIS)
    job = one(objs, "Job", "preprocessing")
    wait = container(job, "wait-download")
    assert wait["args"] == ["wait", "--stage", "download", "--shards", "$(JOB_COMPLETION_INDEX)",
                            "--expect-shards", "64", "--timeout", "12h",
                            "--config", "/etc/trajflow/config.yaml", "--check-config", "preprocessing"]
    spec = pod_spec(job)
    assert [c["name"] for c in spec["initContainers"]] == ["wait-download"]
    main = container(job, "preprocess")
    assert main["args"] == ["preprocess", "--config", "/etc/trajflow/config.yaml", "--wait", "12h"]  # for metadata elsewhere
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["runtimeClassName"] == "nvidia"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert job["spec"]["completions"] == one(objs, "Job", "downloader")["spec"]["completions"]
    assert job["spec"]["parallelism"] == 8


def test_the_commands_pods_run_report_their_last_word_as_a_log_record():
    """The JSON logs of a pod end in a `"level": "error"` record that says why it stopped."""
    from trajflow.cli import POD_COMMANDS

    run = set()
    for launcher in ("job", "pytorchjob"):
        objs = render([env_file("production")], {"training.launcher": launcher},
                      api_versions=[*PROMETHEUS_OPERATOR_APIS, *KUBEFLOW_APIS])
        for workload in [*select(objs, "Job"), *select(objs, "PyTorchJob")]:
            spec = pod_spec(workload)
            run |= {c["args"][0] for c in [*spec.get("initContainers", []), *spec["containers"]]
                    if c.get("command") == ["trajflow"]}
    assert run == POD_COMMANDS


def test_a_preprocessing_pod_takes_one_gpu():
    # the stage drives one GPU; scaling out is parallelism's job
    with pytest.raises(helm.HelmRenderError, match="nvidia.com/gpu is 2, but a preprocessing pod uses one GPU: 1 would sit idle"):
        render([env_file("production")], {"preprocessing.resources.limits.nvidia\\.com/gpu": "2"},
               api_versions=PROMETHEUS_OPERATOR_APIS)


@pytest.mark.parametrize("stage", ["preprocessing", "training"])
def test_a_cuda_stage_without_a_gpu_is_refused_at_install(stage):
    # else its pods wait for their input, then fail on the missing device (retried, for preprocessing)
    overrides = {f"{stage}.resources.limits.nvidia\\.com/gpu": None, f"{stage}.config.device": "cuda"}
    with pytest.raises(helm.HelmRenderError, match=re.escape(
            f"{stage}.config.device is cuda, but the pods have no GPU (resources.limits.nvidia.com/gpu)")):
        render([env_file("staging")], overrides)
    for shared in ("mig-3g.40gb", "gpu.shared"):  # a MIG slice, a time-sliced GPU
        limits = {"resources": {"limits": {"nvidia.com/gpu": None, f"nvidia.com/{shared}": 1}}}
        spec = pod_spec(one(render([env_file("staging")], {f"{stage}.config.device": "cuda"},
                                   values={stage: limits}), "Job", stage))
        assert spec["containers"][0]["resources"]["limits"][f"nvidia.com/{shared}"] == 1
    # a local run's device is the machine's: the same values are no error there
    from trajflow.local.pipeline import build_plan
    assert build_plan([env_file("local")], [f"{stage}.config.device=cuda"]).stage(stage)


def test_pods_that_ask_for_a_gpu_tolerate_the_gpu_nodes_taint():
    # as Kubernetes' ExtendedResourceToleration plugin adds it where it is on: EKS, AKS and the
    # GPU operator taint GPU pools, and a CPU pod has no business there
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    objs = render()
    for stage in ("preprocessing", "training"):
        assert pod_spec(one(objs, "Job", stage))["tolerations"] == [gpu]
    assert "tolerations" not in pod_spec(one(objs, "Job", "downloader"))
    for stage in ("preprocessing", "training"):  # dev's stages run on CPU
        assert "tolerations" not in pod_spec(one(render([env_file("dev")]), "Job", stage))
    # the user's own come first and are not repeated; one that does not cover the taint (another
    # effect, a value) is no reason to leave it out; MIG slices ask for it too
    own = {"key": "team", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    other_effect = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}
    objs = render(values={"preprocessing": {"tolerations": [own, gpu]},
                          "training": {"tolerations": [other_effect],
                                       "resources": {"limits": {"nvidia.com/gpu": None, "nvidia.com/mig-1g.10gb": 1}}}})
    assert pod_spec(one(objs, "Job", "preprocessing"))["tolerations"] == [own, gpu]
    assert pod_spec(one(objs, "Job", "training"))["tolerations"] == [other_effect, gpu]


def test_the_main_containers_request_their_tmp_as_disk():
    # the scheduler counts only requested disk; a full node's evictions are not counted as failures
    objs = render([env_file("production")], api_versions=PROMETHEUS_OPERATOR_APIS)
    for stage, size in (("downloader", "2Gi"), ("preprocessing", "100Gi"), ("training", "200Gi")):
        spec = pod_spec(one(objs, "Job", stage))
        assert spec["containers"][0]["resources"]["requests"]["ephemeral-storage"] == size
        tmp = next(v for v in spec["volumes"] if v["name"] == "tmp")
        assert tmp["emptyDir"]["sizeLimit"] == size
        assert all("ephemeral-storage" not in c["resources"].get("requests", {}) for c in spec.get("initContainers", []))
    # one the user set, as a request or a limit (which Kubernetes copies to the request), is theirs
    for kind in ("requests", "limits"):
        job = one(render([env_file("production")], {f"training.resources.{kind}.ephemeral-storage": "50Gi"},
                         api_versions=PROMETHEUS_OPERATOR_APIS), "Job", "training")
        resources = pod_spec(job)["containers"][0]["resources"]
        assert resources[kind]["ephemeral-storage"] == "50Gi"
        assert kind == "requests" or "ephemeral-storage" not in resources["requests"]


@pytest.mark.parametrize("mode", ["ReadWriteOncePod", "ReadOnlyMany"])
def test_the_shared_claim_refuses_access_modes_no_pipeline_can_use(mode):
    with pytest.raises(helm.HelmError, match="accessModes"):
        render(values={"global": {"storage": {"pvc": {"accessModes": [mode]}}}})


def test_triton_cache_is_shared_on_a_shared_filesystem():
    def cache_dir(objs):
        return env_of(container(one(objs, "Job", "preprocessing"), "preprocess")).get("TRITON_CACHE_DIR")

    assert cache_dir(render()) == "/data/.trajflow-cache/triton"  # on the data volume, hidden from listings
    assert cache_dir(render(set_values={"global.storage.filesystem.path": "/mnt/lake/"})) == \
        "/mnt/lake/.trajflow-cache/triton"
    assert cache_dir(render([env_file("production")], api_versions=PROMETHEUS_OPERATOR_APIS)) is None  # S3: per pod
    objs = render(values={"preprocessing": {"extraEnv": [{"name": "TRITON_CACHE_DIR", "value": "/cache"}]}})
    env = container(one(objs, "Job", "preprocessing"), "preprocess")["env"]
    assert [e for e in env if e["name"] == "TRITON_CACHE_DIR"] == [{"name": "TRITON_CACHE_DIR", "value": "/cache"}]


def test_workloads_are_told_the_size_limit_of_their_tmp():
    objs = render([env_file("production")], {"preprocessing.tmp.sizeLimit": "20Gi"}, api_versions=PROMETHEUS_OPERATOR_APIS)
    for stage in ("downloader", "preprocessing", "training"):
        job = one(objs, "Job", stage)
        tmp = next(v for v in pod_spec(job)["volumes"] if v["name"] == "tmp")
        for c in pod_spec(job)["containers"] + pod_spec(job).get("initContainers", []):
            assert env_of(c)["TRAJFLOW_TMP_SIZE_LIMIT"] == tmp["emptyDir"]["sizeLimit"], (stage, c["name"])
    assert env_of(container(one(objs, "Job", "preprocessing"), "preprocess"))["TRAJFLOW_TMP_SIZE_LIMIT"] == "20Gi"
    # a plain number of bytes, as the schema allows: Helm prints it with an exponent
    objs = render(values={"preprocessing": {"tmp": {"sizeLimit": 2**31}}})
    env = env_of(container(one(objs, "Job", "preprocessing"), "preprocess"))
    assert parse_bytes(env["TRAJFLOW_TMP_SIZE_LIMIT"]) == 2**31


def test_image_reference_rules():
    base = render(set_values={"global.imageRegistry": "mirror.example.com/"})
    assert container(one(base, "Job", "downloader"), "download")["image"] == \
        "mirror.example.com/trajflow/trajflow-downloader:0.1.0"
    digest = "sha256:" + "b" * 64
    pinned = render(set_values={"downloader.image.digest": digest, "downloader.image.registry": ""})
    job = one(pinned, "Job", "downloader")
    assert container(job, "download")["image"] == f"trajflow/trajflow-downloader@{digest}"
    # pinned: no scanner skip is needed any more
    assert "checkov.io/skip1" not in (job["metadata"].get("annotations") or {})
    tagged = one(render(), "Job", "downloader")
    assert tagged["metadata"]["annotations"]["checkov.io/skip1"].startswith("CKV_K8S_43=")


def test_pull_secrets_merge_without_repeats():
    objs = render(set_values={"global.imagePullSecrets": [{"name": "shared"}],
                              "training.imagePullSecrets": [{"name": "gpu"}, {"name": "shared"}]})
    assert pod_spec(one(objs, "Job", "training"))["imagePullSecrets"] == [{"name": "gpu"}, {"name": "shared"}]
    assert pod_spec(one(objs, "Job", "downloader"))["imagePullSecrets"] == [{"name": "shared"}]


def test_service_accounts_carry_workload_identity_and_no_token():
    objs = render([env_file("production")], api_versions=PROMETHEUS_OPERATOR_APIS)
    for stage in ("downloader", "preprocessing", "training"):
        sa = one(objs, "ServiceAccount", stage)
        assert sa["automountServiceAccountToken"] is False
        assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
        assert pod_spec(one(objs, "Job", stage))["serviceAccountName"] == sa["metadata"]["name"]
    objs = render(set_values={"downloader.serviceAccount.create": False, "downloader.serviceAccount.name": "ops"})
    assert not select(objs, "ServiceAccount", "downloader")
    assert pod_spec(one(objs, "Job", "downloader"))["serviceAccountName"] == "ops"


def test_s3_credentials_come_from_an_existing_secret():
    objs = render([env_file("staging")], api_versions=PROMETHEUS_OPERATOR_APIS)
    # no data claim: the only one is the Pushgateway's, which keeps the shards' outcomes
    assert [o["metadata"]["name"] for o in select(objs, "PersistentVolumeClaim")] == ["trajflow-pushgateway"]
    for stage in ("downloader", "preprocessing", "training"):
        job = one(objs, "Job", stage)
        for c in [*pod_spec(job).get("initContainers", []), *pod_spec(job)["containers"]]:
            assert c["envFrom"] == [{"secretRef": {"name": "trajflow-s3-credentials"}}]
            assert not any("data" == m["name"] for m in c["volumeMounts"])
    config = yaml.safe_load(one(objs, "ConfigMap", "downloader")["data"]["config.yaml"])
    assert config["global"]["storage"]["s3"]["existingSecret"] == "trajflow-s3-credentials"
    # the tpl'd URL reaches the pods rendered
    assert config["global"]["metrics"]["pushgatewayUrl"] == "http://trajflow-pushgateway.trajflow.svc:9091"


def test_existing_claim_is_used_and_not_created():
    objs = render(set_values={"global.storage.pvc.create": False, "global.storage.pvc.existingClaim": "fleet-data"})
    assert not select(objs, "PersistentVolumeClaim")
    for stage in ("downloader", "preprocessing", "training"):
        volumes = {v["name"]: v for v in pod_spec(one(objs, "Job", stage))["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "fleet-data"


def test_created_claim_is_kept_on_uninstall():
    pvc = one(render([env_file("dev")]), "PersistentVolumeClaim", "storage")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert "storageClassName" not in pvc["spec"]  # the cluster default


def test_created_claim_uses_the_configured_storage_class():
    # ReadWriteMany data often needs a class other than the cluster default (NFS, EFS...)
    pvc = one(render([env_file("dev")], {"global.storage.pvc.storageClass": "fast-rwx"}),
              "PersistentVolumeClaim", "storage")
    assert pvc["spec"]["storageClassName"] == "fast-rwx"


def test_s3_credentials_are_only_mounted_on_s3():
    """A Secret left in values after moving to a filesystem must not be required by the pods
    (a missing Secret in envFrom keeps them from starting)."""
    secret = {"global.storage.s3.existingSecret": "old-s3-credentials"}
    on_fs = render([env_file("dev")], {**secret, "global.storage.type": "filesystem"})
    on_s3 = render([env_file("staging")], secret, api_versions=PROMETHEUS_OPERATOR_APIS)
    for stage in ("downloader", "preprocessing", "training"):
        ref = {"secretRef": {"name": "old-s3-credentials"}}
        assert ref not in pod_spec(one(on_fs, "Job", stage))["containers"][0].get("envFrom", []), stage
        assert ref in pod_spec(one(on_s3, "Job", stage))["containers"][0]["envFrom"], stage


def policy(objs, stage):
    return next(iter(select(objs, "NetworkPolicy", stage)))["spec"]


def test_network_policies_deny_by_default_and_allow_what_each_stage_needs():
    objs = render([env_file("dev")])
    deny = next(p for p in select(objs, "NetworkPolicy") if p["metadata"]["name"].endswith("-default-deny"))["spec"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny and "egress" not in deny
    assert deny["podSelector"]["matchExpressions"][0]["values"] == ["downloader", "preprocessing", "training"]
    down = policy(objs, "downloader")
    assert down["ingress"] == []
    ports = [sorted(p["port"] for p in rule["ports"]) for rule in down["egress"]]
    assert [53, 53] in ports  # DNS, UDP and TCP
    assert [80] in ports  # the robomimic catalog is served over http
    pre = policy(objs, "preprocessing")
    assert [sorted(p["port"] for p in rule.get("ports", [])) for rule in pre["egress"]] == [[53, 53]]
    train = policy(objs, "training")
    peers = {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "training",
                                             "app.kubernetes.io/instance": "trajflow",
                                             "app.kubernetes.io/name": "trajflow"}}}
    assert {"from": [peers]} in train["ingress"] and {"to": [peers]} in train["egress"]
    assert {"from": [{"namespaceSelector": {}}], "ports": [{"port": 9400, "protocol": "TCP"}]} in train["ingress"]


def test_network_policies_follow_storage_and_pushgateway():
    objs = render([env_file("staging")], api_versions=PROMETHEUS_OPERATOR_APIS)
    egress = policy(objs, "preprocessing")["egress"]
    minio = [r for r in egress if r.get("ports") == [{"port": 9000, "protocol": "TCP"}]]
    assert minio and "to" not in minio[0]  # any address unless networkPolicy.storageTo narrows it
    pushgateway = [r for r in egress if r.get("ports") == [{"port": 9091, "protocol": "TCP"}]]
    assert pushgateway[0]["to"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/component": "pushgateway", "app.kubernetes.io/instance": "trajflow",
        "app.kubernetes.io/name": "trajflow"}}}]
    narrowed = render([env_file("staging")], {"networkPolicy.storageTo": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]},
                      api_versions=PROMETHEUS_OPERATOR_APIS)
    egress = policy(narrowed, "downloader")["egress"]
    assert {"ports": [{"port": 9000, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]} in egress
    assert not select(render(set_values={"networkPolicy.enabled": False}), "NetworkPolicy")


def test_only_the_release_stages_and_prometheus_reach_the_pushgateway():
    """Anyone reaching the Pushgateway can delete a shard's group (silencing its alerts) or
    push a fake success: its ingress is this release's stage pods, pushgatewayFrom and
    Prometheus (pushgatewayScrapeFrom; scrapes and pushes share its port)."""
    extra = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ci"}}}
    objs = render([env_file("staging")], {"networkPolicy.pushgatewayFrom": [extra]}, api_versions=PROMETHEUS_OPERATOR_APIS)
    pushgateway_pod = one(objs, "Deployment", component="pushgateway")["spec"]["template"]["metadata"]["labels"]
    guarding = [p["spec"] for p in select(objs, "NetworkPolicy")
                if p["spec"]["podSelector"]["matchLabels"].items() <= pushgateway_pod.items()
                and all(pushgateway_pod.get(e["key"]) in e["values"] for e in p["spec"]["podSelector"].get("matchExpressions", []))]
    assert len(guarding) == 1 and guarding[0]["policyTypes"] == ["Ingress"]
    port = [{"port": 9091, "protocol": "TCP"}]
    deny = next(p for p in select(objs, "NetworkPolicy") if p["metadata"]["name"].endswith("-default-deny"))["spec"]
    prometheus = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    assert guarding[0]["ingress"] == [{"from": [{"podSelector": deny["podSelector"]}], "ports": port},
                                      {"from": [extra], "ports": port},
                                      {"from": [prometheus], "ports": port}]
    # no rule lets any pod of the cluster in (as the training pods' metricsFrom does by default)
    assert all(peer != {"namespaceSelector": {}} for rule in guarding[0]["ingress"] for peer in rule["from"])
    # no in-release Pushgateway, nothing to guard
    off = render([env_file("staging")], {"monitoring.pushgateway.enabled": False}, api_versions=PROMETHEUS_OPERATOR_APIS)
    assert not [p for p in select(off, "NetworkPolicy") if p["metadata"]["name"].endswith("-pushgateway")]
    # stages all disabled: the Pushgateway is still guarded, and nothing else is rendered
    alone = render([env_file("staging")], {f"{s}.enabled": False for s in ("downloader", "preprocessing", "training")},
                   api_versions=PROMETHEUS_OPERATOR_APIS)
    assert [p["metadata"]["name"] for p in select(alone, "NetworkPolicy")] == ["trajflow-pushgateway"]


@pytest.mark.parametrize("endpoint, port", [("http://[fd00:10:96::a]", 80), ("https://[fd00::1]", 443),
                                             ("http://[fd00::1]:9000", 9000), ("http://minio:9000", 9000)])
def test_network_policy_ports_of_ipv6_and_ipv4_endpoints(endpoint, port):
    objs = render([env_file("staging")], {"global.storage.s3.endpoint": endpoint}, api_versions=PROMETHEUS_OPERATOR_APIS)
    egress = policy(objs, "downloader")["egress"]
    assert {"ports": [{"port": port, "protocol": "TCP"}]} in egress


def test_a_spread_constraint_keeps_its_own_label_selector():
    """Only a constraint without a labelSelector gets this stage's pods; one that names its
    own (spread against another workload) is kept as written."""
    own = {"matchLabels": {"team": "robotics"}}
    objs = render(values={"downloader": {"topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway",
         "labelSelector": own},
        {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"},
    ]}})
    job = one(objs, "Job", "downloader")
    zone, host = pod_spec(job)["topologySpreadConstraints"]
    assert zone["labelSelector"] == own
    assert host["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "downloader"


def test_the_rendezvous_port_may_not_be_the_last_ranks_metrics_port():
    # production: metricsPort 9400, 8 local ranks, so 9400-9407 are taken and 9408 is free
    with pytest.raises(helm.HelmRenderError, match="rendezvous.port 9407 is one of the /metrics ports 9400-9407"):
        render([env_file("production")], {"training.rendezvous.port": 9407}, api_versions=PROMETHEUS_OPERATOR_APIS)
    objs = render([env_file("production")], {"training.rendezvous.port": 9408}, api_versions=PROMETHEUS_OPERATOR_APIS)
    assert env_of(container(one(objs, "Job", "training"), "train"))["MASTER_PORT"] == "9408"


def test_max_failed_indexes_may_be_every_shard_but_no_more():
    # downloader.shards is 8 by default: the Job's completions
    job = one(render(set_values={"downloader.maxFailedIndexes": 8}), "Job", "downloader")
    assert (job["spec"]["completions"], job["spec"]["maxFailedIndexes"]) == (8, 8)
    with pytest.raises(helm.HelmRenderError, match=r"downloader.maxFailedIndexes \(9\) cannot exceed the Job's 8 completions"):
        render(set_values={"downloader.maxFailedIndexes": 9})


def test_stage_charts_render_on_their_own():
    for stage in ("downloader", "preprocessing"):
        objs = render(chart=SUBCHARTS / stage)
        job = one(objs, "Job", stage)
        assert job["metadata"]["name"].startswith(f"trajflow-{stage}-")
        assert one(objs, "ConfigMap", stage) and one(objs, "ServiceAccount", stage)


def test_notes_say_how_to_watch_and_where_data_lands():
    text = notes([env_file("dev")])
    # Jobs by the chart's release label (ArgoCD may rewrite their instance label), pods by instance
    assert "kubectl -n trajflow get jobs -l trajflow.io/release=trajflow" in text
    assert "kubectl -n trajflow get pods -l app.kubernetes.io/instance=trajflow" in text
    assert "completedIndexes" in text
    assert "file:///data/dev" in text and 'PersistentVolumeClaim "trajflow-data"' in text
    assert "--set downloader.parallelism=16" in text
    assert "A failed Job never starts another pod" in text and "--set downloader.rerun=1" in text
    s3 = notes([env_file("production")], api_versions=PROMETHEUS_OPERATOR_APIS)
    assert "s3://trajflow-production/runs/fleet-2026-q3" in s3
    assert "http://trajflow-pushgateway.trajflow.svc:9091" in s3
    off = notes([env_file("production")], {"monitoring.enabled": False})
    assert "Warning: global.metrics.pushgatewayUrl points at this release's Pushgateway" in off
    assert "push progress metrics to" not in off
    hint = notes(set_values={"monitoring.enabled": True}, api_versions=PROMETHEUS_OPERATOR_APIS)
    assert "global.metrics.pushgatewayUrl is empty" in hint and "trajflow.inReleasePushgatewayUrl" in hint


def test_release_names_that_say_trajflow_are_not_repeated():
    objs = render([env_file("dev")], release="trajflow-fleet")
    assert one(objs, "PersistentVolumeClaim", "storage")["metadata"]["name"] == "trajflow-fleet-data"
    assert one(objs, "ServiceAccount", "downloader")["metadata"]["name"] == "trajflow-fleet-downloader"
    assert one(objs, "Job", "training")["metadata"]["name"].startswith("trajflow-fleet-training-")
    objs = render([env_file("dev")], release="fleet")
    assert one(objs, "PersistentVolumeClaim", "storage")["metadata"]["name"] == "fleet-trajflow-data"
    assert one(objs, "ConfigMap", "preprocessing")["metadata"]["name"].startswith("fleet-trajflow-preprocessing-config-")


def test_network_policy_allows_the_pushgateway_pod_port_not_the_service_port():
    """Policies see the destination pod's port after the Service's translation: with the
    Service on port 80 the pushes still go to the container's 9091."""
    objs = render([env_file("staging")], values={
        "monitoring": {"pushgateway": {"service": {"port": 80}}},
        "global": {"metrics": {"pushgatewayUrl":
                               'http://{{ include "trajflow.pushgatewayServiceName" . }}.{{ .Release.Namespace }}.svc:80'}},
    }, api_versions=PROMETHEUS_OPERATOR_APIS)
    service = one(objs, "Service", "pushgateway")
    assert service["spec"]["ports"][0]["port"] == 80
    container_ports = {p["name"]: p["containerPort"]
                       for p in one(objs, "Deployment", "pushgateway")["spec"]["template"]["spec"]["containers"][0]["ports"]}
    pod_port = container_ports[service["spec"]["ports"][0]["targetPort"]]
    for stage in ("downloader", "preprocessing", "training"):
        rules = [r for r in policy(objs, stage)["egress"]
                 if any("pushgateway" == ((t.get("podSelector") or {}).get("matchLabels") or {}).get("app.kubernetes.io/component")
                        for t in r.get("to", []))]
        assert [r["ports"] for r in rules] == [[{"port": pod_port, "protocol": "TCP"}]], stage


def set_flags(text):
    return dict(re.findall(r"--set (\S+?)=(\S+)", text))


@pytest.mark.parametrize("case", [
    {},
    {"downloader.enabled": False},
    {"downloader.enabled": False, "preprocessing.enabled": False},
    {"downloader.enabled": False, "preprocessing.enabled": False, "training.launcher": "pytorchjob"},
], ids=str)
def test_notes_only_suggest_commands_that_work(case):
    apis = [*PROMETHEUS_OPERATOR_APIS, *KUBEFLOW_APIS]
    text = notes([env_file("production")], case, api_versions=apis)
    # every `--set` the notes suggest passes the schema and renders
    for key, value in set_flags(text).items():
        render([env_file("production")], {**case, key: yaml.safe_load(value)}, api_versions=apis)
    assert "training.parallelism" not in text
    if "downloader.enabled" in case and "preprocessing.enabled" in case:
        assert "parallelism=" not in text
    if case.get("training.launcher") == "pytorchjob":
        # production's training deadline is a week: waiting less would give up on a running Job
        assert "wait --for=condition=Succeeded --timeout=604800s pytorchjob -l" in text
        assert " job -l" not in text.split("block until the last stage is done")[1].split("\n")[1]


def test_notes_wait_as_long_as_the_last_stage_may_run():
    assert "wait --for=condition=Complete --timeout=604800s job -l" in notes([env_file("production")])
    assert "wait --for=condition=Complete --timeout=168h job -l" in notes([env_file("dev")])  # no deadline
    assert "--timeout=3600s job -l" in notes([env_file("dev")], {"training.enabled": False,
                                                                 "preprocessing.activeDeadlineSeconds": 3600})


def test_notes_warn_that_waiting_training_pods_hold_their_gpus():
    text = notes([env_file("production")], api_versions=PROMETHEUS_OPERATOR_APIS)
    assert "--set training.enabled=false" in text and "hold their GPUs (8 each)" in text
    assert "--set training.enabled=false" not in notes([env_file("production")], {"global.argocd.enabled": True},
                                                        api_versions=PROMETHEUS_OPERATOR_APIS)
    assert "--set training.enabled=false" not in notes([env_file("dev")])  # no GPUs


def _without_nulls(node):
    """Helm keeps a default's null in the rendered config; the stages read it as unset."""
    if isinstance(node, dict):
        return {k: _without_nulls(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_without_nulls(v) for v in node]
    return node


@pytest.mark.parametrize("env", ["local", "dev", "staging", "production"])
def test_local_runs_give_each_stage_the_config_its_configmap_holds(env):
    from trajflow.local.pipeline import build_plan

    objs = render([env_file(env)])
    plan = build_plan([env_file(env)])
    assert plan.stages
    for stage in plan.stages:
        in_cluster = yaml.safe_load(one(objs, "ConfigMap", stage.stage)["data"]["config.yaml"])
        local = stage.rendered
        # the in-release Pushgateway a template names is the cluster's: a local run pushes nowhere
        pushed_to = in_cluster["global"]["metrics"].pop("pushgatewayUrl")
        assert local["global"]["metrics"].pop("pushgatewayUrl") in ("", pushed_to)
        assert _without_nulls(local) == _without_nulls(in_cluster), stage.stage


# values the chart's templates refuse (a `fail`, beyond the schema): `trajflow run` refuses them too
REFUSED_BY_BOTH = [
    ({"downloader.maxFailedIndexes": 10}, "downloader.maxFailedIndexes (10) cannot exceed the Job's 4 completions"),
    ({"preprocessing.enabled": False, "training.inputShards": 2}, "training.inputShards (2) must equal downloader.shards (4)"),
    ({"training.config.metricsPort": 65535, "training.nprocPerNode": 2},
     "training.config.metricsPort 65535: local rank i serves port + i, and the last local rank's port 65536 is over 65535"),
    ({"preprocessing.resources.limits.nvidia\\.com/gpu": 2},
     "preprocessing.resources.limits.nvidia.com/gpu is 2, but a preprocessing pod uses one GPU: 1 would sit idle"),
    ({"training.resources.limits.nvidia\\.com/gpu": 1},
     "training.nprocPerNode is 2, but each training pod has 1 GPU(s) (resources.limits.nvidia.com/gpu): 1 local rank(s) "
     "would have no GPU"),
    ({"training.resources.requests.nvidia\\.com/gpu": 1, "training.resources.limits.nvidia\\.com/gpu": 2},
     "training.resources.requests.nvidia.com/gpu is 1, but resources.limits.nvidia.com/gpu is 2: Kubernetes refuses GPU "
     "requests that differ from the limit"),
    ({"preprocessing.resources.requests.nvidia\\.com/gpu": 2},
     "preprocessing.resources.requests.nvidia.com/gpu is 2, but resources.limits.nvidia.com/gpu is 1"),
    ({"training.resources.requests.nvidia\\.com/mig-1g\\.10gb": 1},
     "training.resources.requests.nvidia.com/mig-1g.10gb is 1, but resources.limits.nvidia.com/mig-1g.10gb is unset"),
    ({"training.resources.limits.nvidia\\.com/gpu": "0.5"},
     "training.resources.limits.nvidia.com/gpu is 0.5: GPUs are whole devices"),
    ({"training.resources.limits.nvidia\\.com/mig-1g\\.10gb": 2},
     "training.resources.limits asks for 2 MIG slices, but a CUDA process sees one: 1 would sit idle"),
    ({"downloader.resources.requests.cpu": 3},
     "downloader.resources.requests.cpu (3) is more than resources.limits.cpu (2)"),
    ({"training.shm.sizeLimit": "200000000000"},
     "training.shm.sizeLimit (200000000000) is more than training.resources.limits.memory (128Gi): /dev/shm counts "
     "against that limit, so the container is OOM-killed before its shm fills"),
    ({"preprocessing.shm.sizeLimit": "40000000000"},
     "preprocessing.shm.sizeLimit (40000000000) is more than preprocessing.resources.limits.memory (32Gi)"),
    ({"preprocessing.waitResources.requests.cpu": "2"},
     "preprocessing.waitResources.requests.cpu (2) is more than waitResources.limits.cpu (500m): Kubernetes refuses "
     "such pods, and the Job would start none"),
    ({"training.resources.limits.nvidia\\.com/gpu\\.shared": "0.5"},
     "training.resources.limits.nvidia.com/gpu.shared is 0.5: GPUs are whole devices"),
    ({"training.resources.limits.nvidia\\.com/gpu": 4},
     "training.nprocPerNode is 2, but each training pod has 4 GPUs (resources.limits.nvidia.com/gpu): 2 would sit idle"),
    ({"training.config.observation": "observation.stat"},
     "training.config.observation 'observation.stat' is not a stream preprocessing writes (action, observation.state): "
     "the shards hold preprocessing.config.streams, renamed by preprocessing.config.renames"),
    ({"preprocessing.config.renames.action": "target", "training.config.action": "action"},
     "training.config.action 'action' is not a stream preprocessing writes (observation.state, target)"),
    ({"preprocessing.config.renames.observation": "obs"},
     "preprocessing.config: renames: 'observation' is not one of the streams read (action, observation.state)"),
    ({"preprocessing.config.renames.action": "observation.state", "training.enabled": False},
     "preprocessing.config: streams/renames map several raw streams onto 'observation.state'"),
    ({"preprocessing.config.renames.action": "", "training.enabled": False},
     "preprocessing.config: streams/renames: '' cannot name a stream"),
]


@pytest.mark.parametrize("overrides, message", REFUSED_BY_BOTH, ids=[m.split(" ")[0] for _, m in REFUSED_BY_BOTH])
def test_what_the_chart_refuses_a_local_run_refuses(overrides, message):
    import helm_python as helm

    from trajflow.errors import ConfigError
    from trajflow.local.pipeline import build_plan

    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render([env_file("local")], overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_plan([env_file("local")], [f"{key}={str(value).lower()}" for key, value in overrides.items()])


@pytest.mark.parametrize("values, message", [
    ({"training": {"shm": {"sizeLimit": 2e11}}},
     "training.shm.sizeLimit (2e+11) is more than training.resources.limits.memory (128Gi)"),
    ({"downloader": {"resources": {"requests": {"memory": 5e9}, "limits": {"memory": "4Gi"}}}},
     "downloader.resources.requests.memory (5e+09) is more than resources.limits.memory (4Gi)"),
])
def test_quantities_written_as_large_numbers_are_compared_too(values, message):
    """A large number in a values file reaches the templates as a float, printed in exponent
    form (2e+11): a Kubernetes quantity still, which the resource checks read."""
    import helm_python as helm

    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values=values)


def test_a_download_with_no_source_is_refused_by_both(tmp_path):
    """The chart's default names none: every download pod would exit 2 at its start."""
    import helm_python as helm

    from trajflow.errors import ConfigError
    from trajflow.local.pipeline import build_plan

    message = "downloader.config.sources is empty: name at least one source to download (or set downloader.enabled=false)"
    values = {"downloader": {"config": {"sources": []}}}
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values=values)
    (tmp_path / "none.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_plan([env_file("local"), tmp_path / "none.yaml"], [])
    assert not select(render(values={**values, "downloader": {**values["downloader"], "enabled": False}}), "Job", "downloader")


@pytest.mark.parametrize("key", ["observation", "action", "task"])
def test_a_training_stream_set_to_null_is_checked_as_its_models_default(key):
    """Null removes the key from the ConfigMap and the workload takes its model's default; the
    install-time stream check did the same, instead of refusing '<nil>'."""
    from trajflow.config import TrainConfig
    from trajflow.local.pipeline import build_plan

    assert render([env_file("local")], {f"training.config.{key}": None})
    plan = build_plan([env_file("local")], [f"training.config.{key}=null"])
    assert getattr(plan.stage("training").config, key) == TrainConfig.model_fields[key].default
    template = (CHART / "templates" / "validate.yaml").read_text()
    assert f'"{key}" "{TrainConfig.model_fields[key].default}"' in template  # the template's copy of the default


@pytest.mark.parametrize("source, message", [
    ({"renames": {"zz": "a"}}, "sources.demo.renames: 'zz' is not one of the streams read (action, observation.state)"),
    ({"streams": ["action", "observation.state"], "renames": {"action": "observation.state"}},
     "sources.demo.streams/renames map several raw streams onto 'observation.state'"),
    # every pod would exit 2 at its start
    ({"streams": ["observation.state"]},
     "sources.demo.streams/renames give the output streams (observation.state), the top level gives (action, "
     "observation.state): every source must give the same ones"),
    ({"renames": {"action": "act"}},
     "sources.demo.streams/renames give the output streams (act, observation.state), the top level gives (action, "
     "observation.state)"),
    ({"streams": ["observation.state", "action", "extra"]},
     "sources.demo.streams/renames give the output streams (action, extra, observation.state)"),
    ({"renames": {"action": ""}}, "sources.demo.streams/renames: '' cannot name a stream"),
    ({"renames": {"action": "__metadata__"}},
     "sources.demo.streams/renames: '__metadata__' cannot name a stream (the shard format keeps it for its index)"),
])
def test_a_sources_own_rename_rules_are_refused_by_both(tmp_path, source, message):
    import helm_python as helm

    from trajflow.errors import ConfigError
    from trajflow.local.pipeline import build_plan

    values = {"preprocessing": {"config": {"sources": {"demo": source}}}}
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render([env_file("local")], values=values)
    (tmp_path / "renames.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_plan([env_file("local"), tmp_path / "renames.yaml"], [])


def test_a_local_run_hands_its_stages_strings_as_strings(tmp_path):
    """The stage reads the plan's file as Helm reads YAML: y, n, 08 and 1e5 unquoted would be a
    boolean and numbers there, and the stage would refuse the setting the plan accepted."""
    from trajflow.config.loader import load_config_file
    from trajflow.local.pipeline import build_plan

    (tmp_path / "robot.yaml").write_text("preprocessing:\n  config:\n    robot: 'y'\n    timeKey: '1e5'\n")
    stage = build_plan([env_file("local"), tmp_path / "robot.yaml"], []).stage("preprocessing")
    (tmp_path / "config.yaml").write_bytes(stage.rendered_yaml)
    config = load_config_file(tmp_path / "config.yaml", "preprocessing")[1]
    assert (config.robot, config.time_key) == ("y", "1e5")


@pytest.mark.parametrize("key, value", [
    ("global.storage.s3.endpoint", "http://minio.minio.svc.cluster.local.:9000"),  # no DNS search domains
    ("global.metrics.pushgatewayUrl", "http://pushgateway.{{.Release.Namespace}}.svc:9091"),
    ("global.storage.s3.endpoint", "http://[fd00::a]:9000"),
])
def test_urls_users_write_are_accepted_by_both(key, value):
    from trajflow.local.pipeline import build_plan

    assert render([env_file("local")], {key: value})
    assert build_plan([env_file("local")], [f"{key}={value}"]).stages


def test_https_hosts_urllib3_takes_are_accepted_by_both(tmp_path):
    from trajflow.local.pipeline import build_plan

    values = {"downloader": {"config": {"sources": [
        {"type": "https", "name": "legacy", "urls": ["https://legacy_bucket.s3.amazonaws.com/a.bin"]},
        {"type": "catalog", "name": "hub", "urlTemplate": "https://{cohort}.hub.example/download/{file}.gz",
         "cohorts": ["BRCA"], "categories": {"expr": "HiSeqV2"}}]}}}
    assert render([env_file("local")], values=values)
    (tmp_path / "hosts.yaml").write_text(yaml.safe_dump(values))
    assert build_plan([env_file("local"), tmp_path / "hosts.yaml"], []).stage("downloader")


@pytest.mark.parametrize("config", [{"renames": {"gone": None}}, {"sources": {"demo": {"renames": {"gone": None}}}}])
def test_a_rename_dropped_with_null_is_accepted_by_both(tmp_path, config):
    """A null drops a rename another values file made: no stream need have its name."""
    from trajflow.local.pipeline import build_plan

    values = {"preprocessing": {"config": config}}
    assert render([env_file("local")], values=values)
    (tmp_path / "dropped.yaml").write_text(yaml.safe_dump(values))
    assert build_plan([env_file("local"), tmp_path / "dropped.yaml"], []).stage("preprocessing")


def test_a_source_token_given_as_a_plain_value_is_refused_by_both(tmp_path):
    import helm_python as helm

    from trajflow.errors import ConfigError
    from trajflow.local.pipeline import build_plan

    hub = {"type": "https", "name": "hub", "urls": ["https://hub.example/a.bin"], "authTokenEnv": "HUB_BEARER"}
    values = {"downloader": {"config": {"sources": [hub]}, "extraEnv": [{"name": "HUB_BEARER", "value": "plain"}]}}
    message = "downloader.extraEnv: HUB_BEARER holds a source's secret: give it with valueFrom.secretKeyRef"
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render([env_file("local")], values=values)
    (tmp_path / "token.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_plan([env_file("local"), tmp_path / "token.yaml"], [])
    values["downloader"]["extraEnv"] = [{"name": "HUB_BEARER", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}}]
    (tmp_path / "token.yaml").write_text(yaml.safe_dump(values))
    assert build_plan([env_file("local"), tmp_path / "token.yaml"], []).stage("downloader")


@pytest.mark.parametrize("key, value", [
    ("global.storage.s3.endpoint", "http://minio:abc"),  # no port: Helm's urlParse failed naming no key
    ("global.storage.s3.endpoint", "http://minio:99999"),  # a NetworkPolicy port the API server refuses
    ("global.storage.s3.endpoint", "http://minio:0"),
    ("global.metrics.pushgatewayUrl", "http://pg:9091\n"),  # Go's $ is the end of the text, Python's not
    ("downloader.priorityClassName", "high\n"),
])
def test_malformed_strings_are_refused_by_both_naming_the_key(key, value):
    import helm_python as helm

    from trajflow.errors import ConfigError
    from trajflow.local.pipeline import build_plan

    with pytest.raises(helm.HelmError, match=re.escape(f"at '/{key.replace('.', '/')}'".replace("/downloader/", "/"))):
        render([env_file("local")], {key: value})
    with pytest.raises(ConfigError, match=re.escape(f"{key}: ")):
        build_plan([env_file("local")], [f"{key}={value}"])


def test_a_pytorchjobs_max_failed_indexes_is_not_a_jobs():
    from trajflow.local.pipeline import build_plan

    overrides = {"training.maxFailedIndexes": 2, "training.launcher": "pytorchjob"}
    assert select(render([env_file("local")], overrides, api_versions=KUBEFLOW_APIS), "PyTorchJob")
    assert build_plan([env_file("local")], [f"{k}={v}" for k, v in overrides.items()]).stage("training")


def test_the_readme_s_cpu_recipe_leaves_no_gpu_in_the_pods():
    """README's troubleshooting recipe for a stage on CPU, applied to the production values:
    no GPU limit, device or Triton pin, and no GPU node placement left to wait for."""
    readme = (ROOT / "README.md").read_text()
    recipe = readme[readme.index("To run a stage\non CPU"):]
    block = recipe[recipe.index("```bash"):recipe.index("```", recipe.index("```bash") + 7)]
    pairs = dict(re.findall(r"--set '?([^=\s']+)=([^\s'\\]*)'?", block))
    assert len(pairs) == 6, pairs
    objs = render([env_file("production")], {k: None if v == "null" else v for k, v in pairs.items()})
    job = one(objs, "Job", "preprocessing")
    spec = pod_spec(job)
    assert not any(k in spec for k in ("nodeSelector", "runtimeClassName", "tolerations")), spec
    resources = spec["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in {**resources.get("limits", {}), **resources.get("requests", {})}
    config = yaml.safe_load(one(objs, "ConfigMap", "preprocessing")["data"]["config.yaml"])["config"]
    assert config["device"] == "cpu" and config["backend"] == "auto"


@pytest.mark.parametrize("values", [
    # a rename makes the name training asks for
    {"preprocessing": {"config": {"renames": {"observation.state": "obs"}}},
     "training": {"config": {"observation": "obs"}}},
    # a rename dropped with null (Helm keeps the null: the chart's defaults have no such key)
    {"preprocessing": {"config": {"renames": {"observation.state": None}}}},
    # forecasting reads no action
    {"training": {"config": {"task": "forecast", "action": "no.such.stream"}}},
    # without preprocessing, what the shards hold is not in these values
    {"preprocessing": {"enabled": False}, "training": {"config": {"observation": "obs"}}},
], ids=["renamed", "rename-dropped", "forecast", "no-preprocessing"])
def test_a_training_stream_preprocessing_writes_is_accepted_by_both(tmp_path, values):
    from trajflow.local.pipeline import build_plan

    extra = tmp_path / "streams.yaml"
    extra.write_text(yaml.safe_dump(values))
    assert one(render([env_file("local"), extra]), "Job", "training")
    assert build_plan([env_file("local"), extra]).stage("training")


def test_a_file_source_path_is_the_pods_for_the_chart(tmp_path):
    """On a cluster a file source's path is inside the pod (a mounted volume): the chart
    renders it whether or not this machine has it."""
    extra = tmp_path / "source.yaml"
    extra.write_text(yaml.safe_dump({"downloader": {"config": {"sources": [
        {"type": "file", "name": "demo", "path": str(tmp_path / "nonexist")}]}}}))
    assert one(render([env_file("local"), extra]), "Job", "downloader")


def test_the_tmp_request_can_be_left_to_the_cluster():
    # Kueue admits no workload that asks for a resource its ClusterQueue does not cover
    objs = render([env_file("production")], {f"{s}.tmp.requestStorage": False for s in ("downloader", "training")},
                  api_versions=PROMETHEUS_OPERATOR_APIS)
    for stage in ("downloader", "training"):
        assert "ephemeral-storage" not in pod_spec(one(objs, "Job", stage))["containers"][0]["resources"]["requests"]
    assert pod_spec(one(objs, "Job", "preprocessing"))["containers"][0]["resources"]["requests"][
        "ephemeral-storage"] == "100Gi"
