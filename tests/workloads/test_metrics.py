"""Metrics: pushes carry the {run, stage, shard} grouping key, and a missing Pushgateway
never fails the work (it warns once)."""
from __future__ import annotations

import http.server
import logging
import threading
import time
from typing import Iterator

import pytest

from trajflow.metrics import PUSH_JOB, Pusher, download_metrics, exported_names, preprocess_metrics, train_metrics
from trajflow.testing import free_port


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Records every request; answers with the status the test sets."""

    requests: list[tuple[str, str, bytes]] = []
    status = 200
    listing = b""  # the body of a GET
    delete_delay_s = 0.0

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        type(self).requests.append((self.command, self.path, body))
        if self.command == "DELETE":
            time.sleep(type(self).delete_delay_s)
        self.send_response(type(self).status)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(type(self).listing)

    do_GET = do_POST = do_PUT = do_DELETE = _handle

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def recorder() -> Iterator[type[_Recorder]]:
    handler = type("Recorder", (_Recorder,), {"requests": [], "status": 200, "listing": b"", "delete_delay_s": 0.0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_port}"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name` whose labels include `labels`, from exposition text."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return None


def test_pods_push_with_their_namespace_and_release_in_the_grouping_key(recorder, monkeypatch):
    # the same run id in two namespaces, or two releases of one, stays two groups
    monkeypatch.setenv("TRAJFLOW_NAMESPACE", "trajflow-dev")
    monkeypatch.setenv("TRAJFLOW_RELEASE", "team-a")
    assert Pusher(recorder.url, download_metrics(), run="default", shard=0).push() is True
    (method, path, _), (legacy_method, legacy_path, _) = recorder.requests
    parts = path.split("/")
    assert method == "POST" and dict(zip(parts[4::2], parts[5::2])) == {
        "run": "default", "stage": "download", "shard": "0", "namespace": "trajflow-dev", "release": "team-a"}
    assert (legacy_method, legacy_path) == ("DELETE", path.replace("/release/team-a", ""))  # an older pod's group


def test_a_pod_drops_the_group_an_earlier_version_pushed_without_the_release(pushgateway, monkeypatch):
    monkeypatch.setenv("TRAJFLOW_NAMESPACE", "prod")
    failed = download_metrics()
    failed.success.set(0)
    Pusher(pushgateway.url, failed, run="r", shard=1).push()  # before the upgrade: no release in the key
    Pusher(pushgateway.url, download_metrics(), run="r", shard=0).push()
    monkeypatch.setenv("TRAJFLOW_RELEASE", "team-a")
    pusher = Pusher(pushgateway.url, download_metrics(), run="r", shard=1)
    assert pusher.push() and pusher.push()
    left = sorted((g["labels"]["shard"], g["labels"].get("release", "")) for g in pushgateway.groups())
    assert left == [("0", ""), ("1", "team-a")]  # shard 1's old state is gone, shard 0's is another pod's


def test_push_uses_pushadd_with_the_grouping_key(recorder):
    metrics = download_metrics()
    metrics.bytes.inc(1234)
    metrics.failures.labels(reason="http_404").inc()
    assert Pusher(recorder.url, metrics, run="run-7", shard=3).push() is True
    [(method, path, body)] = recorder.requests
    assert method == "POST"  # pushadd: replaces only these metric names in the group
    parts = path.split("/")
    assert parts[:4] == ["", "metrics", "job", PUSH_JOB]
    assert dict(zip(parts[4::2], parts[5::2])) == {"run": "run-7", "stage": "download", "shard": "3"}
    text = body.decode()
    assert "trajflow_download_bytes_total 1234.0" in text
    assert 'trajflow_download_failures_total{reason="http_404"} 1.0' in text


def test_dead_pushgateway_warns_once_and_never_raises(caplog):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    pusher = Pusher(url, preprocess_metrics(), run="r", shard=0, timeout=2)
    with caplog.at_level(logging.WARNING, logger="trajflow.metrics"):
        assert pusher.push() is False
        assert pusher.push() is False
        pusher.stop(success=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert url in warnings[0].getMessage() and "the work goes on" in warnings[0].getMessage()


def test_server_errors_warn_and_a_recovery_rearms_the_warning(recorder, caplog):
    pusher = Pusher(recorder.url, train_metrics(), run="r", shard="rank0")
    with caplog.at_level(logging.WARNING, logger="trajflow.metrics"):
        recorder.status = 503
        assert pusher.push() is False
        assert pusher.push() is False
        recorder.status = 200
        assert pusher.push() is True
        recorder.status = 500
        assert pusher.push() is False
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_no_url_means_no_pushing(recorder):
    pusher = Pusher("", download_metrics(), run="r", shard=0).start(0.01)
    assert pusher.push() is False
    pusher.stop(success=True)
    assert recorder.requests == []


def test_background_pushes_and_final_push_with_outcome(recorder):
    metrics = download_metrics()
    pusher = Pusher(recorder.url, metrics, run="r", shard=1).start(0.05)
    deadline = time.monotonic() + 10
    while len(recorder.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    pusher.stop(success=False)
    assert len(recorder.requests) >= 3  # periodic pushes, then the final one
    final = recorder.requests[-1][2].decode()
    assert "trajflow_stage_success 0.0" in final and "trajflow_stage_interrupted 0.0" in final
    assert "trajflow_stage_end_time_seconds" in final and "trajflow_stage_end_time_seconds 0.0" not in final


def test_a_final_push_the_pushgateway_missed_is_tried_again(recorder):
    """A restarting Pushgateway would leave the group saying "running" for good: a shard
    that finished looks lost."""
    pusher = Pusher(recorder.url, download_metrics(), run="r", shard=1)
    assert pusher.push()  # the group holds this process's figures
    recorder.status = 503
    flip = threading.Timer(1.5, lambda: setattr(recorder, "status", 200))
    flip.daemon = True
    flip.start()
    try:
        pusher.stop(success=True)
    finally:
        flip.cancel()
    assert recorder.status == 200 and "trajflow_stage_success 1.0" in recorder.requests[-1][2].decode()
    assert len(recorder.requests) >= 3  # the first push, the missed final one, and the one that landed


def test_a_pushgateway_never_reached_is_not_tried_again_at_the_end(recorder):
    recorder.status = 503
    pusher = Pusher(recorder.url, download_metrics(), run="r", shard=1)
    assert not pusher.push()
    pusher.stop(success=True)
    assert len(recorder.requests) == 2  # nothing of this process's stands to be corrected


def test_real_pushgateway_keeps_one_group_per_shard(pushgateway):
    for shard in (0, 1):
        metrics = download_metrics()
        metrics.bytes.inc(100 * (shard + 1))
        pusher = Pusher(pushgateway.url, metrics, run="run-x", shard=shard)
        assert pusher.push() is True
        pusher.stop(success=True)
    groups = pushgateway.groups()
    labels = sorted((g["labels"]["run"], g["labels"]["stage"], g["labels"]["shard"], g["labels"]["job"]) for g in groups)
    assert labels == [("run-x", "download", "0", PUSH_JOB), ("run-x", "download", "1", PUSH_JOB)]
    text = pushgateway.metrics_text()
    group = {"job": PUSH_JOB, "run": "run-x", "stage": "download"}
    assert _sample(text, "trajflow_download_bytes_total", shard="1", **group) == 200
    assert _sample(text, "trajflow_download_bytes_total", shard="0", **group) == 100
    assert _sample(text, "trajflow_stage_success", shard="0", **group) == 1


def test_shard_0_drops_the_groups_of_a_run_with_more_shards_and_of_earlier_runs(pushgateway, monkeypatch):
    def push(stage_metrics, run, shard):  # type: ignore[no-untyped-def]
        pusher = Pusher(pushgateway.url, stage_metrics, run=run, shard=shard)
        assert pusher.push() is True
        return pusher

    for shard in range(4):  # the run with 4 download shards, then re-sharded to 2
        push(download_metrics(), "r", shard)
    push(preprocess_metrics(), "r", 3)  # another stage
    push(download_metrics(), "other", 3)  # another run
    monkeypatch.setenv("TRAJFLOW_NAMESPACE", "prod")  # the same run id in another release's namespace
    push(download_metrics(), "r", 3)
    monkeypatch.setenv("TRAJFLOW_RELEASE", "team-b")  # ... and in another release of that namespace
    push(download_metrics(), "r", 3)
    push(download_metrics(), "yesterday", 1)  # another release's earlier run
    monkeypatch.delenv("TRAJFLOW_RELEASE")
    push(download_metrics(), "r", 2)  # an earlier version's pod: no release
    monkeypatch.setenv("TRAJFLOW_RELEASE", "team-a")
    push(download_metrics(), "r", 3)
    push(download_metrics(), "yesterday", 7)  # this release's earlier runs: superseded
    push(download_metrics(), "yesterday", 0)
    push(preprocess_metrics(), "yesterday", 0)  # ... of a stage this one does not clean
    # team-a's re-shard drops its own groups, the earlier version's and its earlier runs', not team-b's
    push(download_metrics(), "r", 0).drop_shards_from(2)
    monkeypatch.delenv("TRAJFLOW_NAMESPACE")
    monkeypatch.delenv("TRAJFLOW_RELEASE")
    push(download_metrics(), "r", 0).drop_shards_from(2)
    expected = [("", "", "other", "download", "3"), ("", "", "r", "download", "0"), ("", "", "r", "download", "1"),
                ("", "", "r", "preprocess", "3"),  # prod's group without a release: taken over by team-b's
                ("prod", "team-a", "r", "download", "0"), ("prod", "team-a", "yesterday", "preprocess", "0"),
                ("prod", "team-b", "r", "download", "3"), ("prod", "team-b", "yesterday", "download", "1")]
    # the Pushgateway answers a DELETE before it applies it, and applies writes in order: once
    # a later push shows, the deletes are done
    push(preprocess_metrics(), "sentinel", 0)
    for _ in range(100):
        groups = pushgateway.groups()
        if any(g["labels"]["run"] == "sentinel" for g in groups):
            break
        time.sleep(0.05)
    left = sorted((g["labels"].get("namespace", ""), g["labels"].get("release", ""), g["labels"]["run"],
                   g["labels"]["stage"], g["labels"]["shard"]) for g in groups if g["labels"]["run"] != "sentinel")
    assert left == expected


def test_pushadd_keeps_metrics_another_push_left_in_the_group(pushgateway):
    first = download_metrics()
    first.retries.inc(2)
    Pusher(pushgateway.url, first, run="r", shard=0).push()
    # a second process (a retried pod) pushes another registry into the same group
    second = preprocess_metrics()
    second.trajectories.inc(5)
    second.stage = "download"  # same grouping key as the first push
    Pusher(pushgateway.url, second, run="r", shard=0).push()
    text = pushgateway.metrics_text()
    group = {"job": PUSH_JOB, "run": "r", "shard": "0", "stage": "download"}
    assert _sample(text, "trajflow_download_retries_total", **group) == 2
    assert _sample(text, "trajflow_preprocess_trajectories_total", **group) == 5


def test_catalogs_are_fresh_and_named():
    a, b = download_metrics(), download_metrics()
    a.bytes.inc(5)
    assert b.bytes._value.get() == 0  # separate registries: two stages in one process never clash
    names = exported_names()
    for expected in ("trajflow_download_bytes_total", "trajflow_stage_success", "trajflow_train_loss",
                     "trajflow_preprocess_resample_seconds_bucket"):
        assert expected in names
    assert not [n for n in names if n.endswith("_created")]


# ---- label values exported at 0 from the start -----------------------------------------


def _registry_sample(metrics, name: str, **labels: str) -> float | None:  # type: ignore[no-untyped-def]
    return metrics.registry.get_sample_value(name, labels)


def test_download_failure_reasons_and_outcomes_start_at_zero():
    from trajflow.download.failures import REASONS
    from trajflow.metrics import DOWNLOAD_OUTCOMES

    metrics = download_metrics()
    for reason in REASONS:
        assert _registry_sample(metrics, "trajflow_download_failures_total", reason=reason) == 0
    for outcome in DOWNLOAD_OUTCOMES:
        assert _registry_sample(metrics, "trajflow_download_items_total", outcome=outcome) == 0


def test_first_push_carries_the_zero_counters_before_any_failure(pushgateway):
    from trajflow.download.failures import REASONS

    metrics = download_metrics()
    # a long interval: only the push at start can put the group there before stop()
    pusher = Pusher(pushgateway.url, metrics, run="run-z", shard=3).start(3600)
    try:
        deadline = time.monotonic() + 10
        while not pushgateway.groups() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = pushgateway.metrics_text()
    finally:
        pusher.stop(success=True)
    group = {"job": PUSH_JOB, "run": "run-z", "stage": "download", "shard": "3"}
    for reason in REASONS:
        assert _sample(text, "trajflow_download_failures_total", reason=reason, **group) == 0, reason
    assert _sample(text, "trajflow_download_items_total", outcome="failed", **group) == 0
    assert _sample(text, "trajflow_stage_success", **group) == 0  # still running: stop() had not pushed yet


def test_preprocess_quarantine_reasons_start_at_zero(local_storage):
    from trajflow.config.preprocess import PreprocessConfig
    from trajflow.preprocess import readers
    from trajflow.preprocess.stage import ShardProcessor

    processor = ShardProcessor(local_storage, 0, 1, PreprocessConfig())
    for reason in readers.REASONS:
        assert _registry_sample(processor.metrics, "trajflow_preprocess_quarantined_total", reason=reason) == 0


def test_clean_up_gives_up_on_a_gateway_that_stopped_answering_and_survives_a_bad_listing(
        recorder, monkeypatch):  # type: ignore[no-untyped-def]
    import json

    monkeypatch.setenv("TRAJFLOW_NAMESPACE", "prod")
    monkeypatch.setenv("TRAJFLOW_RELEASE", "a")
    earlier = [{"labels": {"job": PUSH_JOB, "run": "old", "stage": "download", "shard": str(i), "namespace": "prod",
                           "release": "a"}} for i in range(5)]
    recorder.listing = json.dumps({"status": "success", "data": earlier}).encode()
    recorder.delete_delay_s = 2.0  # each DELETE outlasts the timeout
    pusher = Pusher(recorder.url, download_metrics(), run="new", shard=0, timeout=0.3)
    pusher.drop_shards_from(1)
    assert [r[0] for r in recorder.requests] == ["GET", "DELETE"]  # not a timeout per group
    for bad in (b'{"data": {"not": "a list"}}', b'{"data": [null, "x", {"labels": 3}]}', b"<html>"):
        recorder.listing = bad
        pusher.drop_shards_from(1)  # never raises: metrics never fail the data work


def test_a_process_forgets_what_its_earlier_attempt_pushed_last(pushgateway):
    # a diverged training's final push (loss +Inf) would alert through the rerun, which pushes only at its end
    for shard in ("0", "1"):
        metrics = train_metrics()
        metrics.loss.labels(split="train").set(float("inf"))
        Pusher(pushgateway.url, metrics, run="run-x", shard=shard, labels={"local_rank": "0"}).stop(success=False)
    Pusher(pushgateway.url, train_metrics(), run="run-x", shard="0", labels={"local_rank": "0"}).forget()
    assert [(g["labels"]["shard"], g["labels"]["local_rank"]) for g in pushgateway.groups()] == [("1", "0")]
    Pusher("", train_metrics(), run="run-x", shard="1").forget()  # no Pushgateway: nothing to do
    assert len(pushgateway.groups()) == 1


def test_a_process_tells_whether_its_group_was_taken_over(pushgateway, monkeypatch):
    """A download pod of a Job an upgrade replaced pushes its last state only while no pod of
    the new Job has pushed the shard's group: a stop would show the new one's shard ended."""
    monkeypatch.setenv("TRAJFLOW_NAMESPACE", "ml")
    old, new = download_metrics(), download_metrics()
    old.start_time.set(1_765_000_000.125)
    old_pusher = Pusher(pushgateway.url, old, run="r", shard=3)
    assert old_pusher.group_is_mine() is False  # nothing pushed yet
    assert old_pusher.push() and old_pusher.group_is_mine()
    new.start_time.set(1_765_000_042.5)
    assert Pusher(pushgateway.url, new, run="r", shard=3).push()
    assert old_pusher.group_is_mine() is False
    assert Pusher("http://127.0.0.1:9", old, run="r", shard=3).group_is_mine() is False  # unknown: not mine
