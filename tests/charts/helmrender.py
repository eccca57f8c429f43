"""Render helpers for chart tests: Helm's own engine (helm_python), no helm binary, no cluster.

    objs = render(values_files=["values/production.yaml"], set_values={"downloader.parallelism": 8})
    job = one(objs, "Job", component="downloader")

`values_files` merge in order like `helm -f a -f b`; `set_values` maps dotted keys to
values like `--set-json key=<json>`; `api_versions` and `kube_version` are the
`--api-versions` / `--kube-version` of `helm template`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install -e 'workloads[test]')")
from helm_python import _native

helm.disable_logging()
# libyaml's loader when PyYAML has it: parsing the output costs as much as rendering in Python
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "trajflow"
SUBCHARTS = CHART / "charts"
STAGE_CHARTS = ("downloader", "preprocessing", "training")
VALUES_DIR = ROOT / "values"
ENVIRONMENTS = ("dev", "staging", "production", "local", "kind")

# The Kubernetes versions the charts support (README "Compatibility"): Elastic Indexed
# Jobs and backoffLimitPerIndex need 1.31; the newest is the newest kubernetes-validate knows.
OLDEST_KUBE = "1.31.0"
NEWEST_KUBE = "1.37.0"
SUPPORTED_KUBE = (OLDEST_KUBE, NEWEST_KUBE)

RELEASE = "trajflow"
NAMESPACE = "trajflow"

# `--api-versions` of clusters with the Prometheus operator / Kubeflow training operator.
PROMETHEUS_OPERATOR_APIS = (
    "monitoring.coreos.com/v1",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PodMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
)
KUBEFLOW_APIS = ("kubeflow.org/v1", "kubeflow.org/v1/PyTorchJob")

def _load_chart(path: Path):
    # A fresh load per render, as `helm template` does: Helm drops disabled subcharts from
    # the loaded chart while rendering, so a loaded chart must not be reused.
    return helm.Chart.load(Path(path).resolve())


def merge_values(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`helm -f base -f override`: maps merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_values(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_values(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_absolute():
        path = ROOT / path
    return helm.values_from_yaml(path.read_text())


# The chart refuses a download with no source, its default: a render whose values name none
# gets this one, as any user's values name one. Tests of the refusal give `sources` themselves.
EXAMPLE_SOURCES = [{"type": "https", "name": "example", "urls": ["https://data.example.com/a.bin"]}]


def user_values(values_files: Iterable[str | os.PathLike[str]] = (),
                set_values: Mapping[str, Any] | None = None,
                values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in values_files:
        merged = merge_values(merged, read_values(path))
    if values:
        merged = merge_values(merged, values)
    for key, value in (set_values or {}).items():
        merged = merge_values(merged, helm.parse_set_json(f"{key}={json.dumps(value)}"))
    return merged


def with_a_source(vals: dict[str, Any], downloader_key: tuple[str, ...]) -> dict[str, Any]:
    """`vals` with EXAMPLE_SOURCES where they name no download source; `downloader_key` is
    where the downloader's values sit (("downloader",) in the umbrella, () in its own chart)."""
    block: Any = vals
    for key in downloader_key:
        block = block.get(key, {}) if isinstance(block, Mapping) else None
    if not isinstance(block, Mapping) or "sources" in (block.get("config") or {}):
        return vals
    example: dict[str, Any] = {"config": {"sources": EXAMPLE_SOURCES}}
    for key in reversed(downloader_key):
        example = {key: example}
    return merge_values(example, vals)


def render_templates(values_files: Iterable[str | os.PathLike[str]] = (),
                     set_values: Mapping[str, Any] | None = None, *,
                     values: Mapping[str, Any] | None = None,
                     chart: str | os.PathLike[str] = CHART,
                     api_versions: Iterable[str] = (),
                     kube_version: str = NEWEST_KUBE,
                     release: str = RELEASE,
                     namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included), like `helm template`."""
    opts = {
        "name": release,
        "namespace": namespace,
        "is_install": True,
        "kube_version": f"v{kube_version.lstrip('v')}",
        "api_versions": list(api_versions),
    }
    vals = user_values(values_files, set_values, values)
    chart = Path(chart).resolve()
    if chart in (CHART.resolve(), (SUBCHARTS / "downloader").resolve()):
        vals = with_a_source(vals, ("downloader",) if chart == CHART.resolve() else ())
    with _load_chart(Path(chart)) as loaded:
        rendered = _native.call_string("helm_render", loaded._raw(), json.dumps(vals), json.dumps(opts))
    return json.loads(rendered)


def render(values_files: Iterable[str | os.PathLike[str]] = (),
           set_values: Mapping[str, Any] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """Every object the chart renders, in template order."""
    objs: list[dict[str, Any]] = []
    for name, text in sorted(render_templates(values_files, set_values, **kwargs).items()):
        if name.endswith("NOTES.txt"):
            continue
        for doc in yaml.load_all(text, Loader=_YAML_LOADER):
            if doc:
                objs.append(doc)
    return objs


def notes(values_files: Iterable[str | os.PathLike[str]] = (),
          set_values: Mapping[str, Any] | None = None, **kwargs: Any) -> str:
    rendered = render_templates(values_files, set_values, **kwargs)
    return next((text for name, text in rendered.items() if name.endswith("NOTES.txt")), "")


def select(objs: Iterable[dict[str, Any]], kind: str, component: str | None = None) -> list[dict[str, Any]]:
    out = []
    for obj in objs:
        if obj.get("kind") != kind:
            continue
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if component is None or labels.get("app.kubernetes.io/component") == component:
            out.append(obj)
    return out


def one(objs: Iterable[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = select(objs, kind, component)
    assert len(found) == 1, f"expected one {kind} of component {component}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def env_file(name: str) -> Path:
    return VALUES_DIR / f"{name}.yaml"


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "PyTorchJob":
        return workload["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod_spec(workload)
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name} in {workload['metadata']['name']}")


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def without_rerun(spec):
    """A workload's spec without its containers' TRAJFLOW_RERUN (the release's attempt)."""
    spec = yaml.safe_load(yaml.safe_dump(spec))
    for template in _pod_templates(spec):
        for c in [*template["spec"].get("initContainers", []), *template["spec"]["containers"]]:
            c["env"] = [e for e in c.get("env", []) if e["name"] != "TRAJFLOW_RERUN"]
    return spec


def _pod_templates(spec):
    if "template" in spec:
        return [spec["template"]]
    return [replica["template"] for replica in spec.get("pytorchReplicaSpecs", {}).values()]
