"""Job names carry a hash of the immutable spec: scaling patches a Job, anything else
makes a new one. Names never depend on the revision or on optional cluster APIs."""
from __future__ import annotations

import re

import pytest
import yaml
from helmrender import (KUBEFLOW_APIS, PROMETHEUS_OPERATOR_APIS, SUBCHARTS, env_file, one, pod_spec, render, select,
                        without_rerun)

STAGES = ("downloader", "preprocessing", "training")


def job_names(objs):
    return {stage: one(objs, "Job", stage)["metadata"]["name"] for stage in STAGES}


@pytest.fixture(scope="module")
def production():
    return render([env_file("production")], api_versions=PROMETHEUS_OPERATOR_APIS)


@pytest.mark.parametrize("stage", ["downloader", "preprocessing"])
def test_parallelism_keeps_the_job_name(stage):
    four = render([env_file("production")], {f"{stage}.parallelism": 4}, api_versions=PROMETHEUS_OPERATOR_APIS)
    eight = render([env_file("production")], {f"{stage}.parallelism": 8}, api_versions=PROMETHEUS_OPERATOR_APIS)
    assert job_names(four) == job_names(eight)
    assert one(four, "Job", stage)["spec"]["parallelism"] == 4
    assert one(eight, "Job", stage)["spec"]["parallelism"] == 8
    # Everything else about the Job is the same: only the mutable field moved.
    spec4, spec8 = one(four, "Job", stage)["spec"], one(eight, "Job", stage)["spec"]
    spec4.pop("parallelism"), spec8.pop("parallelism")
    assert spec4 == spec8


@pytest.mark.parametrize("change,image", [
    ({"downloader.image.tag": "0.2.0"}, "ghcr.io/trajflow/trajflow-downloader:0.2.0"),
    ({"downloader.image.digest": "sha256:" + "a" * 64}, "ghcr.io/trajflow/trajflow-downloader@sha256:" + "a" * 64),
    ({"global.imageRegistry": "registry.internal:5000"}, "registry.internal:5000/trajflow/trajflow-downloader:{app}"),
])
def test_a_new_image_makes_a_new_downloader_job(production, change, image):
    app = yaml.safe_load((SUBCHARTS / "downloader" / "Chart.yaml").read_text())["appVersion"]  # the default tag
    image = image.replace("{app}", app)
    assert one(production, "Job", "downloader")["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"ghcr.io/trajflow/trajflow-downloader:{app}")
    changed = render([env_file("production")], change, api_versions=PROMETHEUS_OPERATOR_APIS)
    before, after = job_names(production), job_names(changed)
    assert after["downloader"] != before["downloader"]
    assert one(changed, "Job", "downloader")["spec"]["template"]["spec"]["containers"][0]["image"] == image


@pytest.mark.parametrize("stage", STAGES)
def test_rerun_renames_only_that_stages_job(production, stage):
    """A failed Job never starts another pod: `rerun` makes a new one, with the same spec."""
    again = render([env_file("production")], {f"{stage}.rerun": 1}, api_versions=PROMETHEUS_OPERATOR_APIS)
    before, after = job_names(production), job_names(again)
    assert after[stage] != before[stage]
    assert {s: n for s, n in after.items() if s != stage} == {s: n for s, n in before.items() if s != stage}
    # the same spec, but for the attempt its pods record when a shard fails for good
    assert without_rerun(one(again, "Job", stage)["spec"]) == without_rerun(one(production, "Job", stage)["spec"])
    twice = render([env_file("production")], {f"{stage}.rerun": 2}, api_versions=PROMETHEUS_OPERATOR_APIS)
    assert job_names(twice)[stage] not in (before[stage], after[stage])
    # 0, the default, is no rerun: the names of existing releases do not change
    zero = render([env_file("production")], {f"{stage}.rerun": 0}, api_versions=PROMETHEUS_OPERATOR_APIS)
    assert job_names(zero) == before


def test_a_new_shard_count_makes_new_jobs_downstream_too(production):
    changed = render([env_file("production")],
                     {"downloader.shards": 32, "preprocessing.shards": 32, "training.inputShards": 32},
                     api_versions=PROMETHEUS_OPERATOR_APIS)
    before, after = job_names(production), job_names(changed)
    assert after["downloader"] != before["downloader"]
    assert after["preprocessing"] != before["preprocessing"]
    # training waits for 0-31 now: its pod template changed
    assert after["training"] != before["training"]
    assert one(changed, "Job", "downloader")["spec"]["completions"] == 32


def test_a_config_change_makes_a_new_job_of_that_stage_only(production):
    changed = render([env_file("production")], {"preprocessing.config.targetRateHz": 100},
                     api_versions=PROMETHEUS_OPERATOR_APIS)
    before, after = job_names(production), job_names(changed)
    assert after["preprocessing"] != before["preprocessing"]
    assert after["downloader"] == before["downloader"] and after["training"] == before["training"]


def test_a_new_run_id_makes_new_jobs(production):
    changed = render([env_file("production")], {"global.runId": "fleet-2026-q4"},
                     api_versions=PROMETHEUS_OPERATOR_APIS)
    before, after = job_names(production), job_names(changed)
    assert all(after[s] != before[s] for s in STAGES)


def test_mutable_fields_do_not_change_the_name(production):
    changed = render([env_file("production")], {
        "downloader.ttlSecondsAfterFinished": 60,
        "downloader.podAnnotations": {},  # unchanged
    }, api_versions=PROMETHEUS_OPERATOR_APIS)
    assert job_names(changed)["downloader"] == job_names(production)["downloader"]


@pytest.mark.parametrize("stage", STAGES)
def test_job_labels_and_annotations_keep_the_job_name_and_the_chart_s_labels(production, stage):
    """Kueue queues a Job by its kueue.x-k8s.io/queue-name label; metadata is no part of the hash."""
    queue = {"kueue.x-k8s.io/queue-name": "gpu"}
    changed = render([env_file("production")], {f"{stage}.jobLabels": queue, f"{stage}.jobAnnotations": {"team": "ml"}},
                     api_versions=PROMETHEUS_OPERATOR_APIS)
    assert job_names(changed) == job_names(production)
    job, before = one(changed, "Job", stage), one(production, "Job", stage)
    assert job["spec"] == before["spec"]
    assert job["metadata"]["labels"] == {**before["metadata"]["labels"], "kueue.x-k8s.io/queue-name": "gpu"}
    assert job["metadata"]["annotations"] == {**before["metadata"].get("annotations", {}), "team": "ml"}
    assert job["spec"]["template"]["metadata"]["labels"] == before["spec"]["template"]["metadata"]["labels"]


def test_a_queue_label_reaches_the_pytorchjob():
    changed = render([env_file("production")], {"training.launcher": "pytorchjob",
                                                "training.jobLabels": {"kueue.x-k8s.io/queue-name": "gpu"}},
                     api_versions=PROMETHEUS_OPERATOR_APIS + KUBEFLOW_APIS)
    job = one(changed, "PyTorchJob", "training")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"


def test_growing_the_volume_keeps_every_job():
    """Expanding a full PVC mid-run must not replace (and so kill) the running Jobs: the pods
    never read the PVC settings, so they stay out of the config file and its checksum."""
    before = render([env_file("dev")])
    after = render([env_file("dev")], {"global.storage.pvc.size": "20Ti"})
    assert one(after, "PersistentVolumeClaim", "storage")["spec"]["resources"]["requests"]["storage"] == "20Ti"
    assert job_names(after) == job_names(before)
    claim = render([env_file("dev")], {"global.storage.pvc.existingClaim": "shared-data"})
    assert all(job_names(claim)[s] != job_names(before)[s] for s in STAGES)  # another volume: new pods


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("field, value", [("activeDeadlineSeconds", 1209600), ("maxFailedIndexes", 1)])
def test_fields_kubernetes_lets_an_update_change_patch_the_running_job(production, stage, field, value):
    """activeDeadlineSeconds and maxFailedIndexes are mutable (ValidateJobSpecUpdate):
    extending a deadline must not replace the running Job and lose its pods' work."""
    changed = render([env_file("production")], {f"{stage}.{field}": value}, api_versions=PROMETHEUS_OPERATOR_APIS)
    assert job_names(changed) == job_names(production)
    assert one(changed, "Job", stage)["spec"][field] == value


@pytest.mark.parametrize("stage", STAGES)
def test_an_immutable_failure_setting_makes_a_new_job(production, stage):
    changed = render([env_file("production")], {f"{stage}.backoffLimitPerIndex": 7},
                     api_versions=PROMETHEUS_OPERATOR_APIS)
    assert job_names(changed)[stage] != job_names(production)[stage]


def test_finished_jobs_are_kept_by_default():
    """A Job deleted by its TTL stays in the release manifest, and any later helm upgrade
    would create it again and re-run the stage: no TTL unless asked for."""
    for objs in (render([env_file(env)], api_versions=PROMETHEUS_OPERATOR_APIS) for env in ("dev", "staging", "production")):
        for job in select(objs, "Job"):
            assert "ttlSecondsAfterFinished" not in job["spec"], job["metadata"]["name"]
    objs = render([env_file("production")], {"training.ttlSecondsAfterFinished": 3600}, api_versions=PROMETHEUS_OPERATOR_APIS)
    assert one(objs, "Job", "training")["spec"]["ttlSecondsAfterFinished"] == 3600


def test_names_do_not_depend_on_the_prometheus_operator():
    """With and without monitoring.coreos.com/v1: the stage Jobs are the same; only the
    monitoring chart's custom resources come and go."""
    with_operator = render([env_file("staging")], api_versions=PROMETHEUS_OPERATOR_APIS)
    without_operator = render([env_file("staging")])
    monitoring_off = render([env_file("staging")], {"monitoring.enabled": False})
    assert job_names(with_operator) == job_names(without_operator) == job_names(monitoring_off)
    crs = [o for o in with_operator if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert crs, "the Prometheus operator's objects should render where the API exists"
    for objs in (without_operator, monitoring_off):
        assert not [o for o in objs if o["apiVersion"].startswith("monitoring.coreos.com/")]


def test_names_are_stable_across_renders_and_releases_differ():
    first = job_names(render([env_file("dev")]))
    assert first == job_names(render([env_file("dev")]))
    other = job_names(render([env_file("dev")], release="dev"))
    assert all(name.startswith("dev-trajflow-") for name in other.values())
    assert all(name.startswith("trajflow-") for name in first.values())


DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Helm accepts release names up to 53 characters; from 46 on, `<release>-trajflow-<stage>`
# no longer fits in 63. One that says trajflow is used as the fullname as it is.
LONG_RELEASES = [("fleet-pipeline-release-" + "x" * 60)[:n] for n in range(46, 54)]
LONG_RELEASES += [("trajflow-fleet-" + "y" * 60)[:53]]
# names Helm accepts that Kubernetes refuses in some object names as they are
ODD_RELEASES = ["my.release", "2026q3", ("9.fleet.trajflow." + "z" * 60)[:53]]
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize("launcher", ["job", "pytorchjob"])
@pytest.mark.parametrize("release", LONG_RELEASES + ODD_RELEASES, ids=lambda r: f"{len(r)}-{r[:8]}")
def test_long_release_names_keep_names_distinct_and_within_limits(release, launcher):
    """Helm accepts release names up to 53 characters, with dots and a leading digit: every
    object keeps a distinct name within the Kubernetes limits, and each stage uses its own
    ConfigMap and ServiceAccount."""
    assert len(release) <= 53
    objs = render([env_file("production")], {"training.launcher": launcher}, release=release,
                  api_versions=[*PROMETHEUS_OPERATOR_APIS, *KUBEFLOW_APIS])
    seen = set()
    for obj in objs:
        name = obj["metadata"]["name"]
        assert (obj["kind"], name) not in seen, f"{obj['kind']}/{name} rendered twice"
        seen.add((obj["kind"], name))
        assert len(name) <= 63, name
        if obj["kind"] == "Service":
            assert DNS_1035.match(name), name
    workloads = [*select(objs, "Job"), *select(objs, "PyTorchJob")]
    assert len(workloads) == 3
    for workload in workloads:
        stage = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        # Indexed Job pods are named <job>-<index>: that must stay a DNS label.
        assert len(workload["metadata"]["name"]) <= 52, workload["metadata"]["name"]
        assert DNS_1123_LABEL.match(workload["metadata"]["name"]), workload["metadata"]["name"]
        subdomain = pod_spec(workload).get("subdomain")
        assert subdomain is None or DNS_1123_LABEL.match(subdomain), subdomain
        assert f"-{stage}-" in workload["metadata"]["name"]
        spec = pod_spec(workload)
        config = next(v["configMap"]["name"] for v in spec["volumes"] if v["name"] == "config")
        assert config == one(objs, "ConfigMap", stage)["metadata"]["name"]
        assert spec["serviceAccountName"] == one(objs, "ServiceAccount", stage)["metadata"]["name"]
    for kind in ("ConfigMap", "ServiceAccount"):
        names = [one(objs, kind, stage)["metadata"]["name"] for stage in STAGES]
        assert len(set(names)) == 3, names


def test_long_release_names_that_differ_only_past_the_cut_keep_their_objects_apart():
    first, second = (("robot-fleet-lerobot-2026-q3-pick-and-place-sweep-v0" + n) for n in "12")
    names = [{(o["kind"], o["metadata"]["name"]) for o in render([env_file("production")], release=release,
                                                                   api_versions=PROMETHEUS_OPERATOR_APIS)}
             for release in (first, second)]
    # the data claim keeps the name it had before names were cut with a hash: another name
    # would give an upgraded release a new, empty volume
    shared = {(kind, name) for kind, name in names[0] & names[1] if kind != "PersistentVolumeClaim"}
    assert not shared, sorted(shared)
    claim = one(render([env_file("dev")], release=first), "PersistentVolumeClaim", "storage")
    assert claim["metadata"]["name"] == f"{(first + '-trajflow')[:58]}-data"
    assert all(len(name) <= 63 for _, name in names[0] | names[1])


def test_argocd_mode_keeps_finished_jobs_and_orders_the_stages():
    waves = {}
    ttl = {f"{stage}.ttlSecondsAfterFinished": 3600 for stage in STAGES}
    plain = render([env_file("production")], ttl, api_versions=PROMETHEUS_OPERATOR_APIS)
    argo = render([env_file("production")], {"global.argocd.enabled": True, **ttl}, api_versions=PROMETHEUS_OPERATOR_APIS)
    for stage in STAGES:
        assert "ttlSecondsAfterFinished" in one(plain, "Job", stage)["spec"]
        assert "argocd.argoproj.io/sync-wave" not in (one(plain, "Job", stage)["metadata"].get("annotations") or {})
        job = one(argo, "Job", stage)
        assert "ttlSecondsAfterFinished" not in job["spec"]
        waves[stage] = int(job["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])
    assert waves["downloader"] < waves["preprocessing"] < waves["training"]


def test_argocd_mode_puts_the_pvc_in_the_first_stage_wave():
    objs = render([env_file("dev")], {"global.argocd.enabled": True})
    pvc = one(objs, "PersistentVolumeClaim", "storage")
    assert pvc["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "1"
    objs = render([env_file("dev")], {"global.argocd.enabled": True, "downloader.enabled": False})
    pvc = one(objs, "PersistentVolumeClaim", "storage")
    assert pvc["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "2"


@pytest.mark.parametrize("wave", [-1, 1, 3])
def test_argocd_mode_changes_the_dataset_configmap_before_the_download_job(wave):
    """A new download pod compares its download with the release's in that ConfigMap: one that
    read the previous values would stop as if its Job were the replaced one."""
    objs = render([env_file("dev")], {"global.argocd.enabled": True, "downloader.syncWave": wave,
                                      "preprocessing.syncWave": max(wave, 0) + 1, "training.syncWave": max(wave, 0) + 2})
    dataset = one(objs, "ConfigMap", "pipeline")
    job = one(objs, "Job", "downloader")
    assert int(dataset["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) <= \
        int(job["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])
