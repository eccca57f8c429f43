"""A real Pushgateway and a real Prometheus on 127.0.0.1: the stages' metric helpers push,
training ranks serve /metrics, Prometheus scrapes both with the README's scrape
configuration, and the chart's rules and dashboard queries run against the result."""
from __future__ import annotations

import re
import time
from urllib.parse import urlparse

import pytest
import yaml

from monitoring_helpers import MONITORING_CHART, Prometheus, dashboard_of, dashboard_queries, render_monitoring, rule_groups
from trajflow.testing import requires_tool

pytestmark = [
    requires_tool("prometheus", why="it comes with the Debian package `prometheus` (ci/scripts/install-test-tools.sh)"),
    pytest.mark.slow,
]

RELEASE, NAMESPACE, RUN = "demo", "ml", "r1"
PUSHGATEWAY_JOB = f"{RELEASE}-trajflow-pushgateway"
TRAINING_JOB = f"{NAMESPACE}/{RELEASE}-trajflow-monitoring-training"


def readme_scrape_configs() -> list[dict]:
    """The README's plain-Prometheus scrape configs, placeholders filled in."""
    text = (MONITORING_CHART / "README.md").read_text()
    block = re.search(r"<!-- scrape-config-begin -->\n```yaml\n(.*?)```\n<!-- scrape-config-end -->", text, re.S)
    assert block, "README.md lost its scrape-config block"
    filled = block.group(1).replace("<release>", RELEASE).replace("<namespace>", NAMESPACE).replace("<run id>", RUN)
    return yaml.safe_load(filled)["scrape_configs"]


def with_static_targets(config: dict, targets: list[tuple[str, dict[str, str]]]) -> dict:
    """Kubernetes discovery replaced by static targets carrying the same __meta_ labels,
    so the README's relabelings run unchanged (Debian's Prometheus has no Kubernetes SD)."""
    config = dict(config)
    assert config.pop("kubernetes_sd_configs")
    config["static_configs"] = [{"targets": [address], "labels": labels} for address, labels in targets]
    return config


@pytest.fixture(autouse=True)
def in_a_release_pod(monkeypatch):
    """The stages push with the release and namespace the chart gives their pods."""
    from trajflow.metrics import NAMESPACE_ENV, RELEASE_ENV

    monkeypatch.setenv(RELEASE_ENV, RELEASE)
    monkeypatch.setenv(NAMESPACE_ENV, NAMESPACE)


@pytest.fixture
def training_ranks():
    """Two local ranks of training pod 0, each serving its own registry as training's per-rank /metrics endpoint does."""
    from prometheus_client import start_http_server

    from trajflow.metrics import train_metrics

    ranks, servers = [], []
    for _ in range(2):
        metrics = train_metrics()
        server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
        servers.append((server, thread))
        ranks.append((metrics, server.server_port))
    try:
        yield ranks
    finally:
        for server, thread in servers:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


@pytest.fixture
def prometheus(pushgateway, training_ranks):
    pushgateway_config, training_config = readme_scrape_configs()
    gateway = urlparse(pushgateway.url).netloc
    pod = {"__meta_kubernetes_namespace": NAMESPACE,
           "__meta_kubernetes_pod_name": "demo-trajflow-training-0a1b2c3d-0-x7k2p",
           "__meta_kubernetes_pod_label_app_kubernetes_io_instance": RELEASE,
           "__meta_kubernetes_pod_label_app_kubernetes_io_component": "training",
           "__meta_kubernetes_pod_annotation_batch_kubernetes_io_job_completion_index": "0"}
    kubeflow_pod = {**{k: v for k, v in pod.items() if "completion_index" not in k},
                    "__meta_kubernetes_pod_name": "demo-trajflow-training-worker-0",
                    "__meta_kubernetes_pod_label_training_kubeflow_org_replica_type": "worker",
                    "__meta_kubernetes_pod_label_training_kubeflow_org_replica_index": "0"}
    scrape_configs = [
        with_static_targets(pushgateway_config, [
            (gateway, {"__meta_kubernetes_service_name": PUSHGATEWAY_JOB, "__meta_kubernetes_endpoint_port_name": "http",
                       "__meta_kubernetes_namespace": NAMESPACE}),
            # another Service's endpoint in the namespace: must be dropped
            (gateway, {"__meta_kubernetes_service_name": "unrelated", "__meta_kubernetes_endpoint_port_name": "http",
                       "__meta_kubernetes_namespace": NAMESPACE}),
        ]),
        with_static_targets(training_config, [
            (f"127.0.0.1:{port}", {**pod, "__meta_kubernetes_pod_container_port_name": "metrics" if i == 0 else f"metrics-{i}"})
            for i, (_, port) in enumerate(training_ranks)
        ] + [
            # the same pod's rendezvous port: not a metrics endpoint
            (f"127.0.0.1:{training_ranks[0][1]}", {**pod, "__meta_kubernetes_pod_container_port_name": "c10d"}),
            # a PyTorchJob's worker pod (no completion index): shard "worker-0"
            (f"127.0.0.1:{training_ranks[0][1]}", {**kubeflow_pod, "__meta_kubernetes_pod_container_port_name": "metrics"}),
        ]),
    ]
    # Fast alerts, so one fires within the test: the ratio over a short window, no `for`.
    values = {"global": {"runId": RUN}, "prometheusRule": {"alerts": {"downloadErrorRatio": {"window": "20s", "for": "0s"}}}}
    objs = render_monitoring(values, release=RELEASE, namespace=NAMESPACE)
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": scrape_configs}
    server = Prometheus.start(config, rule_groups(objs))
    server.objects = objs
    try:
        yield server
    finally:
        server.stop()


def value(result: list[dict]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def test_pushed_and_scraped_metrics_reach_prometheus_with_their_labels(prometheus, pushgateway, training_ranks):
    from trajflow.metrics import Pusher, download_metrics, preprocess_metrics

    download = download_metrics()
    download.start_time.set(time.time())
    download.bytes_planned.set(4000)
    download.bytes.inc(1000)
    download.items.labels(outcome="fetched").inc(3)
    download_pusher = Pusher(pushgateway.url, download, run=RUN, shard=0)
    assert download_pusher.push()

    preprocess = preprocess_metrics()
    preprocess.start_time.set(time.time())
    preprocess_pusher = Pusher(pushgateway.url, preprocess, run=RUN, shard=1)
    assert preprocess_pusher.push()

    for local_rank, (metrics, _) in enumerate(training_ranks):
        metrics.loss.labels(split="train").set(0.5 + local_rank)
        metrics.steps.inc(10)

    # honor_labels: the pushed job and grouping key survive; the target adds the namespace
    (series,) = prometheus.wait_for(f'trajflow_download_bytes_total{{run="{RUN}"}}')
    labels = series["metric"]
    assert labels["job"] == "trajflow" and labels["stage"] == "download" and labels["shard"] == "0"
    assert labels["namespace"] == NAMESPACE and labels["release"] == RELEASE and float(series["value"][1]) == 1000
    assert "instance" not in labels, "the Pushgateway's empty instance label must not be replaced by the target's"
    assert value(prometheus.query('sum(trajflow_download_bytes_total) / sum(trajflow_download_bytes_planned)')) == 0.25
    prometheus.wait_for('push_time_seconds{job="trajflow", stage="preprocess", shard="1"}')
    # only the Pushgateway's own endpoint was kept
    ups = prometheus.wait_for(f'up{{job="{PUSHGATEWAY_JOB}"}}')
    assert len(ups) == 1 and ups[0]["value"][1] == "1" and ups[0]["metric"]["namespace"] == NAMESPACE

    # both local ranks of training pod 0, labelled like the pushed series
    losses = prometheus.wait_for(f'trajflow_train_loss{{job="{TRAINING_JOB}"}}', lambda r: len(r) == 3)
    by_rank = {s["metric"]["local_rank"]: s for s in losses if s["metric"]["shard"] == "0"}
    assert set(by_rank) == {"0", "1"}
    for rank, s in by_rank.items():
        m = s["metric"]
        assert (m["release"], m["run"], m["stage"], m["shard"], m["split"]) == (RELEASE, RUN, "train", "0", "train")
        assert float(s["value"][1]) == 0.5 + int(rank)
    (worker,) = [s["metric"] for s in losses if s["metric"]["shard"] != "0"]
    assert (worker["shard"], worker["local_rank"], worker["pod"]) == ("worker-0", "0", "demo-trajflow-training-worker-0")
    assert len(prometheus.query(f'up{{job="{TRAINING_JOB}"}}')) == 3, "the rendezvous port must not be scraped"

    # the dashboard's resample latency: after a scrape of the empty histogram, 50
    # observations of 3 ms arrive, all in the (2.5 ms, 5 ms] bucket
    prometheus.wait_for('trajflow_preprocess_resample_seconds_count{shard="1"}')
    preprocess.trajectories.inc(64)
    for _ in range(50):
        preprocess.resample_seconds.observe(0.003)
    assert preprocess_pusher.push()
    dashboard = dashboard_of(prometheus.objects)
    p95 = next(e for w, e in dashboard_queries(dashboard) if "resample_seconds_bucket" in e and "0.95" in e)
    latency = value(prometheus.wait_for(p95, lambda r: bool(r) and r[0]["value"][1] != "NaN"))
    assert 0.0025 < latency <= 0.005

    # the final push marks the shard finished
    download_pusher.stop(success=True)
    prometheus.wait_for('trajflow_stage_success{stage="download", shard="0"} == 1')
    assert value(prometheus.query('trajflow_stage_end_time_seconds{stage="download", shard="0"}')) > 0


def test_every_dashboard_query_runs_and_rules_evaluate_cleanly(prometheus, pushgateway, training_ranks):
    from trajflow.metrics import Pusher, download_metrics

    download = download_metrics()
    download.bytes.inc(10)
    Pusher(pushgateway.url, download, run=RUN, shard=0).push()
    prometheus.wait_for("trajflow_download_bytes_total")
    prometheus.wait_for(f'up{{job="{TRAINING_JOB}"}}', lambda r: len(r) == 3)

    for where, expr in dashboard_queries(dashboard_of(prometheus.objects)):
        prometheus.query(expr)  # a bad query raises with Prometheus' error and the panel's name in the message

    # RFC 3339 timestamps in UTC compare as strings
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 1))

    def evaluated(groups):
        return groups and all(r.get("lastEvaluation", "") > started for g in groups for r in g["rules"])

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        groups = prometheus.api("rules")["groups"]
        if evaluated(groups):
            break
        time.sleep(0.5)
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 14
    unhealthy = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not unhealthy, unhealthy


def test_an_alert_fires_from_pushed_metrics(prometheus, pushgateway):
    """stage helper -> Pushgateway -> Prometheus (honor_labels) -> the chart's rule -> alert."""
    from trajflow.metrics import Pusher, download_metrics

    download = download_metrics()
    download.items.labels(outcome="fetched").inc(10)
    # A labelled counter is born at its first increment, which rate() cannot see; what
    # follows is counted.
    download.failures.labels(reason="http_503").inc(1)
    pusher = Pusher(pushgateway.url, download, run=RUN, shard=2)
    assert pusher.push()
    prometheus.wait_for('trajflow_download_failures_total{shard="2"}')
    time.sleep(2)  # a few scrapes without new failures
    assert not [a for a in prometheus.api("alerts")["alerts"] if a["labels"]["alertname"] == "TrajflowDownloadErrorRatioHigh"]

    download.failures.labels(reason="http_503").inc(40)
    assert pusher.push()

    def firing(alerts):
        return [a for a in alerts if a["labels"]["alertname"] == "TrajflowDownloadErrorRatioHigh" and a["state"] == "firing"]

    deadline = time.monotonic() + 30
    alerts: list = []
    while time.monotonic() < deadline and not firing(alerts):
        alerts = prometheus.api("alerts")["alerts"]
        time.sleep(0.5)
    fired = firing(alerts)
    assert fired, f"no firing alert; Prometheus has {alerts}"
    labels = fired[0]["labels"]
    assert labels["run"] == RUN and labels["severity"] == "warning" and labels["release"] == RELEASE
    assert "of the download attempts of run r1 fail" in fired[0]["annotations"]["summary"]
