"""The monitoring chart's objects: Pushgateway, operator objects gated on the CRDs,
the dashboard ConfigMap, and the values schema."""
from __future__ import annotations

import copy
import json
import re
from urllib.parse import urlparse

import pytest
import yaml

from helmrender import CHART, NAMESPACE, PROMETHEUS_OPERATOR_APIS, SUBCHARTS, env_file, one, render, select
from monitoring_helpers import (
    MONITORING_CHART,
    alert_rules,
    dashboard_of,
    dashboard_variables,
    render_monitoring,
    substitute,
)

helm = pytest.importorskip("helm_python")
kv = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate is not installed")

OPERATOR_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")


def kinds(objs):
    return sorted(o["kind"] for o in objs)


def test_without_the_operator_only_core_objects_render():
    objs = render_monitoring(operator=False)
    assert kinds(objs) == ["ConfigMap", "Deployment", "Service", "ServiceAccount"]


def test_with_the_operator_every_object_renders():
    objs = render_monitoring()
    for kind in OPERATOR_KINDS:
        assert len(select(objs, kind)) == 1, kind


@pytest.mark.parametrize("key, kind", [("serviceMonitor", "ServiceMonitor"), ("podMonitor", "PodMonitor"),
                                       ("prometheusRule", "PrometheusRule")])
def test_explicitly_enabled_without_the_operator_fails_naming_the_way_out(key, kind):
    with pytest.raises(helm.HelmError) as err:
        render_monitoring({key: {"enabled": True}}, operator=False)
    message = str(err.value)
    assert f"{key}.enabled is true" in message and "monitoring.coreos.com/v1" in message, message
    assert "--api-versions" in message


@pytest.mark.parametrize("key, kind", [("serviceMonitor", "ServiceMonitor"), ("podMonitor", "PodMonitor"),
                                       ("prometheusRule", "PrometheusRule")])
def test_operator_objects_can_be_forced_on_or_off(key, kind):
    assert len(select(render_monitoring({key: {"enabled": True}}), kind)) == 1
    assert select(render_monitoring({key: {"enabled": False}}), kind) == []


def test_pushgateway_service_is_where_the_stages_push_by_default():
    """The stages' in-release URL (common's helper) must resolve to this Service and port."""
    values = {"global": {"metrics": {"pushgatewayUrl": '{{ include "trajflow.inReleasePushgatewayUrl" . }}'}},
              "monitoring": {"enabled": True}}
    objs = render(values=values, api_versions=PROMETHEUS_OPERATOR_APIS)
    service = one(objs, "Service", component="pushgateway")
    downloader_config = one(objs, "ConfigMap", component="downloader")
    url = yaml.safe_load(downloader_config["data"]["config.yaml"])["global"]["metrics"]["pushgatewayUrl"]
    parsed = urlparse(url)
    assert parsed.hostname == f"{service['metadata']['name']}.{NAMESPACE}.svc", url
    assert parsed.port == service["spec"]["ports"][0]["port"] == 9091


def test_a_pushgateway_url_template_that_renders_to_no_url_is_refused():
    """The schema lets a template through unchecked; without a scheme every batch pod would exit 2."""
    import helm_python as helm

    with pytest.raises(helm.HelmError, match=re.escape('global.metrics.pushgatewayUrl renders to "trajflow-pg:9091"')):
        render([env_file("local")], {"global.metrics.pushgatewayUrl": "{{ .Release.Name }}-pg:9091"})
    with pytest.raises(helm.HelmError, match=re.escape('renders to "http://trajflow-pg:99999"')):
        render([env_file("local")], {"global.metrics.pushgatewayUrl": "http://{{ .Release.Name }}-pg:99999"})
    # the check is the pods' own pattern
    from trajflow.config import formats

    template = (CHART / "charts" / "common" / "templates" / "_global.tpl").read_text()
    [pattern] = re.findall(r'regexMatch ("(?:[^"\\]|\\.)*") \$rendered', template)
    assert json.loads(pattern) == formats.HTTP_URL


def test_service_and_service_monitor_select_the_pushgateway():
    objs = render_monitoring()
    deployment, service = one(objs, "Deployment"), one(objs, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    monitor = one(objs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True, "pushed job/run/stage/shard labels must survive the scrape"
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}


def argocd_label_tracking(objs, app_name):
    """What ArgoCD's `label` tracking does: app.kubernetes.io/instance of every object it
    applies (not of pod templates) becomes the Application's name."""
    out = copy.deepcopy(objs)
    for obj in out:
        obj["metadata"].setdefault("labels", {})["app.kubernetes.io/instance"] = app_name
    return out


def matches(selector, labels):
    return selector.items() <= labels.items()


def test_selectors_survive_argocd_rewriting_the_instance_label():
    """The shipped ApplicationSet names the Application trajflow-<env> but the release
    trajflow: every selector must still find its objects after ArgoCD's label tracking."""
    rendered = render([env_file("production")], {"global.argocd.enabled": True}, api_versions=PROMETHEUS_OPERATOR_APIS)
    objs = argocd_label_tracking(rendered, "trajflow-production")
    service = one(objs, "Service", component="pushgateway")
    deployment = one(objs, "Deployment", component="pushgateway")
    monitor = one(objs, "ServiceMonitor")
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert "app.kubernetes.io/instance" not in monitor["spec"]["selector"]["matchLabels"]
    # Pod selectors keep app.kubernetes.io/instance (ArgoCD leaves pod templates alone) and
    # the Deployment's immutable selector is what earlier releases of the chart rendered.
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "trajflow", "app.kubernetes.io/instance": "trajflow",
        "app.kubernetes.io/component": "pushgateway"}
    assert matches(service["spec"]["selector"], pod_labels)
    pods = [pod_labels] + [o["spec"]["template"]["metadata"]["labels"] for o in select(objs, "Job")]
    for policy in select(objs, "NetworkPolicy"):
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert any(matches(selector, labels) for labels in pods), policy["metadata"]["name"]
    training_pods = one(objs, "Job", "training")["spec"]["template"]["metadata"]["labels"]
    assert matches(one(objs, "PodMonitor")["spec"]["selector"]["matchLabels"], training_pods)
    # Every object carries the chart's own release label; pod templates do not (it would
    # change every Job's name hash, and re-run the stages, on upgrade).
    for obj in rendered:
        assert obj["metadata"]["labels"]["trajflow.io/release"] == "trajflow", obj["metadata"]["name"]
    for job in select(rendered, "Job"):
        assert "trajflow.io/release" not in job["spec"]["template"]["metadata"]["labels"]


def test_pod_monitor_scrapes_every_local_rank_of_the_training_pods():
    objs = render(values={"monitoring": {"enabled": True}, "global": {"runId": "exp-7"},
                          "training": {"resources": {"limits": {"nvidia.com/gpu": 2}}}},
                  api_versions=PROMETHEUS_OPERATOR_APIS, release="fleet")
    monitor = one(objs, "PodMonitor")
    training = next(o for o in objs if o["kind"] in ("Job", "PyTorchJob")
                    and o["metadata"]["labels"]["app.kubernetes.io/component"] == "training")
    template = training["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    relabel = endpoint["relabelings"]
    keep = next(r for r in relabel if r.get("action") == "keep")
    port_names = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    metrics_ports = {n for n in port_names if re.fullmatch(keep["regex"], n)}
    assert metrics_ports == {"metrics", "metrics-1"}, port_names
    static = {r["targetLabel"]: r["replacement"] for r in relabel if "sourceLabels" not in r}
    # the release too, as pushed series carry it: the rules and the dashboard select by it
    assert static["release"] == "fleet" and static["run"] == "exp-7" and static["stage"] == "train"
    # local rank 0's port is plain `metrics`, which the metrics-N rule does not match: it is labeled "0" first
    rank = [r for r in relabel if r.get("targetLabel") == "local_rank"]
    assert rank[0] == {"targetLabel": "local_rank", "replacement": "0"}
    assert rank[1]["sourceLabels"] == ["__meta_kubernetes_pod_container_port_name"] and rank[1]["replacement"] == "$1"
    shard = [r["sourceLabels"] for r in relabel if r.get("targetLabel") == "shard"]
    assert shard == [["__meta_kubernetes_pod_label_training_kubeflow_org_replica_type",
                      "__meta_kubernetes_pod_label_training_kubeflow_org_replica_index"],  # a PyTorchJob's pods
                     ["__meta_kubernetes_pod_annotation_batch_kubernetes_io_job_completion_index"]]


def test_pushgateway_pod_is_locked_down():
    objs = render_monitoring()
    deployment = one(objs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert container["image"].startswith("quay.io/prometheus/pushgateway:v")
    sa = one(objs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False and pod["serviceAccountName"] == sa["metadata"]["name"]


def test_global_registry_and_pull_secrets_apply_to_the_pushgateway():
    objs = render_monitoring({"global": {"imageRegistry": "mirror.example:5000", "imagePullSecrets": [{"name": "mirror"}]},
                              "pushgateway": {"imagePullSecrets": [{"name": "own"}]}})
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"].startswith("mirror.example:5000/prometheus/pushgateway:")
    assert [s["name"] for s in pod["imagePullSecrets"]] == ["own", "mirror"]


def test_persistence_creates_a_claim_and_recreates_the_pod():
    objs = render_monitoring({"pushgateway": {"persistence": {"enabled": True, "size": "2Gi", "storageClass": "fast"}}})
    pvc = one(objs, "PersistentVolumeClaim")
    deployment = one(objs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}}]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "2Gi" and pvc["spec"]["storageClassName"] == "fast"
    # the null clears the rollingUpdate the server defaulted before, which a server-side apply keeps
    assert deployment["spec"]["strategy"] == {"type": "Recreate", "rollingUpdate": None}
    args = pod["containers"][0]["args"]
    assert "--persistence.file=/data/pushgateway.db" in args and "--persistence.interval=5m" in args

    objs = render_monitoring({"pushgateway": {"persistence": {"enabled": True, "existingClaim": "kept"}}})
    assert select(objs, "PersistentVolumeClaim") == []
    volumes = one(objs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert volumes[0]["persistentVolumeClaim"]["claimName"] == "kept"


def test_disabling_the_pushgateway_drops_its_objects_and_its_alert():
    objs = render_monitoring({"pushgateway": {"enabled": False}})
    assert kinds(objs) == ["ConfigMap", "PodMonitor", "PrometheusRule"]
    assert "TrajflowPushgatewayDown" not in alert_rules(objs)


@pytest.mark.parametrize("kube", ["1.31.0", "1.37.0"])
def test_core_objects_validate_strictly(kube):
    values = {"pushgateway": {"persistence": {"enabled": True}}}
    for obj in render_monitoring(values, kube_version=kube):
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        try:
            kv.validate(obj, kube, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_operator_objects_carry_selector_labels_and_standard_labels():
    labels = {"release": "kube-prometheus-stack"}
    objs = render_monitoring({"serviceMonitor": {"labels": labels}, "podMonitor": {"labels": labels},
                              "prometheusRule": {"labels": labels}})
    for kind in OPERATOR_KINDS:
        meta = one(objs, kind)["metadata"]
        assert meta["labels"]["release"] == "kube-prometheus-stack", kind
        assert meta["labels"]["app.kubernetes.io/instance"] == "trajflow" and meta["namespace"] == NAMESPACE


def test_alert_thresholds_come_from_values():
    values = {"prometheusRule": {"additionalAlertLabels": {"team": "robotics"}, "alerts": {
        "downloadErrorRatio": {"threshold": 0.25, "window": "30m", "for": "2m", "severity": "critical"},
        "checkpointTooOld": {"maxAge": "2h30m"},
        "gpuUnderused": {"utilisationPercent": 35},
        "trainingLossNaN": {"enabled": False},
    }}}
    rules = alert_rules(render_monitoring(values))
    ratio = rules["TrajflowDownloadErrorRatioHigh"]
    assert ratio["expr"].rstrip().endswith("> 0.25") and "[30m]" in ratio["expr"]
    assert ratio["for"] == "2m" and ratio["labels"] == {"severity": "critical", "release": "trajflow", "team": "robotics"}
    assert "> 9000" in rules["TrajflowCheckpointTooOld"]["expr"]
    assert rules["TrajflowGpuUnderused"]["expr"].rstrip().endswith("< 35")
    assert "TrajflowTrainingLossNotFinite" not in rules


def test_every_alert_links_its_runbook_when_runbook_url_is_set():
    base = "https://wiki.example.com/trajflow/runbooks#"
    rules = alert_rules(render_monitoring({"prometheusRule": {"runbookUrl": base}}))
    assert len(rules) > 10 and {name: r["annotations"]["runbook_url"] for name, r in rules.items()} == {
        name: base + name for name in rules}
    assert not any("runbook_url" in r["annotations"] for r in alert_rules(render_monitoring()).values())
    for bad in ("wiki/runbooks", "https://wiki.example.com:99999/runbooks#"):
        with pytest.raises(helm.HelmError, match="runbookUrl"):
            render_monitoring({"prometheusRule": {"runbookUrl": bad}})


def test_a_group_with_every_alert_disabled_is_left_out():
    off = {"enabled": False}
    objs = render_monitoring({"prometheusRule": {"alerts": {"gpuUnderused": off, "gpuMemoryNearFull": off}}})
    groups = one(objs, "PrometheusRule")["spec"]["groups"]
    assert [g["name"] for g in groups] == ["trajflow-pipeline", "trajflow-training"]


def test_a_bad_duration_fails_the_render_naming_it():
    chart_values = {"prometheusRule": {"alerts": {"checkpointTooOld": {"maxAge": "1 hour"}}}}
    with pytest.raises(helm.HelmError, match="maxAge|Prometheus duration|pattern"):
        render_monitoring(chart_values)


def test_rules_only_watch_this_release():
    rules = alert_rules(render_monitoring(release="fleet", namespace="ml"))
    assert 'job_name=~"(fleet-trajflow-downloader|fleet-trajflow-preprocessing|fleet-trajflow-training)-[0-9a-f]{8}"' \
        in rules["TrajflowJobFailed"]["expr"]
    assert 'pod=~"(fleet-trajflow-preprocessing|fleet-trajflow-training)-[0-9a-f]{8}-.+"' in rules["TrajflowGpuUnderused"]["expr"]
    assert 'up{job="fleet-trajflow-pushgateway", namespace="ml"}' in rules["TrajflowPushgatewayDown"]["expr"]
    for name, rule in rules.items():
        if "trajflow_" in rule["expr"] or "push_" in rule["expr"]:
            assert 'namespace="ml", release="fleet"' in rule["expr"], name


@pytest.mark.parametrize("release", ["trajflow", "a-very-long-release-name-for-the-fleet-pipeline-x", "f" * 53])
def test_the_job_name_pattern_matches_the_stage_jobs_the_chart_renders(release):
    objs = render(values={"monitoring": {"enabled": True}}, api_versions=PROMETHEUS_OPERATOR_APIS, release=release)
    expr = alert_rules(objs)["TrajflowJobFailed"]["expr"]
    pattern = re.search(r'job_name=~"([^"]+)"', expr).group(1)
    jobs = [o["metadata"]["name"] for o in objs if o["kind"] == "Job"]
    assert len(jobs) == 3
    for job in jobs:
        assert re.fullmatch(pattern, job), (pattern, job)
    gpu = re.search(r'pod=~"([^"]+)"', alert_rules(objs)["TrajflowGpuUnderused"]["expr"]).group(1)
    gpu_jobs = [o["metadata"]["name"] for o in objs if o["kind"] == "Job"
                and o["metadata"]["labels"]["app.kubernetes.io/component"] != "downloader"]
    assert len(gpu_jobs) == 2
    assert all(re.fullmatch(gpu, f"{j}-0-abcde") for j in gpu_jobs)
    assert not any(re.fullmatch(gpu, f"{j}-0-abcde") for j in jobs if j not in gpu_jobs)


def test_dcgm_label_names_are_configurable():
    rules = alert_rules(render_monitoring({"gpu": {"podLabel": "exported_pod", "namespaceLabel": "exported_namespace"}}))
    expr = rules["TrajflowGpuUnderused"]["expr"]
    assert 'exported_pod=~"' in expr and 'exported_namespace="trajflow"' in expr
    assert 'label_replace(' in expr and '"pod", "$1", "exported_pod"' in expr


def test_dashboard_config_map_is_found_by_the_grafana_sidecar():
    objs = render_monitoring()
    cm = one(objs, "ConfigMap", component="monitoring")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (key,) = cm["data"]
    assert key.endswith(".json")
    dashboard = dashboard_of(objs)
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "run", "shard"} <= names
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_uid_differs_per_release_and_can_be_set():
    one_uid = dashboard_of(render_monitoring(release="a"))["uid"]
    other_uid = dashboard_of(render_monitoring(release="b"))["uid"]
    assert one_uid != other_uid and len(one_uid) <= 40
    assert dashboard_of(render_monitoring(release="a"))["uid"] == one_uid, "the uid must be stable across renders"
    custom = dashboard_of(render_monitoring({"dashboard": {"uid": "fleet", "title": "Fleet"}}))
    assert (custom["uid"], custom["title"]) == ("fleet", "Fleet")


def test_dashboard_gpu_filter_follows_the_release():
    dashboard = dashboard_of(render_monitoring(release="fleet", namespace="ml",
                                               values={"gpu": {"podLabel": "exported_pod"}}))
    constants = {v["name"]: v for v in dashboard["templating"]["list"] if v["type"] == "constant"}
    assert constants["gpu_pods"]["query"] == "(fleet-trajflow-preprocessing|fleet-trajflow-training)-[0-9a-f]{8}-.+"
    assert constants["gpu_pod_label"]["current"]["value"] == "exported_pod"


def test_dashboard_opens_on_its_release_and_every_query_selects_by_it():
    dashboard = dashboard_of(render_monitoring(release="fleet", namespace="ml"))
    pickers = {v["name"]: v for v in dashboard["templating"]["list"] if v["type"] == "query"}
    assert pickers["namespace"]["current"]["value"] == ["ml"] and pickers["release"]["current"]["value"] == ["fleet"]
    assert pickers["release"]["includeAll"], "All must stay selectable (series pushed without a release)"
    exprs = [t["expr"] for row in dashboard["panels"] for panel in [row, *row.get("panels", [])]
             for t in panel.get("targets", [])]
    exprs += [v["query"]["query"] for v in pickers.values() if v["name"] not in ("namespace", "release")]
    selectors = [sel for e in exprs for sel in re.findall(r"\{[^{}]*\}", e) if 'namespace=~"$namespace"' in sel]
    unscoped = [sel for sel in selectors if 'release=~"$release"' not in sel]
    assert len(selectors) > len(exprs) > 30 and not unscoped


def _grouping(node) -> list[str] | None:  # type: ignore[no-untyped-def]
    """The labels a query's series are told apart by: those of the aggregation that makes
    them (None when there is none, e.g. a bare selector)."""
    import promql_parser

    if isinstance(node, promql_parser.AggregateExpr):
        return list(node.modifier.labels) if node.modifier else []
    if isinstance(node, promql_parser.ParenExpr):
        return _grouping(node.expr)
    if isinstance(node, promql_parser.BinaryExpr):  # `time() - x`, `x > 0`, `x and on (...) y`: a side's
        left = _grouping(node.lhs)
        return left if left is not None else _grouping(node.rhs)
    if isinstance(node, promql_parser.Call):
        found = [g for g in map(_grouping, node.args) if g is not None]
        return found[0] if found else None
    return None


def test_a_panel_that_keeps_releases_apart_names_the_release_in_its_legend():
    """With All releases picked, a panel's series of two releases must not share a name."""
    import promql_parser

    dashboard = dashboard_of(render_monitoring())
    variables = dashboard_variables(dashboard)
    split, unnamed = 0, []
    for row in dashboard["panels"]:
        for panel in [row, *row.get("panels", [])]:
            for target in panel.get("targets", []):
                labels = _grouping(promql_parser.parse(substitute(target["expr"], variables)))
                if labels and "release" in labels:
                    split += 1
                    if "{{release}}" not in target.get("legendFormat", ""):
                        unnamed.append((panel["title"], target.get("legendFormat")))
    assert split > 20 and not unnamed, unnamed


def test_dashboard_may_live_in_the_sidecar_namespace():
    objs = render_monitoring({"dashboard": {"namespace": "grafana", "annotations": {"grafana_folder": "ML"}}})
    cm = one(objs, "ConfigMap", component="monitoring")
    assert cm["metadata"]["namespace"] == "grafana" and cm["metadata"]["annotations"] == {"grafana_folder": "ML"}
    # one release name in two namespaces (an environment each) meets in Grafana's: two ConfigMaps
    values = {"dashboard": {"namespace": "grafana"}}
    dev, staging = (one(render_monitoring(values, namespace=ns), "ConfigMap", component="monitoring")
                    for ns in ("trajflow-dev", "trajflow-staging"))
    assert dev["metadata"]["name"] != staging["metadata"]["name"]
    assert dev["metadata"]["name"].startswith("trajflow-monitoring-dashboard-")
    # Grafana's provisioning stops saving a folder's dashboards when two share a title
    titles = [json.loads(next(iter(cm["data"].values())))["title"] for cm in (dev, staging)]
    assert titles == ["trajflow pipeline (trajflow-dev/trajflow)", "trajflow pipeline (trajflow-staging/trajflow)"]
    named = one(render_monitoring({"dashboard": {"title": "Robots"}}), "ConfigMap", component="monitoring")
    assert json.loads(next(iter(named["data"].values())))["title"] == "Robots"
    at_home = render_monitoring({"dashboard": {"namespace": "trajflow-dev"}}, namespace="trajflow-dev")
    assert one(at_home, "ConfigMap", component="monitoring")["metadata"]["name"] == "trajflow-monitoring-dashboard"


BAD_VALUES = [
    ({"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled"),
    ({"pushgateway": {"replicas": 2}}, "replicas"),
    ({"prometheusRule": {"alerts": {"downloadErrorRatio": {"threshold": 1.5}}}}, "/prometheusRule/alerts/downloadErrorRatio/threshold"),
    ({"prometheusRule": {"alerts": {"progressStalled": {"window": "15 minutes"}}}}, "/prometheusRule/alerts/progressStalled/window"),
    ({"prometheusRule": {"alerts": {"unknownAlert": {"enabled": True}}}}, "unknownAlert"),
    ({"pushgateway": {"containerSecurityContext": {"readOnlyRootFilesystem": False}}}, "readOnlyRootFilesystem"),
    ({"gpu": {"podLabel": "pod-name"}}, "/gpu/podLabel"),
    ({"dashboard": {"uid": "x" * 41}}, "/dashboard/uid"),
]


@pytest.mark.parametrize("values, where", BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_schema_rejects_bad_values_naming_the_key(values, where):
    chart = helm.Chart.load(MONITORING_CHART)
    try:
        with pytest.raises(helm.HelmValuesError) as err:
            chart.validate_schema(values)
    finally:
        chart.close()
    assert where in str(err.value), str(err.value)


def test_default_values_pass_the_schema_through_the_umbrella():
    chart = helm.Chart.load(CHART)
    try:
        chart.validate_schema({"monitoring": {"enabled": True}})
    finally:
        chart.close()


def test_values_schema_is_closed():
    schema = json.loads((SUBCHARTS / "monitoring" / "values.schema.json").read_text())

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, "/".join(path)
            for key, child in node.items():
                walk(child, [*path, key])
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, [*path, str(i)])

    walk(schema, [])
    values = yaml.safe_load((SUBCHARTS / "monitoring" / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"]) and set(schema["required"]) <= set(values)


def test_chart_lints_clean_on_its_own():
    report = helm.lint(MONITORING_CHART, strict=True, namespace="trajflow", kube_version="v1.31.0")
    problems = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2] + list(report["errors"])
    assert not problems


def _pod_regexes(expr: str) -> list[str]:
    """The regular expressions of `pod=~"..."` matchers in PromQL, string escapes undone."""
    return [json.loads(f'"{literal}"') for literal in re.findall(r'\bpod=~"((?:[^"\\]|\\.)*)"', expr)]


@pytest.mark.parametrize("values", [{}, {"gpu": {"podRegex": r"trajflow-training-[0-9a-f]{8}-\d+-.+"}}],
                         ids=["default", "backslashes"])
def test_dashboard_gpu_panels_select_the_pods_the_gpu_alerts_watch(values):
    from monitoring_helpers import dashboard_queries

    objs = render_monitoring(values)
    alert = _pod_regexes(alert_rules(objs)["TrajflowGpuUnderused"]["expr"])
    panels = [r for where, expr in dashboard_queries(dashboard_of(objs)) for r in _pod_regexes(expr)]
    assert alert and panels and set(panels) == set(alert), (alert, panels)
    assert re.fullmatch(alert[0], "trajflow-training-0a1b2c3d-0-x7k2p")
    # not the pods of a release named after this one's stage (`trajflow-training`)
    assert not re.fullmatch(alert[0], "trajflow-training-downloader-0a1b2c3d-0-x7k2p")


@pytest.mark.parametrize("alert", ["pushRejected", "trainingLossNaN"])
def test_an_alert_that_goes_quiet_before_its_for_is_refused(alert):
    with pytest.raises(helm.HelmError, match=rf"alerts\.{alert}\.quietAfter \(5m\) must be longer than its for \(10m\)"):
        render_monitoring({"prometheusRule": {"alerts": {alert: {"quietAfter": "5m", "for": "10m"}}}})
