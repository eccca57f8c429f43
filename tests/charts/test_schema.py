"""values.schema.json: generated parts match the models, good values pass, bad values are
rejected with a message that names the key at fault."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helmrender import (
    CHART,
    ENVIRONMENTS,
    KUBEFLOW_APIS,
    PROMETHEUS_OPERATOR_APIS,
    ROOT,
    STAGE_CHARTS,
    SUBCHARTS,
    env_file,
    helm,
    one,
    render,
)

SYNC = ROOT / "ci" / "scripts" / "sync_config_schema.py"


def test_checked_in_schemas_match_trajflow_schema():
    """Fails when a model in trajflow.config changed and `make schema` was not run."""
    import trajflow.config.cli  # noqa: F401  (a moved or broken module must fail here, not skip)
    proc = subprocess.run([sys.executable, str(SYNC), "--check"], check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_config_parts_are_what_trajflow_schema_prints():
    """The drift check compares like with like: the embedded blocks are the CLI's output."""
    import trajflow.config.cli  # noqa: F401  (a moved or broken module must fail here, not skip)
    console_script = Path(sys.executable).with_name("trajflow")
    cmd = [str(console_script)] if console_script.exists() else [sys.executable, "-m", "trajflow.cli"]
    printed = json.loads(subprocess.run([*cmd, "schema"], capture_output=True, text=True, check=True).stdout)

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ("title", "discriminator", "description")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    for stage in STAGE_CHARTS:
        schema = json.loads((SUBCHARTS / stage / "values.schema.json").read_text())
        assert strip(schema["properties"]["config"]) == strip(printed[stage]), stage
    umbrella = json.loads((CHART / "values.schema.json").read_text())
    embedded = strip(umbrella["properties"]["global"])
    embedded.pop("allOf")  # the chart's own constraints on top of the model
    assert embedded == strip(printed["global"])


def test_schemas_are_closed_where_the_chart_owns_the_shape():
    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and path[-1:] != ["if"]:
                where = "/".join(path)
                assert node.get("additionalProperties") is False or any(where.endswith(o) for o in OPEN_OBJECTS), where
            for key, child in node.items():
                walk(child, [*path, key])
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, [*path, str(i)])

    # Kubernetes volumes (any volume source) and the umbrella's view of a subchart's values.
    OPEN_OBJECTS = ("properties/extraVolumes/items", *(f"trajflow/properties/{s}" for s in
                                                         (*STAGE_CHARTS, "monitoring")))
    for path in [CHART / "values.schema.json", *(SUBCHARTS / s / "values.schema.json" for s in STAGE_CHARTS)]:
        schema = json.loads(path.read_text())
        assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
        assert schema["additionalProperties"] is False
        walk(schema, [path.parent.name])


def test_global_defaults_agree_everywhere():
    """The model, the umbrella's values.yaml and the library's fallback for a stage chart
    rendered on its own all say the same `global`."""
    from trajflow.config import global_
    model = global_.GlobalConfig().model_dump(by_alias=True, mode="json")
    umbrella = yaml.safe_load((CHART / "values.yaml").read_text())["global"]
    assert umbrella == model
    standalone = render(chart=SUBCHARTS / "downloader")
    config_map = one(standalone, "ConfigMap", "downloader")
    # the pods' file leaves out what only the chart reads
    chart_only = {**model, "storage": {k: v for k, v in model["storage"].items() if k != "pvc"}}
    del chart_only["argocd"]
    assert yaml.safe_load(config_map["data"]["config.yaml"])["global"] == chart_only


def test_stage_config_defaults_are_the_models_defaults():
    from trajflow.config import loader
    for stage in STAGE_CHARTS:
        values = yaml.safe_load((SUBCHARTS / stage / "values.yaml").read_text())
        assert values["config"] == loader.STAGE_MODELS[stage]().model_dump(by_alias=True, mode="json"), stage


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_environment_values_pass_the_schema_and_the_models(env):
    """Beyond the JSON Schema: the pydantic models (discriminated unions, cross-field rules)
    accept every environment's global and config blocks as merged by Helm."""
    from trajflow.config import loader
    values = loader.load_values([env_file(env)], chart_dir=CHART)
    glob = json.loads(json.dumps(values.merged["global"]))
    if "{{" in glob["metrics"]["pushgatewayUrl"]:
        # Helm renders this one with tpl; the pods see the in-release Service's URL.
        glob["metrics"]["pushgatewayUrl"] = "http://trajflow-pushgateway.trajflow.svc:9091"
    loader.validate_global(glob, values=values)
    for stage in STAGE_CHARTS:
        loader.validate_stage(stage, values.stage(stage).get("config") or {}, values=values)


# (values given with --set-json semantics, fragments the error must contain)
CATALOG = {"type": "catalog", "name": "xena", "urlTemplate": "https://hub/{cohort}/{file}.gz", "cohorts": ["A"],
           "categories": {"m": "HiSeqV2"}}

BAD_VALUES = {
    "negative parallelism": ({"downloader.parallelism": -1}, ["downloader", "/parallelism", "minimum"]),
    "zero shards": ({"downloader.shards": 0}, ["downloader", "/shards", "minimum"]),
    "shards of the wrong type": ({"downloader.shards": "eight"}, ["downloader", "/shards", "want integer"]),
    "unknown stage key": ({"downloader.paralelism": 8}, ["downloader", "'paralelism' not allowed"]),
    "unknown top-level key": ({"trainng": {"nodes": 2}}, ["trajflow", "'trainng' not allowed"]),
    "unknown global key": ({"global.runID": "x"}, ["trajflow", "'runID' not allowed"]),
    "plain-text S3 secret": ({"global.storage.s3.secretAccessKey": "wJalrXUtnFEMI"},
                             ["'secretAccessKey' not allowed"]),
    "plain-text secret env": ({"downloader.extraEnv": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]},
                              ["downloader", "/extraEnv/0", "valueFrom"]),
    "plain-text token env": ({"training.extraEnv": [{"name": "HF_TOKEN", "value": "hf_abc"}]},
                             ["training", "/extraEnv/0", "valueFrom"]),
    "plain-text API key env": ({"preprocessing.extraEnv": [{"name": "WANDB_API_KEY", "value": "k"}]},
                               ["preprocessing", "/extraEnv/0", "valueFrom"]),
    "plain-text password env, one word": ({"training.extraEnv": [{"name": "PGPASSWORD", "value": "pw"}]},
                                          ["training", "/extraEnv/0", "valueFrom"]),
    "s3 without a bucket": ({"global.storage.type": "s3"}, ["/global/storage/s3/bucket"]),
    "no PVC and no existing claim": ({"global.storage.pvc.create": False}, ["/global/storage/pvc/existingClaim"]),
    "unknown storage type": ({"global.storage.type": "nfs"}, ["/global/storage/type"]),
    # the pods refuse these (exit 2, failing the Job): helm must refuse them first
    "pushgateway without a scheme": ({"global.metrics.pushgatewayUrl": "pushgateway.monitoring.svc:9091"},
                                     ["/global/metrics/pushgatewayUrl"]),
    "S3 endpoint without a scheme": ({"global.storage.s3.endpoint": "minio.minio.svc:9000"},
                                     ["/global/storage/s3/endpoint"]),
    "pushgateway URL with user:password@": ({"global.metrics.pushgatewayUrl": "https://u:pw@pg.example"},
                                            ["/global/metrics/pushgatewayUrl"]),
    "S3 endpoint with user:password@": ({"global.storage.s3.endpoint": "http://key:secret@minio:9000"},
                                        ["/global/storage/s3/endpoint"]),
    "S3 region with a space": ({"global.storage.s3.region": "us east"}, ["/global/storage/s3/region"]),
    "S3 source endpoint without a scheme": (
        {"downloader.config.sources": [{"type": "s3", "name": "x", "url": "s3://b/p", "endpoint": "minio:9000"}]},
        ["downloader", "/config/sources/0"]),
    "https source URL of another scheme": (
        {"downloader.config.sources": [{"type": "https", "name": "x", "urls": ["ftp://host/file"]}]},
        ["downloader", "/config/sources/0"]),
    "pod label the chart sets": ({"training.podLabels": {"app.kubernetes.io/component": "x"}},
                                 ["training", "invalid propertyName 'app.kubernetes.io/component'"]),
    "Job label the chart sets": ({"downloader.jobLabels": {"trajflow.io/release": "x"}},
                                 ["downloader", "invalid propertyName 'trajflow.io/release'"]),
    "Pushgateway pod label the chart sets": (
        {"monitoring.enabled": True, "monitoring.pushgateway.podLabels": {"app.kubernetes.io/instance": "x"}},
        ["monitoring", "invalid propertyName 'app.kubernetes.io/instance'"]),
    # int32 fields of the Kubernetes API: helm must refuse what the API server would
    "TTL beyond int32": ({"downloader.ttlSecondsAfterFinished": 3000000000},
                         ["downloader", "/ttlSecondsAfterFinished"]),
    "UID beyond int32": ({"training.podSecurityContext.runAsUser": 3000000000},
                         ["training", "/podSecurityContext/runAsUser"]),
    "extra volume named like the chart's": ({"training.extraVolumes": [{"name": "tmp", "emptyDir": {}}]},
                                            ["training", "/extraVolumes/0/name"]),
    "extra volume named like the dataset's": (
        {"preprocessing.extraVolumes": [{"name": "trajflow-dataset", "emptyDir": {}}]},
        ["preprocessing", "/extraVolumes/0/name"]),
    "extra mount over the config": ({"downloader.extraVolumeMounts": [{"name": "x", "mountPath": "/etc/trajflow"}]},
                                    ["downloader", "/extraVolumeMounts/0/mountPath"]),
    # the kubelet cannot make a mount point inside the read-only ConfigMap volume
    "extra mount below the config": (
        {"preprocessing.extraVolumeMounts": [{"name": "x", "mountPath": "/etc/trajflow/extra"}]},
        ["preprocessing", "/extraVolumeMounts/0/mountPath"]),
    "extra mount over /tmp with a trailing slash": (
        {"training.extraVolumeMounts": [{"name": "x", "mountPath": "/tmp/"}]},
        ["training", "/extraVolumeMounts/0/mountPath"]),
    "Exists toleration with a value": (
        {"preprocessing.tolerations": [{"key": "gpu", "operator": "Exists", "value": "true"}]},
        ["preprocessing", "/tolerations/0/value"]),
    "seed beyond 32 bits": ({"training.config.seed": 18446744073709551615}, ["training", "/config/seed"]),
    "empty data path": ({"global.storage.filesystem.path": ""}, ["/global/storage/filesystem/path"]),
    "pod label key with a space": ({"downloader.podLabels": {"Bad Key": "x"}},
                                   ["downloader", "invalid propertyName 'Bad Key'"]),
    "bad memory quantity": ({"preprocessing.resources.limits.memory": "lots"},
                            ["preprocessing", "/resources/limits/memory"]),
    "bad PVC size": ({"global.storage.pvc.size": "100 GB"}, ["/global/storage/pvc/size"]),
    "bad shm size": ({"training.shm.sizeLimit": "1XB"}, ["training", "/shm/sizeLimit"]),
    "doubled quantity suffix": ({"training.resources.limits.memory": "100Gii"}, ["training", "/resources/limits/memory"]),
    "negative quantity": ({"downloader.resources.requests.cpu": "-1"}, ["downloader", "/resources/requests/cpu"]),
    "quantity with two points": ({"global.storage.pvc.size": "1.2.3Gi"}, ["/global/storage/pvc/size"]),
    "zero training nodes": ({"training.nodes": 0}, ["training", "/nodes"]),
    "unknown launcher": ({"training.launcher": "mpi"}, ["training", "/launcher"]),
    "rendezvous port out of range": ({"training.rendezvous.port": 70000}, ["training", "/rendezvous/port"]),
    "zero processes per node": ({"training.nprocPerNode": 0}, ["training", "/nprocPerNode"]),
    "bad wait timeout": ({"preprocessing.waitTimeout": "soon"}, ["preprocessing", "/waitTimeout"]),
    "zero wait timeout": ({"training.waitTimeout": 0}, ["training", "/waitTimeout"]),
    "wait timeout with a unitless tail": ({"training.waitTimeout": "1h30"}, ["training", "/waitTimeout"]),
    "root user": ({"downloader.containerSecurityContext.runAsUser": 0},
                  ["downloader", "/containerSecurityContext/runAsUser"]),
    "writable root filesystem": ({"preprocessing.containerSecurityContext.readOnlyRootFilesystem": False},
                                 ["preprocessing", "/containerSecurityContext/readOnlyRootFilesystem"]),
    "privileged container": ({"training.containerSecurityContext.privileged": True},
                             ["training", "/containerSecurityContext/privileged"]),
    "pod as root": ({"training.podSecurityContext.runAsNonRoot": False},
                    ["training", "/podSecurityContext/runAsNonRoot"]),
    "bad image digest": ({"downloader.image.digest": "latest"}, ["downloader", "/image/digest"]),
    # the kubelet refuses such an image name: the pods would wait forever in InvalidImageName
    "registry with a scheme": ({"global.imageRegistry": "https://ghcr.io"}, ["/global/imageRegistry"]),
    "stage registry with a scheme": ({"training.image.registry": "https://ghcr.io"}, ["training", "/image/registry"]),
    "repository in capitals": ({"preprocessing.image.repository": "Trajflow/GPU"},
                               ["preprocessing", "/image/repository"]),
    "bad pull policy": ({"downloader.image.pullPolicy": "Sometimes"}, ["downloader", "/image/pullPolicy"]),
    "bad toleration operator": ({"preprocessing.tolerations": [{"key": "gpu", "operator": "Maybe"}]},
                                ["preprocessing", "/tolerations/0/operator"]),
    "bad failure policy action": (
        {"downloader.podFailurePolicy": {"rules": [{"action": "Retry", "onExitCodes": {"operator": "In",
                                                                                      "values": [2]}}]}},
        ["downloader", "/podFailurePolicy/rules/0/action"]),
    "exit code 0 under In": (
        {"downloader.podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In",
                                                                                        "values": [0, 2]}}]}},
        ["downloader", "/podFailurePolicy/rules/0/onExitCodes/values/0", "minimum"]),
    "failure rule without a matcher": ({"downloader.podFailurePolicy": {"rules": [{"action": "FailJob"}]}},
                                       ["downloader", "/podFailurePolicy/rules/0"]),
    "failure rule with both matchers": (
        {"downloader.podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}],
                                                    "onExitCodes": {"operator": "In", "values": [2]}}]}},
        ["downloader", "/podFailurePolicy/rules/0"]),
    "pull secret as a string": ({"global.imagePullSecrets": ["regcred"]}, ["/global/imagePullSecrets/0"]),
    "empty volume": ({"global.storage.pvc.size": "0.0Gi"}, ["/global/storage/pvc/size"]),
    "empty Pushgateway volume": ({"monitoring.enabled": True, "monitoring.pushgateway.persistence.size": 0},
                                 ["monitoring", "/pushgateway/persistence/size"]),
    "run id not a DNS label": ({"global.runId": "Run_1"}, ["/global/runId"]),
    "config out of range": ({"downloader.config.concurrency": 0}, ["downloader", "/config/concurrency"]),
    "unknown config key": ({"preprocessing.config.targetRate": 50}, ["preprocessing", "'targetRate' not allowed"]),
    "unknown source type": ({"downloader.config.sources": [{"type": "ftp", "name": "x", "url": "ftp://h/x"}]},
                            ["downloader", "/config/sources/0"]),
    # the stage models' own rules on one value, as far as a JSON schema can tell them: a pod
    # would refuse these at its start, after the install had succeeded
    "cohort with a slash": ({"downloader.config.sources": [dict(CATALOG, cohorts=["A/B"])]},
                            ["downloader", "/config/sources/0"]),
    "cohort twice": ({"downloader.config.sources": [dict(CATALOG, cohorts=["A", "A"])]},
                     ["downloader", "/config/sources/0"]),
    "url template without {cohort}": ({"downloader.config.sources": [dict(CATALOG, urlTemplate="https://h/{file}.gz")]},
                                      ["downloader", "/config/sources/0"]),
    "url template with a typo": ({"downloader.config.sources": [dict(CATALOG, urlTemplate="https://h/{cohort}/{fil}")]},
                                 ["downloader", "/config/sources/0"]),
    "empty file part": ({"downloader.config.sources": [dict(CATALOG, categories={"m": ""})]},
                        ["downloader", "/config/sources/0"]),
    "file part with an unknown field": ({"downloader.config.sources": [dict(CATALOG, categories={"m": "{x}"})]},
                                        ["downloader", "/config/sources/0"]),
    "checksum not hex": ({"downloader.config.sources": [dict(CATALOG, checksums={"A/x.gz": "zz"})]},
                         ["downloader", "/config/sources/0"]),
    "destination out of the source": (
        {"downloader.config.sources": [{"type": "https", "name": "w", "urls": [{"url": "https://h/x", "path": "../x"}]}]},
        ["downloader", "/config/sources/0"]),
    "stream twice": ({"preprocessing.config.streams": ["a", "a"]}, ["preprocessing", "/config/streams"]),
    "empty stream name": ({"preprocessing.config.streams": [""]}, ["preprocessing", "/config/streams/0"]),
    "reserved stream name": ({"preprocessing.config.streams": ["__metadata__"]}, ["preprocessing", "/config/streams/0"]),
    "unknown model type": ({"training.config.model.type": "mamba"}, ["training", "/config/model/type"]),
    "network policy switch of the wrong type": ({"networkPolicy.enabled": "yes"}, ["/networkPolicy/enabled"]),
    "missing required stage key": ({"downloader.image": None}, ["downloader", "missing property 'image'"]),
    "per-index retries removed": ({"downloader.backoffLimitPerIndex": None},
                                  ["downloader", "missing property 'backoffLimitPerIndex'"]),
}

# Checks across stages happen while rendering; the message names both keys.
BAD_COMBINATIONS = {
    "preprocessing shards differ": ({"preprocessing.shards": 4},
                                    ["preprocessing.shards (4) must equal downloader.shards (8)"]),
    "training input shards differ": ({"training.inputShards": 3},
                                     ["training.inputShards (3) must equal preprocessing.shards (8)"]),
    "more failed indexes than shards": ({"downloader.maxFailedIndexes": 9},
                                        ["downloader.maxFailedIndexes (9) cannot exceed the Job's 8 completions"]),
    "exit codes out of order": (
        {"downloader.podFailurePolicy": {"rules": [{"action": "FailIndex", "onExitCodes": {"operator": "In",
                                                                                          "values": [5, 3]}}]}},
        ["downloader.podFailurePolicy.rules[0].onExitCodes.values must be in increasing order"]),
    "failure rule for a container the pod lacks": (
        {"preprocessing.podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
            "containerName": "nope", "operator": "In", "values": [2]}}]}},
        ['preprocessing.podFailurePolicy.rules[0].onExitCodes.containerName "nope" is none of the pod\'s containers']),
    "PyTorchJob without its API": ({"training.launcher": "pytorchjob"}, ["training.launcher", "kubeflow.org/v1"]),
    "extra mount over /tmp written another way": (
        {"training.extraVolumes": [{"name": "x", "emptyDir": {}}],
         "training.extraVolumeMounts": [{"name": "x", "mountPath": "//tmp/."}]},
        ['training.extraVolumeMounts[0].mountPath "//tmp/." is /tmp, where the chart\'s pods mount volumes themselves']),
    "extra mount below the config written another way": (
        {"downloader.extraVolumes": [{"name": "x", "emptyDir": {}}],
         "downloader.extraVolumeMounts": [{"name": "x", "mountPath": "/etc//trajflow/x"}]},
        ['downloader.extraVolumeMounts[0].mountPath "/etc//trajflow/x" is /etc/trajflow/x']),
    "data volume over /tmp": ({"global.storage.filesystem.path": "/tmp"},
                              ['global.storage.filesystem.path "/tmp" would mount the data volume on or over /tmp']),
    "data volume over the config": ({"global.storage.filesystem.path": "/etc"},
                                    ["over /etc/trajflow, which the pods use themselves"]),
    "per-source settings of no source": (
        {"preprocessing.config.sources": {"sims": {"rateHz": 20}}},
        ["preprocessing.config.sources.sims names no source of downloader.config.sources ("]),
    "pushes too slow for the stall alert": (
        {"monitoring.enabled": True, "preprocessing.config.pushIntervalSeconds": 150},
        ["preprocessing.config.pushIntervalSeconds (150) must be under half of "
         "monitoring.prometheusRule.runningPushMaxAge (5m)"]),
    "zero wait timeout as a duration": ({"training.waitTimeout": "0h0s"}, ['waitTimeout "0h0s" is zero']),
    "a registry in front of a repository with its own": (
        {"training.image.repository": "localhost:5000/t/gpu"},
        ['image repository "localhost:5000/t/gpu" names its own registry, and the registry "ghcr.io"']),
    "two sources of one name": ({"downloader.config.sources": [CATALOG, dict(CATALOG, cohorts=["B"])]},
                                ['downloader.config.sources: two sources are named "xena"']),
    "a source's token as a plain value": (
        {"downloader.config.sources": [{"type": "https", "name": "hub", "urls": ["https://hub.example/a.bin"],
                                        "authTokenEnv": "HUB_AUTH"}],
         "downloader.extraEnv": [{"name": "HUB_AUTH", "value": "plaintext"}]},
        ["downloader.extraEnv: HUB_AUTH holds a source's secret: give it with valueFrom.secretKeyRef"]),
    "transformer heads that do not divide its width": (
        {"training.config.model": {"type": "transformer", "hiddenSize": 130, "numHeads": 4}},
        ["training.config.model.hiddenSize (130) must be a multiple of training.config.model.numHeads (4)"]),
    "behaviour cloning of a stream onto itself": (
        {"training.config.observation": "action"},
        ['training.config.observation and training.config.action are both "action"']),
    "extra mount at the data path": (
        {"global.storage.filesystem.path": "/mnt/data/", "training.extraVolumes": [{"name": "x", "emptyDir": {}}],
         "training.extraVolumeMounts": [{"name": "x", "mountPath": "/mnt//data"}]},
        ['training.extraVolumeMounts[0].mountPath "/mnt//data" is where the data volume']),
}


def test_the_corpus_is_large_enough():
    assert len(BAD_VALUES) + len(BAD_COMBINATIONS) >= 20


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_rejected_naming_the_key(case):
    set_values, fragments = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError) as info:
        render(set_values=set_values)
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{case}: {missing} not in:\n{message}"


# values the API server accepts, so the schema must too
GOOD_VALUES = {
    "pull secret with dots": {"global.imagePullSecrets": [{"name": "ghcr.io-creds"}]},
    "catalog with literal braces and every placeholder": {"downloader.config.sources": [dict(
        CATALOG, urlTemplate="https://hub/{{x}}/{cohort}/{category}-{file}.gz", cohorts=["A", "B.1"],
        categories={"m": "{cohort}_{category}"}, checksums={"A/m.gz": "0" * 64, "B.1/m.gz": "f" * 32})]},
    "https item with a nested destination": {"downloader.config.sources": [
        {"type": "https", "name": "w", "urls": [{"url": "https://h/x", "path": "a/.b/x"}]}]},
    "registry mirror with a port and a path": {"global.imageRegistry": "registry.local:5000/mirror/ml",
                                               "downloader.image.registry": "localhost:5000"},
    "registry in the repository": {"training.image.registry": "", "training.image.repository": "localhost:5000/t/gpu"},
    "huge pages": {"training.resources.limits.hugepages-2Mi": "1Gi", "training.resources.requests.hugepages-2Mi": "1Gi"},
    "quantities of every form": {"preprocessing.resources.requests.cpu": "500m",
                                 "preprocessing.resources.requests.memory": "1.5Gi",
                                 "preprocessing.resources.limits.memory": "2e9", "preprocessing.shm.sizeLimit": "1e9",
                                 "global.storage.pvc.size": ".5Ti",
                                 "monitoring.pushgateway.persistence.size": "0.5Gi"},
    "extra mount below the data path": {"training.extraVolumes": [{"name": "x", "emptyDir": {}}],
                                        "training.extraVolumeMounts": [{"name": "x", "mountPath": "/data/x"}]},
    # writable emptyDirs take a mount point; a sibling of /etc/trajflow is another path
    "extra mounts below /tmp and beside the config": {
        "training.extraVolumes": [{"name": "x", "emptyDir": {}}, {"name": "y", "emptyDir": {}}],
        "training.extraVolumeMounts": [{"name": "x", "mountPath": "/tmp/cache"},
                                       {"name": "y", "mountPath": "/etc/trajflow-extra"}]},
    "no pod failure policy (the documented null)": {"downloader.podFailurePolicy": None},
    "wait timeout in seconds": {"preprocessing.waitTimeout": 3600, "training.waitTimeout": 86400},
    "settings that only sound secret": {"training.extraEnv": [
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        {"name": "AWS_WEB_IDENTITY_TOKEN_FILE", "value": "/var/run/secrets/token"},
        {"name": "AWS_SHARED_CREDENTIALS_FILE", "value": "/etc/aws/credentials"},
        {"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/etc/gcp/key.json"}]},
}


@pytest.mark.parametrize("case", sorted(GOOD_VALUES))
def test_values_kubernetes_accepts_pass_the_schema(case):
    assert render(set_values=GOOD_VALUES[case])


def test_a_null_pod_failure_policy_renders_a_job_without_one():
    jobs = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o["spec"]
            for o in render(set_values={"downloader.podFailurePolicy": None}) if o["kind"] == "Job"}
    assert "podFailurePolicy" not in jobs["downloader"] and "podFailurePolicy" in jobs["preprocessing"]
    # without one, Kubernetes would replace a terminating pod at once: two pods of one shard
    assert all(spec["podReplacementPolicy"] == "Failed" for spec in jobs.values())


@pytest.mark.parametrize("case", sorted(BAD_COMBINATIONS))
def test_bad_combinations_fail_the_render_naming_the_keys(case):
    set_values, fragments = BAD_COMBINATIONS[case]
    with pytest.raises(helm.HelmError) as info:
        render(set_values=set_values)
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{case}: {missing} not in:\n{message}"


def test_a_disabled_stage_is_not_checked_against_its_siblings():
    objs = render(set_values={"downloader.enabled": False, "preprocessing.shards": 4, "training.inputShards": 4},
                  api_versions=[*PROMETHEUS_OPERATOR_APIS, *KUBEFLOW_APIS])
    assert {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in objs if o["kind"] == "Job"} == {
        "preprocessing", "training"}
