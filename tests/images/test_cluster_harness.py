"""The cluster-test harness itself, checked without a cluster.

The kind path (.github/workflows/e2e.yaml -> ci/kind-config.yaml -> tests/cluster with
values/kind.yaml) cannot run here, so what it would do is read and rendered: the chart is
rendered with exactly the values files and `--set`s the cluster tests pass to helm, and every
image and hostPath it uses is matched against what the workflow builds, loads and mounts.
"""
from __future__ import annotations

import importlib
import os
import posixpath
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "cluster"))

from kube import NEXT_IMAGE_TAG, SCALED_PARALLELISM, helm_values_args, job_state  # noqa: E402

WORKFLOW = REPO / ".github" / "workflows" / "e2e.yaml"
BAKE = REPO / "images" / "docker-bake.hcl"
KIND_CONFIG = REPO / "ci" / "kind-config.yaml"
WORKLOAD_KINDS = ("Job", "Deployment", "StatefulSet", "DaemonSet", "Pod")
# Variables the GitHub runner sets for every step (placeholders: only their use is checked).
RUNNER_ENV = {"RUNNER_TEMP": "/runner/temp", "GITHUB_ENV": "/runner/env", "GITHUB_WORKSPACE": "/runner/work", "HOME": "/home/runner"}


# ---- the Job waiter ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ([], "running"),
        ([{"type": "Suspended", "status": "True"}], "running"),
        ([{"type": "SuccessCriteriaMet", "status": "True"}], "succeeded"),
        ([{"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}], "succeeded"),
        ([{"type": "Suspended", "status": "False"}, {"type": "Complete", "status": "True"}], "succeeded"),
        ([{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy"}], "failed"),
        ([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}], "failed"),
        ([{"type": "Suspended", "status": "False"}, {"type": "FailureTarget", "status": "True"},
          {"type": "Failed", "status": "True"}], "failed"),
        ([{"type": "Failed", "status": "False"}], "running"),
        ([{"type": "Complete", "status": "Unknown"}], "running"),
    ],
)
def test_job_state_scans_every_condition(conditions: list[dict[str, str]], expected: str) -> None:
    state, _ = job_state({"status": {"conditions": conditions}})
    assert state == expected


def test_job_state_reads_past_non_terminal_conditions() -> None:
    # the terminal condition is not the first one: a waiter that only looks at [0] never ends
    job = {"status": {"conditions": [
        {"type": "Suspended", "status": "False"},
        {"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy", "message": "exit code 2"},
    ]}}
    state, detail = job_state(job)
    assert state == "failed" and "PodFailurePolicy" in detail and "exit code 2" in detail
    assert job_state({})[0] == "running"


def _cluster_pytest(**env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("KUBECONFIG", "TRAJFLOW_E2E_REQUIRE_CLUSTER", "TRAJFLOW_E2E_KEEP_RELEASE")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(REPO / "tests" / "cluster"), "-q", "-rs", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        env={**base, **env},
        cwd=REPO,
    )


def test_cluster_tests_collect_and_skip_without_cluster() -> None:
    proc = _cluster_pytest()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped" in proc.stdout and "KUBECONFIG is not set" in proc.stdout
    assert "error" not in proc.stdout.lower().split("short test summary")[0]


def test_cluster_tests_fail_without_cluster_when_required() -> None:
    # the e2e workflow sets this: a run on kind that skipped everything must not pass
    proc = _cluster_pytest(TRAJFLOW_E2E_REQUIRE_CLUSTER="1")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "TRAJFLOW_E2E_REQUIRE_CLUSTER is set but KUBECONFIG is not set" in proc.stdout


# ---- the workflow, read ------------------------------------------------------------------


@pytest.fixture(scope="module")
def job() -> dict[str, Any]:
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    assert list(jobs) == ["kind"], list(jobs)
    return jobs["kind"]


def _step_index(job: dict[str, Any], *, run: str = "", uses: str = "") -> int:
    found = [i for i, s in enumerate(job["steps"])
             if (run and run in s.get("run", "")) or (uses and s.get("uses", "").startswith(uses))]
    assert len(found) == 1, f"expected one step with {run or uses!r}, found {len(found)}"
    return found[0]


def _expand(text: str, env: dict[str, str]) -> str:
    def var(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in env, f"${name} is used in {text!r} but the workflow does not set it"
        return env[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", var, text)


def _command(job: dict[str, Any], program: str) -> list[str]:
    """The words of the one command line that starts with `program`, with the job's and the
    step's env expanded as the shell would."""
    step = job["steps"][_step_index(job, run=program)]
    env = {**RUNNER_ENV, **job.get("env", {}), **step.get("env", {})}
    lines = step["run"].replace("\\\n", " ").splitlines()
    found = [line for line in lines if program in line]
    assert len(found) == 1, f"expected one {program!r} line in {step['run']!r}"
    words = shlex.split(found[0], comments=True)
    first, *rest = program.split()
    # `.venv/bin/pytest tests/cluster` is the command `pytest tests/cluster`
    start = next(i for i in range(len(words))
                 if posixpath.basename(words[i]) == first and words[i + 1:i + 1 + len(rest)] == rest)
    return [_expand(w, env) for w in words[start:]]


def _option(words: list[str], *names: str) -> str | None:
    for i, word in enumerate(words):
        for name in names:
            if word == name and i + 1 < len(words):
                return words[i + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
    return None


def _bake_images(words: list[str], env: dict[str, str]) -> set[str]:
    """The image references `docker buildx bake` tags: the targets named on the command line
    (else the default group), their `tags` with the file's variables, which bake lets
    environment variables of the same name override."""
    assert "--load" in words, "the images must be loaded into the local engine for `kind load`"
    assert not any(w == "--set" or w.startswith("--set=") for w in words), \
        "this harness reads the tags from the bake file; `--set` overrides are not understood"
    assert _option(words, "-f", "--file") == str(BAKE.relative_to(REPO))
    hcl = BAKE.read_text()
    variables = dict(re.findall(r'variable "(\w+)" \{\s*default = "([^"]*)"\s*\}', hcl))
    variables.update({k: v for k, v in env.items() if k in variables})
    blocks = {(kind, name): body for kind, name, body in re.findall(r'(?ms)^(target|group) "([\w-]+)" \{\n(.*?)^\}', hcl)}

    def strings(body: str, key: str) -> list[str] | None:
        match = re.search(rf"(?m)^\s*{key}\s*=\s*\[(.*?)\]", body, re.S)
        return re.findall(r'"([^"]*)"', match.group(1)) if match else None

    def tags(target: str) -> list[str]:
        body = blocks[("target", target)]
        own = strings(body, "tags")
        if own is not None:
            return own
        return [t for parent in strings(body, "inherits") or [] for t in tags(parent)]

    positional, skip = [], False
    for word in words[3:]:  # after `docker buildx bake`
        if skip:
            skip = False
        elif word in ("-f", "--file", "--set", "--progress", "--builder"):
            skip = True
        elif not word.startswith("-"):
            positional.append(word)
    queue, targets = positional or ["default"], []
    while queue:
        name = queue.pop(0)
        if ("group", name) in blocks:
            queue += strings(blocks[("group", name)], "targets") or []
        else:
            assert ("target", name) in blocks, f"bake has no target or group {name!r}"
            targets.append(name)
    refs = {ref for t in targets for ref in tags(t)}
    return {re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], ref) for ref in refs}


@pytest.fixture(scope="module")
def built(job: dict[str, Any]) -> set[str]:
    step = job["steps"][_step_index(job, run="docker buildx bake")]
    return _bake_images(_command(job, "docker buildx bake"), {**job.get("env", {}), **step.get("env", {})})


@pytest.fixture(scope="module")
def loaded(job: dict[str, Any]) -> set[str]:
    words = _command(job, "kind load docker-image")
    images, skip = set(), False
    for word in words[3:]:
        if skip:
            skip = False
        elif word in ("--name", "-n", "--nodes"):
            skip = True
        elif not word.startswith("-"):
            images.add(word)
    assert images, "`kind load docker-image` loads nothing"
    return images


def test_workflow_loads_what_it_builds(built: set[str], loaded: set[str]) -> None:
    assert built, "docker buildx bake builds no image"
    assert loaded <= built, f"kind loads images the bake step does not build: {sorted(loaded - built)}"


def test_workflow_steps_agree_on_the_cluster(job: dict[str, Any]) -> None:
    kind_step = job["steps"][_step_index(job, uses="helm/kind-action@")]
    cluster = kind_step["with"]["cluster_name"]
    assert (REPO / kind_step["with"]["config"]).resolve() == KIND_CONFIG
    for program in ("kind load docker-image", "kind get kubeconfig"):
        assert _option(_command(job, program), "--name", "-n") == cluster, f"{program} names another cluster"
    # kind-action does not export KUBECONFIG; the cluster tests skip (or, required, fail) without it
    kubeconfig_step = job["steps"][_step_index(job, run="kind get kubeconfig")]
    assert "KUBECONFIG=" in kubeconfig_step["run"] and "GITHUB_ENV" in kubeconfig_step["run"]
    order = [_step_index(job, run="trajflow demo-data"), _step_index(job, uses="helm/kind-action@"),
             _step_index(job, run="kind get kubeconfig"), _step_index(job, run="kind load docker-image"),
             _step_index(job, run="pytest tests/cluster")]
    assert order == sorted(order), "demo data before the cluster; cluster, kubeconfig, images before the tests"
    tests = job["steps"][order[-1]]
    assert tests["env"]["TRAJFLOW_E2E_REQUIRE_CLUSTER"] == "1"
    assert _option(_command(job, "pytest tests/cluster"), "--timeout")


def test_demo_data_is_what_the_kind_node_mounts(job: dict[str, Any]) -> None:
    out = _option(_command(job, "trajflow demo-data"), "--out")
    assert out, "`trajflow demo-data` without --out"
    mounts = [m for node in yaml.safe_load(KIND_CONFIG.read_text())["nodes"] for m in node.get("extraMounts", [])]
    assert posixpath.normpath(out) in {posixpath.normpath(m["hostPath"]) for m in mounts}, (out, mounts)


@pytest.fixture(scope="module")
def kube_versions(job: dict[str, Any]) -> list[str]:
    versions = []
    for node in job["strategy"]["matrix"]["node"]:
        match = re.fullmatch(r"kindest/node:v(\d+\.\d+\.\d+)@sha256:[0-9a-f]{64}", node)
        assert match, f"{node}: a kind node image is pinned by digest (an image built for the kind release)"
        versions.append(match.group(1))
    return versions


# ---- the chart, rendered as the cluster tests install it ---------------------------------


@pytest.fixture(scope="module")
def helmrender() -> ModuleType:
    sys.path.insert(0, str(REPO / "tests" / "charts"))
    return importlib.import_module("helmrender")


def _render_as_cluster_tests(helmrender: ModuleType, extra_sets: dict[str, Any] | None = None,
                             **kwargs: Any) -> list[dict[str, Any]]:
    """Render with the `-f` files and `--set`s that tests/cluster passes to helm."""
    args = helm_values_args(extra_sets)
    files = [args[i + 1] for i, a in enumerate(args) if a == "-f"]
    sets: dict[str, Any] = {}
    for i, a in enumerate(args):
        if a == "--set":
            key, _, value = args[i + 1].partition("=")
            sets[key] = yaml.safe_load(value)  # --set's typing of plain scalars
    assert len(files) + len(sets) == len(args) / 2, f"unexpected helm arguments: {args}"
    return helmrender.render(files, sets, release="tf", namespace="trajflow-e2e", **kwargs)


def _pod_specs(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for obj in objs:
        if obj["kind"] == "Pod":
            out.append((obj["metadata"]["name"], obj["spec"]))
        elif obj["kind"] in WORKLOAD_KINDS:
            out.append((obj["metadata"]["name"], obj["spec"]["template"]["spec"]))
    return out


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


@pytest.fixture(scope="module")
def installed(helmrender: ModuleType, kube_versions: list[str]) -> list[dict[str, Any]]:
    return _render_as_cluster_tests(helmrender, kube_version=kube_versions[-1])


def test_every_image_is_one_the_workflow_loads(installed: list[dict[str, Any]], loaded: set[str]) -> None:
    seen = set()
    for name, spec in _pod_specs(installed):
        for c in _containers(spec):
            seen.add(c["image"])
            assert c["image"] in loaded, f"{name}/{c['name']}: {c['image']} is not built and loaded by {WORKFLOW.name}"
            # kind-loaded images exist only on the node: never pull them
            assert c.get("imagePullPolicy") == "Never", f"{name}/{c['name']}: imagePullPolicy {c.get('imagePullPolicy')}"
    assert len(seen) >= 2, f"expected the downloader and the GPU image, rendered {sorted(seen)}"


def test_every_host_path_is_mounted_into_the_kind_node(installed: list[dict[str, Any]]) -> None:
    mounts = [m for node in yaml.safe_load(KIND_CONFIG.read_text())["nodes"] for m in node.get("extraMounts", [])]
    node_paths = [posixpath.normpath(m["containerPath"]) for m in mounts]
    host_paths = []
    for name, spec in _pod_specs(installed):
        for volume in spec.get("volumes", []):
            if "hostPath" in volume:
                path = posixpath.normpath(volume["hostPath"]["path"])
                host_paths.append(path)
                assert any(path == p or path.startswith(p + "/") for p in node_paths), \
                    f"{name}: hostPath {path} is not under a kind extraMount {node_paths}"
    assert host_paths, "the kind values serve the demo data through a hostPath volume"


def test_file_sources_read_the_node_mount(installed: list[dict[str, Any]], helmrender: ModuleType) -> None:
    """downloader config `sources[type=file].path` -> container mount -> hostPath volume."""
    job = helmrender.one(installed, "Job", component="downloader")
    config_map = helmrender.one(installed, "ConfigMap", component="downloader")
    sources = yaml.safe_load(config_map["data"]["config.yaml"])["config"]["sources"]
    files = [s["path"] for s in sources if s["type"] == "file"]
    assert files, "the kind values download the demo data from a file source"
    spec = helmrender.pod_spec(job)
    host_volumes = {v["name"] for v in spec["volumes"] if "hostPath" in v}
    container = helmrender.container(job, "download")
    for path in files:
        path = posixpath.normpath(path)
        via = [m for m in container["volumeMounts"]
               if path == posixpath.normpath(m["mountPath"]) or path.startswith(posixpath.normpath(m["mountPath"]) + "/")]
        assert via and via[-1]["name"] in host_volumes, f"file source {path} is not read from the node's hostPath mount"


def test_scaling_keeps_the_job_and_a_new_image_replaces_it(helmrender: ModuleType, installed: list[dict[str, Any]]) -> None:
    """What tests/cluster/test_install.py expects from its two `helm upgrade`s."""
    before = helmrender.one(installed, "Job", component="downloader")
    scaled = helmrender.one(_render_as_cluster_tests(helmrender, {"downloader.parallelism": SCALED_PARALLELISM}),
                            "Job", component="downloader")
    assert before["spec"]["parallelism"] != SCALED_PARALLELISM
    assert scaled["metadata"]["name"] == before["metadata"]["name"]
    assert scaled["spec"]["parallelism"] == SCALED_PARALLELISM
    retagged = helmrender.one(_render_as_cluster_tests(helmrender, {"downloader.image.tag": NEXT_IMAGE_TAG}),
                              "Job", component="downloader")
    assert retagged["metadata"]["name"] != before["metadata"]["name"]
    assert helmrender.container(retagged, "download")["image"].endswith(f":{NEXT_IMAGE_TAG}")


def test_rendered_objects_validate_on_the_kind_node_versions(helmrender: ModuleType, kube_versions: list[str]) -> None:
    kv = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate is not installed")
    oldest = min(kube_versions, key=lambda v: tuple(map(int, v.split("."))))
    assert oldest.split(".")[:2] == helmrender.OLDEST_KUBE.split(".")[:2], \
        f"the e2e matrix should cover the oldest supported Kubernetes ({helmrender.OLDEST_KUBE}), not {oldest}"
    for version in kube_versions:
        schema = ".".join(version.split(".")[:2] + ["0"])
        assert schema in kv.all_versions(), f"kubernetes-validate has no schema for {schema}"
        objs = _render_as_cluster_tests(helmrender, kube_version=version)
        for obj in objs:
            try:
                kv.validate(obj, schema, strict=True)
            except kv.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{version}: {obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}")
        assert any(o["kind"] == "Job" for o in objs)
