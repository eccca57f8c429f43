"""The ArgoCD manifests parse, and everything they point at exists."""
from __future__ import annotations

import re

import pytest
import yaml
from helmrender import KUBEFLOW_APIS, PROMETHEUS_OPERATOR_APIS, ROOT, env_file, render

ARGOCD = ROOT / "argocd"
REPO = "https://github.com/trajflow/trajflow.git"


def load(name):
    docs = [d for d in yaml.safe_load_all((ARGOCD / name).read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def go_template(text: str, params: dict) -> str:
    """ArgoCD's goTemplate for the `{{ .key }}` references these manifests use."""
    def substitute(match):
        key = match.group(1)
        assert key in params, f"missing generator parameter {key}"
        return str(params[key])
    return re.sub(r"\{\{\s*\.(\w+)\s*\}\}", substitute, text)


@pytest.fixture(scope="module")
def project():
    return load("project.yaml")


@pytest.fixture(scope="module")
def appset():
    return load("applicationset.yaml")


def applications(appset):
    template = yaml.safe_dump(appset["spec"]["template"], sort_keys=False)
    for element in appset["spec"]["generators"][0]["list"]["elements"]:
        yield element, yaml.safe_load(go_template(template, element))


def test_kinds(project, appset):
    assert (project["apiVersion"], project["kind"]) == ("argoproj.io/v1alpha1", "AppProject")
    assert (appset["apiVersion"], appset["kind"]) == ("argoproj.io/v1alpha1", "ApplicationSet")
    assert appset["spec"]["goTemplate"] is True


def test_one_application_per_environment(appset):
    envs = [e["env"] for e in appset["spec"]["generators"][0]["list"]["elements"]]
    assert envs == ["dev", "staging", "production"]


def test_applications_point_at_the_chart_and_values_that_exist(appset, project):
    for element, app in applications(appset):
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


def test_each_environment_deploys_to_a_cluster_of_its_own(appset):
    clusters = [app["spec"]["destination"] for _, app in applications(appset)]
    assert all(set(d) == {"name", "namespace"} for d in clusters), clusters  # no in-cluster server for all three
    assert len({d["name"] for d in clusters}) == 3, clusters


def test_the_applications_render_as_argocd_would(appset):
    """helm template with the Application's values: sync waves on, no TTL on Jobs."""
    for element, app in applications(appset):
        values_files = [(ROOT / app["spec"]["source"]["path"] / f).resolve()
                        for f in app["spec"]["source"]["helm"]["valueFiles"]]
        objs = render(values_files, values=app["spec"]["source"]["helm"]["valuesObject"],
                      namespace=app["spec"]["destination"]["namespace"])
        jobs = [o for o in objs if o["kind"] == "Job"]
        assert jobs
        for job in jobs:
            assert "argocd.argoproj.io/sync-wave" in job["metadata"]["annotations"]
            assert "ttlSecondsAfterFinished" not in job["spec"]


def test_environments_following_main_run_the_images_of_their_commit(appset):
    """The images workflow publishes each push to main under its commit: dev and staging run
    those, not the last release's images with a newer chart and config."""
    import json

    from helmrender import STAGE_CHARTS

    workflow = yaml.safe_load((ROOT / ".github/workflows/images.yaml").read_text())
    assert "main" in workflow[True]["push"]["branches"]  # PyYAML reads the key `on` as True
    assert "${GITHUB_SHA}" in json.dumps(workflow)
    for element, app in applications(appset):
        parameters = app["spec"]["source"]["helm"]["parameters"]
        assert all(p["forceString"] is True for p in parameters)
        tags = {p["name"]: p["value"] for p in parameters}
        assert tags == {f"{stage}.image.tag": element["imageTag"] for stage in STAGE_CHARTS}
        following_main = element["revision"] == "main"
        assert element["imageTag"] == ("$ARGOCD_APP_REVISION" if following_main else "")
        sha = "0123456789abcdef0123456789abcdef01234567"
        objs = render([env_file(element["env"])], {k: v.replace("$ARGOCD_APP_REVISION", sha) for k, v in tags.items()})
        jobs = [o for o in objs if o["kind"] == "Job"]
        assert len(jobs) == len(STAGE_CHARTS), [o["metadata"]["name"] for o in jobs]  # one per stage
        images = {c["image"] for o in jobs for c in o["spec"]["template"]["spec"]["containers"]}
        assert images  # (all() of nothing is True)
        assert all(i.endswith(f":{sha}") for i in images) if following_main else all(i.endswith(":0.1.0") for i in images)


def test_project_allows_every_kind_the_chart_renders(project):
    allowed = {(r["group"], r["kind"]) for r in project["spec"]["namespaceResourceWhitelist"]}
    for env in ("dev", "staging", "production"):
        for launcher in ("job", "pytorchjob"):
            objs = render([env_file(env)], {"training.launcher": launcher},
                          api_versions=[*PROMETHEUS_OPERATOR_APIS, *KUBEFLOW_APIS])
            for obj in objs:
                group = obj["apiVersion"].rpartition("/")[0]
                assert (group, obj["kind"]) in allowed, f"{env}: {obj['kind']} ({group}) is not allowed"


def test_automated_sync_only_where_asked(appset):
    patch = appset["spec"]["templatePatch"]
    assert "automated" in patch and ".autoSync" in patch
    auto = {e["env"]: e["autoSync"] for e in appset["spec"]["generators"][0]["list"]["elements"]}
    assert auto == {"dev": "true", "staging": "true", "production": "false"}


def test_a_replaced_job_is_not_pruned_last(appset):
    """PruneLast would keep a superseded Job running until its replacement completes: two
    training Jobs writing the same checkpoints."""
    for _, app in applications(appset):
        assert not any(o.startswith("PruneLast=true") for o in app["spec"]["syncPolicy"].get("syncOptions", []))
