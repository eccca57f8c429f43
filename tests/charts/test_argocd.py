"""The ArgoCD manifests parse, and everything they point at exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from helmrender import (KUBEFLOW_APIS, PROMETHEUS_OPERATOR_APIS, ROOT, STAGE_CHARTS, env_file, helm, merge_values,
                        render, render_templates)

ARGOCD = ROOT / "argocd"
REPO = "https://github.com/trajflow/trajflow.git"


def load(name):
    docs = [d for d in yaml.safe_load_all((ARGOCD / name).read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def go_template(text: str, params: dict, workdir: Path) -> str:
    """ArgoCD's goTemplate (Go's text/template with sprig, as Helm's engine): `text` rendered
    with the generator parameters `params` as its dot."""
    chart = workdir / "go-template"
    (chart / "templates").mkdir(parents=True, exist_ok=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: go-template\nversion: 0.0.0\n")
    (chart / "templates" / "out.yaml").write_text("{{- with .Values }}" + text + "{{- end }}")
    return render_templates(values=params, chart=chart)["go-template/templates/out.yaml"]


@pytest.fixture(scope="module")
def project():
    return load("project.yaml")


@pytest.fixture(scope="module")
def appset():
    return load("applicationset.yaml")


@pytest.fixture(scope="module")
def apps(appset, tmp_path_factory):
    """(generator element, Application) pairs, as the ApplicationSet controller makes them:
    the template rendered, then the rendered templatePatch merged in (maps key by key,
    lists replaced: a strategic merge patch on a type whose lists have no merge keys)."""
    workdir = tmp_path_factory.mktemp("argocd")
    template = yaml.safe_dump(appset["spec"]["template"], sort_keys=False)
    out = []
    for element in appset["spec"]["generators"][0]["list"]["elements"]:
        app = yaml.safe_load(go_template(template, element, workdir))
        patch = yaml.safe_load(go_template(appset["spec"]["templatePatch"], element, workdir)) or {}
        assert isinstance(patch, dict) and all(v is not None for v in patch.values()), patch  # null deletes
        out.append((element, merge_values(app, patch)))
    return out


def test_kinds(project, appset):
    assert (project["apiVersion"], project["kind"]) == ("argoproj.io/v1alpha1", "AppProject")
    assert (appset["apiVersion"], appset["kind"]) == ("argoproj.io/v1alpha1", "ApplicationSet")
    assert appset["spec"]["goTemplate"] is True


def test_one_application_per_environment(appset):
    envs = [e["env"] for e in appset["spec"]["generators"][0]["list"]["elements"]]
    assert envs == ["dev", "staging", "production"]


def test_applications_point_at_the_chart_and_values_that_exist(apps, project):
    for element, app in apps:
        spec = app["spec"]
        source = spec["source"]
        assert source["repoURL"] == REPO and REPO in project["spec"]["sourceRepos"]
        chart_dir = ROOT / source["path"]
        assert (chart_dir / "Chart.yaml").is_file(), chart_dir
        for values_file in source["helm"]["valueFiles"]:
            path = (chart_dir / values_file).resolve()
            assert path.is_file() and path == env_file(element["env"]).resolve(), values_file
        assert source["helm"]["valuesObject"] == {"global": {"argocd": {"enabled": True}}}
        assert spec["project"] == project["metadata"]["name"]
        destination = {"name": spec["destination"]["name"], "namespace": spec["destination"]["namespace"]}
        assert destination in project["spec"]["destinations"], destination


def test_each_environment_deploys_to_a_cluster_of_its_own(apps):
    clusters = [app["spec"]["destination"] for _, app in apps]
    assert all(set(d) == {"name", "namespace"} for d in clusters), clusters  # no in-cluster server for all three
    assert len({d["name"] for d in clusters}) == 3, clusters


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def argocd_render(app, pinned: dict | None = None):
    """helm template as ArgoCD runs it for `app`: its value files, then `pinned` (what a user
    adds to the environment's values file), its valuesObject, then its parameters (which
    override everything, with $ARGOCD_APP_REVISION set to a commit)."""
    helm_source = app["spec"]["source"]["helm"]
    values_files = [(ROOT / app["spec"]["source"]["path"] / f).resolve() for f in helm_source["valueFiles"]]
    values = merge_values(pinned or {}, helm_source["valuesObject"])
    parameters = {p["name"]: p["value"].replace("$ARGOCD_APP_REVISION", COMMIT)
                  for p in helm_source.get("parameters", [])}
    return render(values_files, parameters, values=values, namespace=app["spec"]["destination"]["namespace"])


def job_images(objs):
    jobs = [o for o in objs if o["kind"] == "Job"]
    assert len(jobs) == len(STAGE_CHARTS), [o["metadata"]["name"] for o in jobs]  # one per stage
    return {c["image"] for o in jobs for c in o["spec"]["template"]["spec"]["containers"]}


def test_the_applications_render_as_argocd_would(apps):
    """helm template with the Application's values: sync waves on, no TTL on Jobs."""
    for element, app in apps:
        jobs = [o for o in argocd_render(app) if o["kind"] == "Job"]
        assert jobs
        for job in jobs:
            assert "argocd.argoproj.io/sync-wave" in job["metadata"]["annotations"]
            assert "ttlSecondsAfterFinished" not in job["spec"]


def test_environments_following_main_run_the_images_of_their_commit(apps):
    """The images workflow publishes each push to main under its commit, then moves
    deploy/main to it: dev and staging follow that branch and run those images, not the last
    release's with a newer chart and config. (Following main, a commit whose images never
    come would hold its sync, and every later commit, in ImagePullBackOff.) Production runs
    the tags of its values file: an empty parameter would override a tag pinned there."""
    workflow = yaml.safe_load((ROOT / ".github/workflows/images.yaml").read_text())
    # PyYAML reads the key `on` as True; main's commits are published once their tests passed
    assert workflow[True]["workflow_run"] == {"workflows": ["test"], "types": ["completed"], "branches": ["main"]}
    publish = workflow["jobs"]["publish"]
    assert "conclusion == 'success'" in publish["if"]
    assert publish["env"]["COMMIT"] == "${{ github.event.workflow_run.head_sha || github.sha }}"
    assert 'version="${COMMIT}"' in (ROOT / ".github/workflows/images.yaml").read_text()
    steps = [step["name"] for step in publish["steps"] if "name" in step]
    move = next(step for step in publish["steps"] if "deploy/main" in step.get("run", ""))
    assert steps.index(move["name"]) > steps.index("Build and push") and steps[-1] == move["name"]
    assert move["if"] == "github.event_name == 'workflow_run'" and "force=false" in move["run"]
    # the workflow's own token cannot move a branch over a change to a workflow file
    assert move["env"]["GH_TOKEN"] == "${{ secrets.DEPLOY_BRANCH_TOKEN }}"
    pinned = {stage: {"image": {"tag": "0.1.1"}} for stage in STAGE_CHARTS}
    for element, app in apps:
        parameters = app["spec"]["source"]["helm"].get("parameters", [])
        following_main = element["revision"] == "deploy/main"
        assert following_main or element["revision"].startswith("v")
        assert element["imageTag"] == ("$ARGOCD_APP_REVISION" if following_main else "")
        if following_main:
            assert all(p["forceString"] is True for p in parameters)
            tags = {p["name"]: p["value"] for p in parameters}
            assert tags == {f"{stage}.image.tag": "$ARGOCD_APP_REVISION" for stage in STAGE_CHARTS}
            for objs in (argocd_render(app), argocd_render(app, pinned)):
                images = job_images(objs)
                assert images and all(i.endswith(f":{COMMIT}") for i in images), images
        else:
            assert parameters == []
            images = job_images(argocd_render(app))
            assert images and all(i.endswith(":0.1.0") for i in images), images  # the appVersion
            images = job_images(argocd_render(app, pinned))
            assert images and all(i.endswith(":0.1.1") for i in images), images


def test_project_allows_every_kind_the_chart_renders(project):
    allowed = {(r["group"], r["kind"]) for r in project["spec"]["namespaceResourceWhitelist"]}
    for env in ("dev", "staging", "production"):
        for launcher in ("job", "pytorchjob"):
            objs = render([env_file(env)], {"training.launcher": launcher},
                          api_versions=[*PROMETHEUS_OPERATOR_APIS, *KUBEFLOW_APIS])
            for obj in objs:
                group = obj["apiVersion"].rpartition("/")[0]
                assert (group, obj["kind"]) in allowed, f"{env}: {obj['kind']} ({group}) is not allowed"


def test_automated_sync_only_where_asked(apps):
    auto = {e["env"]: e["autoSync"] for e, _ in apps}
    assert auto == {"dev": "true", "staging": "true", "production": "false"}
    for element, app in apps:
        automated = app["spec"]["syncPolicy"].get("automated")
        if element["autoSync"] == "true":
            assert automated == {"prune": True, "selfHeal": True}
        else:
            assert automated is None
        retry = app["spec"]["syncPolicy"]["retry"]
        assert retry["limit"] == 5  # the patch merges, it does not replace
        assert retry["refresh"] is True  # a retry takes the fix pushed since the failed sync


def test_deleting_the_applicationset_leaves_the_environments_running(appset, project):
    assert appset["spec"]["syncPolicy"]["preserveResourcesOnDeletion"] is True
    # staging's credentials Secret is made by hand beside the release, not orphaned by it
    ignored = project["spec"]["orphanedResources"]["ignore"]
    staging = yaml.safe_load(env_file("staging").read_text())
    assert {"kind": "Secret", "name": staging["global"]["storage"]["s3"]["existingSecret"]} in ignored


def test_a_replaced_job_is_not_pruned_last(apps):
    """PruneLast would keep a superseded Job running until its replacement completes: two
    training Jobs writing the same checkpoints."""
    for _, app in apps:
        assert not any(o.startswith("PruneLast=true") for o in app["spec"]["syncPolicy"].get("syncOptions", []))


def test_a_stage_is_not_synced_before_its_input():
    """A stage in an earlier wave than its input's would hold its nodes while it waits; in the
    same wave preprocessing runs pipelined behind the download."""
    argocd = {"global.argocd.enabled": True}
    with pytest.raises(helm.HelmRenderError, match=re.escape(
            "preprocessing.syncWave (2) is before downloader.syncWave (5): ArgoCD would create the preprocessing Job "
            "first")):
        render([env_file("production")], {**argocd, "downloader.syncWave": 5})
    with pytest.raises(helm.HelmRenderError, match=re.escape(
            "training.syncWave (2) is the same as preprocessing.syncWave (2): ArgoCD would create the training Job with "
            "it, and its pods would hold their nodes while they wait for preprocessing; give it a later wave")):
        render([env_file("production")], {**argocd, "training.syncWave": 2})
    objs = render([env_file("production")], {**argocd, "preprocessing.syncWave": 1})
    waves = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]
             for o in objs if o["kind"] == "Job"}
    assert waves == {"downloader": "1", "preprocessing": "1", "training": "3"}
    # without ArgoCD the waves mean nothing
    assert render([env_file("production")], {"downloader.syncWave": 5})
