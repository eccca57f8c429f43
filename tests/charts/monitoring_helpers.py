"""Helpers of the monitoring chart tests: rendering, PromQL inspection, a real Prometheus.

The rules and the dashboard may only use metrics that the workloads export
(`trajflow.metrics.exported_names()`, read from the code) or the external metrics listed
in EXTERNAL_METRICS below, which is also what the monitoring chart's README documents.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from helmrender import PROMETHEUS_OPERATOR_APIS, SUBCHARTS, one, render

MONITORING_CHART = SUBCHARTS / "monitoring"
RULE_TESTS_DIR = Path(__file__).resolve().parents[1] / "monitoring"

# Metrics the rules and the dashboard read that trajflow does not export itself.
EXTERNAL_METRICS: dict[str, str] = {
    "kube_job_failed": "kube-state-metrics: a Job's Failed condition (label condition=true|false|unknown)",
    "kube_job_created": "kube-state-metrics: a Job's creation time (Unix seconds)",
    "DCGM_FI_DEV_GPU_UTIL": "NVIDIA DCGM exporter: GPU utilisation in percent",
    "DCGM_FI_DEV_FB_USED": "NVIDIA DCGM exporter: framebuffer memory used (MiB)",
    "DCGM_FI_DEV_FB_FREE": "NVIDIA DCGM exporter: framebuffer memory free (MiB)",
    "up": "Prometheus: 1 when the last scrape of a target succeeded",
    "push_time_seconds": "Pushgateway: time of a group's last successful push",
    "push_failure_time_seconds": "Pushgateway: time of a group's last rejected push",
}

# Labels a trajflow series may carry besides its own: the Pushgateway grouping key,
# what Prometheus and the PodMonitor add, and histogram buckets.
CONTEXT_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint",
                  "run", "stage", "shard", "release", "local_rank", "le"}


def render_monitoring(values: dict[str, Any] | None = None, *, operator: bool = True, **kwargs: Any) -> list[dict[str, Any]]:
    """The monitoring chart rendered on its own, on a cluster with (or without) the operator CRDs."""
    apis = PROMETHEUS_OPERATOR_APIS if operator else ()
    return render(chart=MONITORING_CHART, values=values or {}, api_versions=apis, **kwargs)


def rule_groups(objs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return one(objs, "PrometheusRule")["spec"]["groups"]


def alert_rules(objs: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in rule_groups(objs) for rule in group["rules"]}


def dashboard_of(objs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    cm = one(objs, "ConfigMap", component="monitoring")
    (text,) = cm["data"].values()
    return json.loads(text)


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows nest their panels


_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)")
# Grafana's own variables: ranges the dashboard's time picker sets
_GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}


def dashboard_variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """The value each variable takes with everything selected: `All` for query variables,
    the value of constants; data source variables are not part of expressions."""
    out = dict(_GRAFANA_BUILTINS)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            assert var.get("includeAll") and var.get("allValue"), f"variable {var['name']} needs an All value"
            out[var["name"]] = var["allValue"]
        elif var["type"] in ("constant", "textbox", "custom"):
            out[var["name"]] = str(var["query"])
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    """`expr` with the variables filled in as Grafana's Prometheus data source fills them:
    a value without a format has its backslashes doubled (its prometheusRegularEscape, for
    a value going into a PromQL string); `${name:raw}` is put in as it is."""
    def one_variable(match: re.Match[str]) -> str:
        name, form = match.group(1) or match.group(3), match.group(2)
        if name.isdigit():  # $1 of label_replace
            return match.group(0)
        if name not in variables:
            raise KeyError(f"expression uses undefined dashboard variable ${name}: {expr}")
        return variables[name] if form == "raw" else variables[name].replace("\\", "\\\\")

    return _VARIABLE.sub(one_variable, expr)


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable, variables filled in."""
    variables = dashboard_variables(dashboard)
    out: list[tuple[str, str]] = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((f"panel {panel['title']!r} {target['refId']}", substitute(target["expr"], variables)))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
            assert match, f"variable {var['name']}: unexpected query {query!r}"
            out.append((f"variable {var['name']}", substitute(match.group(1), variables)))
    return out


# ---- PromQL --------------------------------------------------------------------------


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every vector selector in `expr`."""
    import promql_parser

    found: list[tuple[str, set[str]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers}
            name = node.name
            if not name:
                name = next((m.value for m in node.matchers.matchers
                             if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal), "")
            found.append((name, labels - {"__name__"}))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def metric_labels() -> dict[str, set[str]]:
    """Sample name -> label names, for every series the workloads export (read from the code)."""
    from trajflow.metrics import CATALOGS

    out: dict[str, set[str]] = {}
    for make in CATALOGS.values():
        registry = make().registry
        for name, collector in registry._names_to_collectors.items():
            out.setdefault(name, set()).update(getattr(collector, "_labelnames", ()))
    return out


# ---- promtool --------------------------------------------------------------------------


def write_rule_file(groups: list[dict[str, Any]], path: Path, *, keep_descriptions: bool = True) -> Path:
    if not keep_descriptions:
        groups = json.loads(json.dumps(groups))
        for group in groups:
            for rule in group["rules"]:
                rule.get("annotations", {}).pop("description", None)
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# ---- a real Prometheus -----------------------------------------------------------------


@dataclass
class Prometheus:
    """A throw-away Prometheus on 127.0.0.1 (Debian `prometheus`), its own temp data dir."""

    url: str
    process: subprocess.Popen[bytes]
    workdir: Path

    @classmethod
    def start(cls, config: dict[str, Any], rule_groups: list[dict[str, Any]] | None = None,
              timeout_s: float = 30.0) -> "Prometheus":
        from trajflow.testing import free_port, tool_path

        binary = tool_path("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed")
        workdir = Path(tempfile.mkdtemp(prefix="trajflow-prometheus-"))
        config = dict(config)
        if rule_groups is not None:
            write_rule_file(rule_groups, workdir / "rules.yaml")
            config["rule_files"] = [str(workdir / "rules.yaml")]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        log = open(workdir / "prometheus.log", "ab")
        process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        server = cls(f"http://127.0.0.1:{port}", process, workdir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = server.log()[-3000:]
                server.stop()
                raise RuntimeError(f"prometheus exited with status {process.returncode}: {tail}")
            with contextlib.suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return server
            time.sleep(0.2)
        server.stop()
        raise RuntimeError(f"prometheus on {server.url} not ready after {timeout_s:.0f}s")

    def log(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:  # 400/422 carry the PromQL error
            body = json.loads(exc.read() or b"{}")
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def wait_for(self, expr: str, predicate: Any = bool, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Poll `expr` until `predicate(result)` holds; fail with the last result."""
        deadline = time.monotonic() + timeout_s
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if predicate(result):
                return result
            time.sleep(0.25)
        raise AssertionError(f"{expr}: still {result} after {timeout_s:.0f}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)
