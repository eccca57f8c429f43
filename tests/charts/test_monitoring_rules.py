"""Alert rules and dashboard queries: promtool checks them, promtool's unit tests prove
each alert fires when it should and stays quiet when it should not, and every metric
they read is one the workloads export (read from trajflow.metrics) or a documented
external one."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from monitoring_helpers import (
    CONTEXT_LABELS, EXTERNAL_METRICS, MONITORING_CHART, RULE_TESTS_DIR, dashboard_of, dashboard_queries,
    metric_labels, promtool, render_monitoring, rule_groups, selectors, write_rule_file,
)
from trajflow.testing import requires_tool

needs_promtool = requires_tool("promtool", why="it comes with the Debian package `prometheus` (ci/scripts/install-test-tools.sh)")

# Values that change every knob the rule templates branch on.
VARIANTS = {
    "defaults": {},
    "custom": {
        "gpu": {"podLabel": "exported_pod", "namespaceLabel": "exported_namespace", "podRegex": "train-.*"},
        "prometheusRule": {"selector": "", "runningPushMaxAge": "90s", "additionalAlertLabels": {"team": "ml"},
                           "runbookUrl": "https://wiki.example.com/trajflow/runbooks#",
                           "alerts": {"checkpointTooOld": {"maxAge": "1h30m"}, "trainingLossNaN": {"quietAfter": "2d"}}},
    },
    "release with a dotted name": {"__release": "exp.v2"},
}


def render_variant(values):
    values = dict(values)
    release = values.pop("__release", "trajflow")
    return render_monitoring(values, release=release)


@pytest.fixture(scope="module")
def default_objects():
    return render_monitoring()


def all_expressions(objs):
    """(where, PromQL) of every alert rule and dashboard query."""
    out = [(f"alert {rule['alert']}", rule["expr"]) for group in rule_groups(objs) for rule in group["rules"]]
    out += dashboard_queries(dashboard_of(objs))
    return out


# ---- promtool ----------------------------------------------------------------------------


@needs_promtool
@pytest.mark.parametrize("variant", VARIANTS)
def test_promtool_accepts_the_rendered_rules(variant, tmp_path):
    rules = write_rule_file(rule_groups(render_variant(VARIANTS[variant])), tmp_path / "rules.yaml")
    result = promtool("check", "rules", rules.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 14 rules found" in result.stdout


@needs_promtool
def test_every_alert_has_unit_tests_that_pass(default_objects, tmp_path):
    """tests/monitoring/rules_test.yaml against the rules rendered with default values."""
    groups = rule_groups(default_objects)
    alerts = {rule["alert"] for group in groups for rule in group["rules"]}
    spec = yaml.safe_load((RULE_TESTS_DIR / "rules_test.yaml").read_text())
    tested = {case["alertname"] for test in spec["tests"] for case in test.get("alert_rule_test", [])}
    assert tested == alerts, f"alerts without unit tests: {alerts - tested}; tests of unknown alerts: {tested - alerts}"
    # every alert is shown both firing and quiet
    for alert in alerts:
        cases = [c for t in spec["tests"] for c in t.get("alert_rule_test", []) if c["alertname"] == alert]
        assert any(c.get("exp_alerts") for c in cases), f"{alert}: no test where it fires"
        assert any(not c.get("exp_alerts") for c in cases), f"{alert}: no test where it stays quiet"

    write_rule_file(groups, tmp_path / "rules.yaml", keep_descriptions=False)
    shutil.copy(RULE_TESTS_DIR / "rules_test.yaml", tmp_path / "rules_test.yaml")
    result = promtool("test", "rules", "rules_test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "SUCCESS" in result.stdout


def run_unit_tests(tmp_path: Path, values: dict, tests: list[dict], keep_descriptions: bool = False,
                   release: str = "trajflow") -> str:
    write_rule_file(rule_groups(render_monitoring(values, release=release)), tmp_path / "rules.yaml",
                    keep_descriptions=keep_descriptions)
    spec = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = promtool("test", "rules", "t.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return result.stdout


ERROR_RATIO_SERIES = [
    # a third of the attempts fail
    {"series": 'trajflow_download_failures_total{namespace="trajflow", release="trajflow", job="trajflow", run="r1", stage="download", shard="0", reason="timeout"}',
     "values": "0+30x30"},
    {"series": 'trajflow_download_items_total{namespace="trajflow", release="trajflow", job="trajflow", run="r1", stage="download", shard="0", outcome="fetched"}',
     "values": "0+60x30"},
]


@needs_promtool
def test_a_higher_threshold_silences_what_the_default_reports(tmp_path):
    fires = [{"exp_labels": {"severity": "warning", "release": "trajflow", "namespace": "trajflow", "run": "r1"},
              "exp_annotations": {"summary": "33.33% of the download attempts of run r1 fail (threshold 0.1)"}}]
    run_unit_tests(tmp_path, {}, [{"interval": "1m", "input_series": ERROR_RATIO_SERIES, "alert_rule_test": [
        {"eval_time": "15m", "alertname": "TrajflowDownloadErrorRatioHigh", "exp_alerts": fires}]}])
    run_unit_tests(tmp_path, {"prometheusRule": {"alerts": {"downloadErrorRatio": {"threshold": 0.5}}}},
                   [{"interval": "1m", "input_series": ERROR_RATIO_SERIES, "alert_rule_test": [
                       {"eval_time": "15m", "alertname": "TrajflowDownloadErrorRatioHigh", "exp_alerts": []}]}])


@needs_promtool
@pytest.mark.parametrize("stage,component", [("download", "downloader"), ("preprocess", "preprocessing"),
                                             ("train", "training")])
def test_a_failed_shard_alert_gives_the_command_that_shows_why(tmp_path, stage, component):
    labels = f'namespace="trajflow", release="exp", job="trajflow", run="r1", stage="{stage}", shard="3"'
    series = [{"series": f"trajflow_stage_end_time_seconds{{{labels}}}", "values": "300x60"},
              {"series": f"trajflow_stage_success{{{labels}}}", "values": "0x60"}]
    (rule,) = [r for g in rule_groups(render_monitoring(release="exp")) for r in g["rules"]
               if r["alert"] == "TrajflowShardFailed"]
    described = rule["annotations"]["description"].split("kubectl -n {{", 1)[0]  # the text before the command
    command = (f"kubectl -n trajflow logs -l app.kubernetes.io/instance=exp,app.kubernetes.io/component={component},"
               "batch.kubernetes.io/job-completion-index=3 --prefix --tail=5")
    run_unit_tests(tmp_path, {}, [{"interval": "1m", "input_series": series, "alert_rule_test": [
        {"eval_time": "45m", "alertname": "TrajflowShardFailed", "exp_alerts": [
            {"exp_labels": {"severity": "warning", "release": "exp", "namespace": "trajflow", "run": "r1", "stage": stage,
                            "shard": "3"},
             "exp_annotations": {"summary": f"Stage {stage} shard 3 of run r1 failed",
                                 "description": described + command}}]}]}], keep_descriptions=True, release="exp")


@needs_promtool
def test_gpu_alerts_follow_the_exporters_label_names(tmp_path):
    """An exporter scraped without honorLabels names the workload pod `exported_pod`."""
    pod = "trajflow-training-0a1b2c3d-0-x7k2p"
    series = [
        {"series": f'DCGM_FI_DEV_GPU_UTIL{{namespace="gpu-operator", pod="dcgm-exporter-abc", exported_namespace="trajflow", exported_pod="{pod}", gpu="0"}}',
         "values": "4x60"},
        {"series": 'DCGM_FI_DEV_GPU_UTIL{namespace="gpu-operator", pod="dcgm-exporter-abc", exported_namespace="trajflow", exported_pod="notebook-0", gpu="1"}',
         "values": "0x60"},
    ]
    values = {"gpu": {"podLabel": "exported_pod", "namespaceLabel": "exported_namespace"}}
    run_unit_tests(tmp_path, values, [{"interval": "1m", "input_series": series, "alert_rule_test": [
        {"eval_time": "45m", "alertname": "TrajflowGpuUnderused", "exp_alerts": [
            {"exp_labels": {"severity": "warning", "release": "trajflow", "namespace": "trajflow", "pod": pod},
             "exp_annotations": {"summary": f"GPUs of pod trajflow/{pod} are 4% busy"}}]}]}])


@needs_promtool
def test_every_dashboard_query_parses(default_objects, tmp_path):
    """promtool parses each query (variables filled in) as a recording rule."""
    queries = dashboard_queries(dashboard_of(default_objects))
    assert len(queries) >= 30
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- metric names ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_metric_used_is_exported_by_the_workloads_or_external(variant):
    pytest.importorskip("promql_parser", reason="promql-parser is not installed (pip install -e 'workloads[test]')")
    from trajflow.metrics import exported_names

    exported = exported_names()
    labels_of = metric_labels()
    used: set[str] = set()
    for where, expr in all_expressions(render_variant(VARIANTS[variant])):
        for name, matched_labels in selectors(expr):
            assert name, f"{where}: a selector without a metric name: {expr}"
            used.add(name)
            if name in EXTERNAL_METRICS:
                continue
            assert name in exported, (
                f"{where} reads {name}, which no stage exports (trajflow.metrics) and which is not in "
                f"EXTERNAL_METRICS: {expr}")
            unknown = matched_labels - labels_of[name] - CONTEXT_LABELS
            assert not unknown, f"{where} matches labels {unknown} that {name} does not have"
    # the dashboard covers every stage and the checks saw the external sources too
    assert any(n.startswith("trajflow_download_") for n in used)
    assert any(n.startswith("trajflow_preprocess_") for n in used)
    assert any(n.startswith("trajflow_train_") for n in used)
    assert set(EXTERNAL_METRICS) <= used, f"documented but unused external metrics: {set(EXTERNAL_METRICS) - used}"


def test_external_metrics_are_documented_in_the_chart_readme():
    readme = (MONITORING_CHART / "README.md").read_text()
    for name in EXTERNAL_METRICS:
        assert f"`{name}`" in readme, f"README.md does not list the external metric {name}"


def test_latency_quantiles_aggregate_buckets_by_le(default_objects):
    quantiles = [(w, e) for w, e in all_expressions(default_objects) if "histogram_quantile" in e]
    assert {q for w, e in quantiles for q in re.findall(r"histogram_quantile\(([0-9.]+)", e)} == {"0.5", "0.95", "0.99"}
    for where, expr in quantiles:
        for call in re.findall(r"histogram_quantile\([^,]+,\s*(.*)\)\s*$", expr):
            assert re.fullmatch(r"sum by \(le\) \(rate\(\w+_bucket\{[^}]*\}\[5m\]\)\)", call.strip()), (where, expr)


def test_selector_helper_sees_every_metric():
    """The checker itself: names in functions, binary operations, subqueries and offsets."""
    pytest.importorskip("promql_parser")
    expr = ('histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="1"}[5m]))) / on (run) group_left '
            'max by (run) (b offset 5m) or max_over_time(c[1h:1m]) unless {__name__="d", y="2"}')
    found = dict((name, labels) for name, labels in selectors(expr))
    assert found == {"a_bucket": {"x"}, "b": set(), "c": set(), "d": {"y"}}
