"""Every values file renders, every object is valid Kubernetes, and every pod keeps the
chart's contract with the workloads and its security rules."""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

import pytest
import yaml
from helmrender import (
    ENVIRONMENTS,
    KUBEFLOW_APIS,
    OLDEST_KUBE,
    PROMETHEUS_OPERATOR_APIS,
    RELEASE,
    STAGE_CHARTS,
    SUPPORTED_KUBE,
    env_file,
    helm,
    one,
    pod_spec,
    render,
    select,
)

kv = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate is not installed")

# Custom resources kubernetes-validate has no schema for; their shape is tested elsewhere.
CUSTOM_RESOURCE_GROUPS = {"monitoring.coreos.com", "kubeflow.org"}
STANDARD_LABELS = (
    "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
    "app.kubernetes.io/component", "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by", "helm.sh/chart",
)
WORKLOAD_KINDS = ("Job", "PyTorchJob", "Deployment")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def render_env(env: str, kube: str = SUPPORTED_KUBE[-1], **kwargs):
    # Clusters with the Prometheus operator and the training operator: every object renders.
    return render([env_file(env)], api_versions=[*PROMETHEUS_OPERATOR_APIS, *KUBEFLOW_APIS], kube_version=kube, **kwargs)


@pytest.fixture(scope="module", params=ENVIRONMENTS)
def env_objects(request):
    return request.param, render_env(request.param)


def test_the_supported_kubernetes_versions_are_known_to_the_validator():
    known = kv.all_versions()
    assert OLDEST_KUBE in known and SUPPORTED_KUBE[-1] in known, known
    assert tuple(int(p) for p in OLDEST_KUBE.split(".")[:2]) >= (1, 31), "Elastic Indexed Jobs need 1.31"
    # The chart says the same to Helm (kubeVersion) as the tests do.
    chart = yaml.safe_load((Path(__file__).resolve().parents[2] / "charts/trajflow/Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={OLDEST_KUBE}-0"


@pytest.mark.parametrize("kube", SUPPORTED_KUBE)
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_object_validates_strictly(env, kube):
    objs = render_env(env, kube=kube)
    assert objs, f"{env}: nothing rendered"
    checked = 0
    for obj in objs:
        group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
        if group in CUSTOM_RESOURCE_GROUPS:
            continue
        try:
            kv.validate(obj, kube, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{env} on {kube}: {obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}")
        checked += 1
    assert checked >= 10, f"{env}: only {checked} objects validated"


def test_every_environment_runs_every_stage(env_objects):
    env, objs = env_objects
    kinds = {(o["kind"], o["metadata"]["labels"]["app.kubernetes.io/component"]) for o in objs}
    for stage in STAGE_CHARTS:
        assert ("Job", stage) in kinds or ("PyTorchJob", stage) in kinds, f"{env}: no {stage} workload"
        assert ("ConfigMap", stage) in kinds and ("ServiceAccount", stage) in kinds


def test_standard_labels_and_names(env_objects):
    env, objs = env_objects
    names = set()
    for obj in objs:
        meta = obj["metadata"]
        key = (obj["kind"], meta["name"])
        assert key not in names, f"{env}: {key} rendered twice"
        names.add(key)
        assert len(meta["name"]) <= 63 and DNS_LABEL.match(meta["name"]), f"{env}: bad name {meta['name']}"
        assert meta.get("namespace") == "trajflow", f"{env}: {key} has no namespace"
        labels = meta.get("labels") or {}
        missing = [label for label in STANDARD_LABELS if label not in labels]
        assert not missing, f"{env}: {key} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/part-of"] == "trajflow"
        assert all(LABEL_VALUE.match(str(v)) and len(str(v)) <= 63 for v in labels.values()), labels


def test_pods_are_locked_down(env_objects):
    env, objs = env_objects
    workloads = [o for o in objs if o["kind"] in WORKLOAD_KINDS]
    assert workloads
    for obj in workloads:
        spec = pod_spec(obj) if obj["kind"] != "Deployment" else obj["spec"]["template"]["spec"]
        where = f"{env}: {obj['kind']}/{obj['metadata']['name']}"
        assert spec["automountServiceAccountToken"] is False, where
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["seccompProfile"]["type"] == "RuntimeDefault", where
        # the volumes are the image's group's (65532), or the non-root process cannot write its data
        assert (pod_sc["fsGroup"], pod_sc["fsGroupChangePolicy"]) == (65532, "OnRootMismatch"), where
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, f"{where}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, f"{where}/{c['name']}"
            assert sc["capabilities"]["drop"] == ["ALL"], f"{where}/{c['name']}"
            assert sc.get("privileged", False) is False
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0
            limits, requests = c["resources"].get("limits", {}), c["resources"].get("requests", {})
            assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests), f"{where}/{c['name']}"


def test_a_pod_level_uid_reaches_every_container():
    """OpenShift-style UID ranges: podSecurityContext.runAsUser must not be overridden by a
    container-level default."""
    uid = {"runAsUser": 1000680000, "runAsGroup": 1000680000}
    objs = render(set_values={**{f"{s}.podSecurityContext": uid for s in STAGE_CHARTS},
                              "monitoring.enabled": True, "monitoring.pushgateway.podSecurityContext": uid})
    workloads = [o for o in objs if o["kind"] in WORKLOAD_KINDS]
    assert {o["kind"] for o in workloads} >= {"Job", "Deployment"}
    for obj in workloads:
        spec = pod_spec(obj) if obj["kind"] != "Deployment" else obj["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsUser"] == 1000680000
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            assert "runAsUser" not in c["securityContext"] and "runAsGroup" not in c["securityContext"], c["name"]


def test_stage_pods_follow_the_workload_contract(env_objects):
    _, objs = env_objects
    for stage in STAGE_CHARTS:
        for workload in [*select(objs, "Job", stage), *select(objs, "PyTorchJob", stage)]:
            spec = pod_spec(workload)
            config_map = select(objs, "ConfigMap", stage)[0]
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
            assert "emptyDir" in volumes["tmp"]
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                env_vars = {e["name"]: e.get("value") for e in c["env"]}
                assert env_vars["TRAJFLOW_CONFIG"] == "/etc/trajflow/config.yaml"
                assert env_vars["HOME"] == "/tmp" and env_vars["TMPDIR"] == "/tmp"
                completions = workload["spec"].get("completions") or spec_nodes(workload)
                assert env_vars["TRAJFLOW_SHARDS"] == str(completions)
                assert env_vars["TRAJFLOW_NAMESPACE"] == workload["metadata"]["namespace"]  # in the push grouping key
                assert env_vars["TRAJFLOW_RELEASE"] == "trajflow"  # as well
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                assert mounts["/etc/trajflow"] == "config" and mounts["/tmp"] == "tmp"
                assert "--config" in c["args"] and "/etc/trajflow/config.yaml" in c["args"]
                # `kubectl describe` shows a failed container's last line, which says why
                assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
                # the release's downloader config, from the umbrella's ConfigMap: the stages after
                # the downloader read what it names, and a download pod whether its Job is replaced
                assert env_vars["TRAJFLOW_DATASET_CONFIG"] == "/etc/trajflow-dataset/config.yaml"
                assert mounts["/etc/trajflow-dataset"] == "trajflow-dataset"
            assert volumes["trajflow-dataset"]["configMap"] == {"name": f"{RELEASE}-dataset", "optional": True}


def spec_nodes(workload):
    replicas = workload["spec"]["pytorchReplicaSpecs"]
    return sum(r["replicas"] for r in replicas.values())


@pytest.mark.parametrize("env", [e for e in ENVIRONMENTS])
def test_rendered_config_files_load_in_the_workloads(env, tmp_path):
    """The ConfigMap is exactly what `trajflow <stage> --config` reads: global + config."""
    from trajflow.config import loader
    objs = render_env(env)
    for stage in STAGE_CHARTS:
        data = select(objs, "ConfigMap", stage)[0]["data"]
        assert list(data) == ["config.yaml"]
        doc = yaml.safe_load(data["config.yaml"])
        assert sorted(doc) == ["config", "global"]
        path = tmp_path / f"{stage}.yaml"
        path.write_text(data["config.yaml"])
        glob, config = loader.load_config_file(path, stage)
        assert glob.run_id == yaml.safe_load(env_file(env).read_text())["global"]["runId"]
        assert config is not None


@pytest.mark.parametrize("env", [e for e in ENVIRONMENTS])
def test_the_dataset_configmap_names_the_download_the_downloader_makes(env, tmp_path):
    """The stages after the downloader wait for manifests of the generation the dataset
    ConfigMap's config gives: it must be the one the download pods compute from their own."""
    from trajflow.config import loader
    objs = render_env(env)
    dataset = one(objs, "ConfigMap", "pipeline")
    assert dataset["metadata"]["name"] == f"{RELEASE}-dataset"
    (tmp_path / "dataset.yaml").write_text(dataset["data"]["config.yaml"])
    (tmp_path / "downloader.yaml").write_text(select(objs, "ConfigMap", "downloader")[0]["data"]["config.yaml"])
    _, own = loader.load_config_file(tmp_path / "downloader.yaml", "downloader")
    env_vars = {loader.DATASET_CONFIG_ENV: str(tmp_path / "dataset.yaml")}
    assert own.sources
    assert loader.expected_download_generation(env=env_vars) == own.generation_id()
    # the preprocessing pod's settings carry it (the ConfigMap it mounts and its own config)
    (tmp_path / "preprocessing.yaml").write_text(select(objs, "ConfigMap", "preprocessing")[0]["data"]["config.yaml"])
    settings = loader.stage_settings("preprocessing", tmp_path / "preprocessing.yaml", env=env_vars)
    assert settings.download_generation == own.generation_id()
    # each stage's pods know their own attempt, and the waits the release's (a failed shard
    # whose stage the release reruns is waited for; one it does not, given up on)
    reruns = {"downloader": 0, "preprocessing": 0}
    assert loader.wanted_reruns(env_vars) == reruns
    for stage, rerun in reruns.items():
        stage_env = {e["name"]: e.get("value") for e in pod_spec(one(objs, "Job", stage))["containers"][0]["env"]}
        assert stage_env["TRAJFLOW_RERUN"] == str(rerun)
    # and the download pods of this release's Job find it names their download (a replaced
    # Job's, still running, would not)
    job_env = {e["name"]: e.get("value") for e in pod_spec(one(objs, "Job", "downloader"))["containers"][0]["env"]}
    download = loader.stage_settings("downloader", tmp_path / "downloader.yaml",
                                     env={"JOB_COMPLETION_INDEX": "0", "TRAJFLOW_SHARDS": job_env["TRAJFLOW_SHARDS"]})
    assert loader.wanted_download(env_vars) == (download.shards, own.generation_id())


def test_a_raised_rerun_reaches_the_dataset_configmap_and_the_stages_pods(tmp_path):
    from trajflow.config import loader

    objs = render(set_values={"downloader.rerun": 2, "preprocessing.rerun": 1})
    (tmp_path / "dataset.yaml").write_text(one(objs, "ConfigMap", "pipeline")["data"]["config.yaml"])
    assert loader.wanted_reruns({loader.DATASET_CONFIG_ENV: str(tmp_path / "dataset.yaml")}) == \
        {"downloader": 2, "preprocessing": 1}
    for stage, rerun in (("downloader", "2"), ("preprocessing", "1"), ("training", "0")):
        env = {e["name"]: e.get("value") for e in pod_spec(one(objs, "Job", stage))["containers"][0]["env"]}
        assert env["TRAJFLOW_RERUN"] == rerun


@pytest.mark.parametrize("disabled", ["downloader", "preprocessing"])
def test_no_dataset_configmap_without_a_download_being_preprocessed(disabled):
    """Without the downloader any download will do; without preprocessing nothing would
    remake the shards, and training takes those there are."""
    objs = render([env_file("dev")], set_values={f"{disabled}.enabled": False})
    assert not [c for c in select(objs, "ConfigMap") if c["metadata"]["name"].endswith("-dataset")]
    downstream = "training" if disabled == "preprocessing" else "preprocessing"
    volumes = {v["name"]: v for v in pod_spec(select(objs, "Job", downstream)[0])["volumes"]}
    assert volumes["trajflow-dataset"]["configMap"]["optional"] is True  # the pods start without it


def test_each_job_keeps_the_config_it_was_made_with():
    """An upgrade to a new runId replaces the Jobs; the old ones (alive until pruned) must
    go on reading the old config, so each config has its own ConfigMap, named by content."""
    def configs(run_id, size="100Gi"):
        objs = render([env_file("dev")], values={"global": {"runId": run_id, "storage": {"pvc": {"size": size}}}})
        maps = {c["metadata"]["name"]: c["data"]["config.yaml"] for c in select(objs, "ConfigMap")}
        used = {}
        for stage in STAGE_CHARTS:
            volumes = {v["name"]: v for v in pod_spec(select(objs, "Job", stage)[0])["volumes"]}
            name = volumes["config"]["configMap"]["name"]
            used[stage] = (name, yaml.safe_load(maps[name])["global"]["runId"])
        return used

    old, new = configs("one"), configs("two")
    for stage in STAGE_CHARTS:
        assert old[stage][1] == "one" and new[stage][1] == "two"
        assert old[stage][0] != new[stage][0]
    assert configs("one", size="200Gi") == old  # the same config keeps its name (the PVC is not in it)


def test_the_shared_volume_is_mounted_where_global_says(env_objects):
    env, objs = env_objects
    values = yaml.safe_load(env_file(env).read_text())
    storage = values["global"]["storage"]
    for stage in STAGE_CHARTS:
        workload = select(objs, "Job", stage)[0]
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec["volumes"]}
        if storage["type"] == "s3":
            assert "data" not in volumes
            continue
        claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
        assert select(objs, "PersistentVolumeClaim")[0]["metadata"]["name"] == claim
        path = storage.get("filesystem", {}).get("path", "/data")
        main = spec["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
        if path.startswith("/"):
            assert mounts["data"] == path
        else:
            # trajflow run's relative path: relative to the working directory, / in pods
            assert mounts["data"] == posixpath.normpath("/" + path)
            assert main["workingDir"] == "/"


def _strict_errors(objs) -> list[str]:
    errors = []
    for obj in objs:
        if obj["apiVersion"].split("/")[0] in CUSTOM_RESOURCE_GROUPS:
            continue
        try:
            kv.validate(obj, SUPPORTED_KUBE[-1], strict=True)
        except kv.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")
    return errors


# valid object names that YAML reads as a number, a boolean or null unless quoted
NUMBER_LIKE_NAMES = ("123", "1e3", "true", "null")


@pytest.mark.parametrize("name", NUMBER_LIKE_NAMES)
def test_names_that_read_as_numbers_stay_strings(name):
    common = {f"{stage}.{key}": name for stage in STAGE_CHARTS
              for key in ("priorityClassName", "runtimeClassName", "serviceAccount.name")}
    common.update({"global.imagePullSecrets": [{"name": name}], "monitoring.enabled": True,
                   "monitoring.pushgateway.priorityClassName": name,
                   "monitoring.pushgateway.serviceAccount.name": name,
                   "monitoring.pushgateway.persistence.enabled": True,
                   "monitoring.pushgateway.persistence.existingClaim": name})
    on_s3 = render([env_file("production")], set_values={**common, "global.storage.s3.existingSecret": name})
    on_claim = render([env_file("dev")], set_values={**common, "global.storage.pvc.existingClaim": name,
                                                     "global.storage.pvc.create": False})
    assert not _strict_errors(on_s3) and not _strict_errors(on_claim)
    for objs in (on_s3, on_claim):
        for workload in [*(select(objs, "Job", stage)[0] for stage in STAGE_CHARTS),
                         one(objs, "Deployment", "pushgateway")]:
            spec = pod_spec(workload)
            assert spec["serviceAccountName"] == name and spec["priorityClassName"] == name
            assert spec["imagePullSecrets"] == [{"name": name}] or workload["kind"] == "Deployment"
    pod = pod_spec(select(on_s3, "Job", "downloader")[0])
    assert pod["runtimeClassName"] == name
    assert {"secretRef": {"name": name}} in pod["containers"][0]["envFrom"]
    claims = {v["persistentVolumeClaim"]["claimName"] for objs in (on_claim,) for w in select(objs, "Job")
              for v in pod_spec(w)["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {name}


def test_a_data_path_is_taken_whole():
    objs = render([env_file("dev")], set_values={"global.storage.filesystem.path": "/data #1"})
    mounts = {m["name"]: m["mountPath"] for m in pod_spec(select(objs, "Job", "preprocessing")[0])["containers"][0]["volumeMounts"]}
    assert mounts["data"] == "/data #1"


def test_a_home_relative_data_path_is_refused():
    # `trajflow run` reads ~ as the user's home; a pod would write into its own /tmp
    with pytest.raises(helm.HelmError, match=r"global.storage.filesystem.path \"~/trajflow-data\" starts with ~.*/tmp"):
        render([env_file("dev")], set_values={"global.storage.filesystem.path": "~/trajflow-data"})


@pytest.mark.parametrize("key,value", [
    ("preprocessing.config.robot", "arm\x7f"),
    ("global.storage.filesystem.path", "/data\u009f"),
    ("downloader.config.sources", [{"name": "a", "type": "file", "path": "/src\uffff"}]),
    ("preprocessing.podAnnotations", {"note": "\u0080"}),
])
def test_a_value_helm_cannot_write_as_yaml_fails_the_render(key, value):
    # Helm's toYaml writes "" for these characters: an empty config would run a pod on the
    # defaults, an empty annotations block would drop them, without a word
    with pytest.raises(helm.HelmError, match=r"cannot be written as YAML.*U\+007F to U\+009F"):
        render([env_file("dev")], set_values={key: value})


@pytest.mark.parametrize("key", ["global.storage.s3.existingSecret", "global.storage.pvc.existingClaim",
                                 "monitoring.pushgateway.persistence.existingClaim"])
def test_names_cannot_carry_yaml(key):
    with pytest.raises(helm.HelmValuesError, match=key.split(".")[-1]):
        render([env_file("dev")], set_values={key: "x\n  configMapRef:\n    name: other", "monitoring.enabled": True})


def test_the_dns_rule_follows_the_ports_dns_answers_on():
    # OpenShift's DNS pods answer on 5353 behind the Service's 53, and the policy sees the pod's port
    def dns_ports(objs):
        egress = next(p for p in select(objs, "NetworkPolicy") if p["metadata"]["name"].endswith("-downloader"))
        rule = egress["spec"]["egress"][0]
        return sorted((p["protocol"], p["port"]) for p in rule["ports"])

    assert dns_ports(render([env_file("dev")])) == [("TCP", 53), ("UDP", 53)]
    assert dns_ports(render([env_file("dev")], {"networkPolicy.dnsPorts": [5353, 53]})) == [
        ("TCP", 53), ("TCP", 5353), ("UDP", 53), ("UDP", 5353)]
    with pytest.raises(helm.HelmError, match="dnsPorts"):
        render([env_file("dev")], {"networkPolicy.dnsPorts": []})


def test_preprocessing_has_room_to_spill_a_shard_as_large_as_training_caches(env_objects):
    """A preprocessing shard whose frames outgrow spoolMemoryMib spills into the pod's /tmp, up
    to 90% of its sizeLimit (beyond, the shard fails for good); a training pod on S3 caches
    every shard in its own /tmp. Shards that training has room for must fit preprocessing's."""
    from trajflow.resources import parse_bytes

    env, objs = env_objects
    jobs = {stage: select(objs, "Job", stage) for stage in ("preprocessing", "training")}
    if not all(jobs.values()) or yaml.safe_load(env_file(env).read_text())["global"]["storage"]["type"] != "s3":
        pytest.skip(f"{env}: training reads the shards in place")

    def tmp_limit(job):
        return parse_bytes(next(v for v in pod_spec(job)["volumes"] if v["name"] == "tmp")["emptyDir"]["sizeLimit"])

    shards = jobs["preprocessing"][0]["spec"]["completions"]
    assert tmp_limit(jobs["preprocessing"][0]) >= tmp_limit(jobs["training"][0]) / shards
