"""`trajflow download` as the pod runs it: the rendered config file, shard from the
environment, exit codes for the podFailurePolicy, metrics pushed by shard, no stdin."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from download_helpers import FaultyServer, payload, visible_files

from trajflow.errors import ExitCode

TRAJFLOW = [sys.executable, "-m", "trajflow.cli"]


@pytest.fixture
def server() -> Iterator[FaultyServer]:
    with FaultyServer() as srv:
        yield srv


class PushCapture:
    """A stand-in Pushgateway that records what is pushed where."""

    def __init__(self) -> None:
        self.pushes: list[tuple[str, str, str]] = []
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _store(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                capture.pushes.append((self.command, self.path, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = _store

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write_config(tmp_path: Path, sources: list[dict[str, Any]], pushgateway: str = "", **config: Any) -> Path:
    doc = {
        "global": {
            "runId": "clirun",
            "storage": {"type": "filesystem", "filesystem": {"path": str(tmp_path / "root")}},
            "metrics": {"pushgatewayUrl": pushgateway},
        },
        "config": {
            "sources": sources,
            "retries": {"attempts": 2, "backoffSeconds": 0.01, "maxBackoffSeconds": 0.02},
            "timeoutSeconds": 2,
            **config,
        },
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def trajflow(args: list[str], shard: int = 0, shards: int = 1, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JOB_COMPLETION_INDEX": str(shard), "TRAJFLOW_SHARDS": str(shards), "TRAJFLOW_LOG_FORMAT": "json"}
    return subprocess.run([*TRAJFLOW, *args], env=env, capture_output=True, text=True, timeout=120, **kwargs)


def test_shard_from_the_environment_and_stdin_is_never_read(server: FaultyServer, tmp_path: Path) -> None:
    urls = [server.add(f"/{i}.bin", payload(1000 * (i + 1), seed=i)) for i in range(6)]
    config = write_config(tmp_path, [{"type": "https", "name": "web", "urls": urls}])
    for shard in range(2):
        # stdin is an open pipe nobody writes to: a prompt would hang until the timeout
        env = {**os.environ, "JOB_COMPLETION_INDEX": str(shard), "TRAJFLOW_SHARDS": "2"}
        proc = subprocess.Popen([*TRAJFLOW, "download", "--config", str(config)], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=60)
        finally:
            proc.kill()
            proc.communicate()
        assert proc.returncode == 0
    root = tmp_path / "root" / "clirun" / "raw"
    together = {**visible_files(root / "00000"), **visible_files(root / "00001")}
    assert len(together) == 6 and visible_files(root / "00000").keys().isdisjoint(visible_files(root / "00001"))
    assert sorted(p.name for p in (root / "_done").iterdir()) == ["00000.json", "00001.json"]


def test_exit_codes_follow_the_failure_kind(server: FaultyServer, tmp_path: Path) -> None:
    ok = server.add("/ok.bin", payload(10))
    server.add("/flaky.bin", payload(10))
    server.script("/flaky.bin", *["503"] * 20)

    permanent = trajflow(["download", "--config", str(write_config(tmp_path / "p", [
        {"type": "https", "name": "web", "urls": [ok, server.url("/missing.bin")]}]))])
    assert permanent.returncode == ExitCode.PERMANENT
    assert "failed permanently" in permanent.stderr and "missing.bin" in permanent.stderr

    transient = trajflow(["download", "--config", str(write_config(tmp_path / "t", [
        {"type": "https", "name": "web", "urls": [{"url": server.url("/flaky.bin"), "size": 10}]}]))])
    assert transient.returncode == ExitCode.TRANSIENT
    assert "still failing" in transient.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"global": {}, "config": {"sources": [{"type": "https", "name": "web", "urls": [ok],
                                                                         "retrys": 3}]}}))
    config_error = trajflow(["download", "--config", str(bad)])
    assert config_error.returncode == ExitCode.CONFIG
    assert "retrys" in config_error.stderr and "unknown key" in config_error.stderr

    empty = trajflow(["download", "--config", str(write_config(tmp_path / "e", []))])
    assert empty.returncode == ExitCode.CONFIG and "sources is empty" in empty.stderr

    nowhere = trajflow(["download", "--config", str(bad), "--summary-json", str(tmp_path / "no" / "s.json")])
    assert nowhere.returncode == ExitCode.CONFIG and "--summary-json" in nowhere.stderr  # before any download
    assert "not a file that can be written" in nowhere.stderr and "Traceback" not in nowhere.stderr
    a_directory = trajflow(["download", "--config", str(bad), "--summary-json", str(tmp_path)])
    assert a_directory.returncode == ExitCode.CONFIG and "not a file that can be written" in a_directory.stderr


def test_a_shard_that_fails_for_good_says_so_to_the_stage_waiting_for_it(server: FaultyServer, tmp_path: Path) -> None:
    """Exit 3 fails the shard's index: a record of it lets the preprocessing pod waiting for
    the shard stop instead of holding its GPU; the shard's next attempt removes it."""
    from trajflow.config import stage_settings
    from trajflow.storage import LocalStorage
    from trajflow.storage.manifest import read_failure

    urls = [server.add("/ok.bin", payload(10)), server.url("/later.bin")]
    config = write_config(tmp_path, [{"type": "https", "name": "web", "urls": urls}])
    storage = LocalStorage(tmp_path / "root" / "clirun")
    assert trajflow(["download", "--config", str(config)]).returncode == ExitCode.PERMANENT
    record = read_failure(storage, "download", 0)
    generation = stage_settings("downloader", str(config), [], []).config.generation_id()
    assert record is not None and (record["shards"], record["generation"]) == (1, generation)
    assert "failed permanently" in record["error"] and "later.bin" in record["error"]

    server.add("/later.bin", payload(20))
    assert trajflow(["download", "--config", str(config)]).returncode == 0
    assert read_failure(storage, "download", 0) is None and not storage.exists("raw/_failed/00000.json")


def test_a_summary_the_disk_cannot_take_is_no_config_error_and_leaves_no_file(
        server: FaultyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from trajflow.cli import main

    config = write_config(tmp_path, [{"type": "https", "name": "web", "urls": [server.add("/a.bin", payload(100))]}])
    summary = tmp_path / "s.json"
    (tmp_path / f".s.json.tmp-{os.getpid()}").symlink_to("/dev/full")  # its temporary lands on a full disk
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    monkeypatch.setenv("TRAJFLOW_SHARDS", "1")
    code = main(["download", "--config", str(config), "--summary-json", str(summary)])
    assert code == ExitCode.ERROR  # retried, not the Job failed as a config error
    assert "cannot write it (No space left on device); the shard itself is done" in capsys.readouterr().err
    assert not summary.exists() and not (tmp_path / f".s.json.tmp-{os.getpid()}").exists()


def test_a_summary_through_a_link_is_written_to_its_target(server: FaultyServer, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from trajflow.cli import main

    config = write_config(tmp_path, [{"type": "https", "name": "web", "urls": [server.add("/a.bin", payload(100))]}])
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    monkeypatch.setenv("TRAJFLOW_SHARDS", "1")
    assert main(["download", "--config", str(config), "--summary-json", str(tmp_path / "link.json")]) == 0
    assert (tmp_path / "link.json").is_symlink()
    assert json.loads((tmp_path / "real.json").read_text())["fetched"] == 1


def test_plan_only_prints_this_shards_items(server: FaultyServer, tmp_path: Path) -> None:
    gateway = PushCapture()
    try:
        urls = [server.add(f"/{i}.bin", payload(100 * (i + 1))) for i in range(5)]
        config = write_config(tmp_path, [{"type": "https", "name": "web", "urls": urls}], pushgateway=gateway.url)
        lines = []
        for shard in range(3):
            out = trajflow(["download", "--config", str(config), "--plan-only"], shard=shard, shards=3)
            assert out.returncode == 0, out.stderr
            lines += [json.loads(line)["key"] for line in out.stdout.splitlines()]
    finally:
        gateway.stop()
    assert sorted(lines) == sorted(f"web/{i}.bin" for i in range(5))
    assert server.requests() == []  # planning only sizes with HEAD
    assert not (tmp_path / "root" / "clirun" / "raw").exists()
    assert gateway.pushes == []  # zeros would replace the figures of the shard's real download


def test_metrics_are_pushed_with_the_shard_in_the_grouping_key(server: FaultyServer, tmp_path: Path) -> None:
    gateway = PushCapture()
    try:
        urls = [server.add(f"/{i}.bin", payload(2000, seed=i)) for i in range(3)]
        config = write_config(tmp_path, [{"type": "https", "name": "web", "urls": urls}], pushgateway=gateway.url)
        out = trajflow(["download", "--config", str(config)], shard=1, shards=2)
        assert out.returncode == 0, out.stderr
    finally:
        gateway.stop()
    assert gateway.pushes
    method, path, body = gateway.pushes[-1]
    segments = path.strip("/").split("/")
    assert method == "POST" and segments[:3] == ["metrics", "job", "trajflow"]
    assert dict(zip(segments[3::2], segments[4::2])) == {"run": "clirun", "stage": "download", "shard": "1"}
    for series in ("trajflow_download_bytes_total", 'trajflow_download_items_total{outcome="fetched"}',
                   "trajflow_download_bytes_planned", "trajflow_download_duration_seconds",
                   "trajflow_download_throughput_bytes_per_second", "trajflow_stage_success 1.0"):
        assert series in body, series


def test_a_pod_of_a_replaced_job_exits_2_and_pushes_nothing(server: FaultyServer, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Its shard's group is the new Job's too: a push would show the new shard failed. It
    looks again for a while first: a new pod may have mounted the ConfigMap before it changed."""
    import trajflow.download.shard as shard_module
    from trajflow import cli

    monkeypatch.setattr(shard_module, "RELEASE_PATIENCE_S", 0.3)
    gateway = PushCapture()
    try:
        urls = [server.add(f"/{i}.bin", payload(2000, seed=i)) for i in range(3)]
        sources = [{"type": "https", "name": "web", "urls": urls}]
        config = write_config(tmp_path, sources, pushgateway=gateway.url)
        # the release's downloader config now names 3 shards (the dataset ConfigMap the chart mounts)
        release = tmp_path / "dataset.yaml"
        release.write_text(yaml.safe_dump({"config": {"sources": sources}, "shards": 3}))
        for name, value in {"JOB_COMPLETION_INDEX": "0", "TRAJFLOW_SHARDS": "2", "TRAJFLOW_DATASET_CONFIG": str(release),
                            "TRAJFLOW_LOG_FORMAT": "json"}.items():
            monkeypatch.setenv(name, value)
        assert cli.main(["download", "--config", str(config)]) == ExitCode.CONFIG
        assert gateway.pushes == [] and not (tmp_path / "root" / "clirun" / "plan").exists()
        monkeypatch.setenv("TRAJFLOW_SHARDS", "3")  # the release's own shard count goes on
        assert cli.main(["download", "--config", str(config)]) == ExitCode.OK
        assert gateway.pushes
    finally:
        gateway.stop()


@pytest.mark.parametrize("taken_over", [False, True])
def test_a_pod_replaced_while_it_runs_says_it_stopped_unless_the_new_pod_pushed(
        server: FaultyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pushgateway, taken_over: bool) -> None:
    """Its group would otherwise stay "running" with no pushes, which the lost-shard alert
    reports; once the new Job's pod pushed the group, that pod's figures stand."""
    import trajflow.download.shard as shard_module
    from prometheus_client.parser import text_string_to_metric_families

    from trajflow import cli
    from trajflow.metrics import Pusher, download_metrics

    def replaced(self):  # the release's ConfigMap changed under the running pod
        if taken_over:
            newer = download_metrics()
            newer.start_time.set(time.time() + 5)
            Pusher(pushgateway.url, newer, run="clirun", shard=0).push()
        raise shard_module.Superseded("the release now downloads 3 shards")

    monkeypatch.setattr(shard_module.ShardDownloader, "run", replaced)
    config = write_config(tmp_path, [{"type": "https", "name": "web", "urls": [server.add("/a.bin", payload(10))]}],
                          pushgateway=pushgateway.url)
    assert cli.main(["download", "--config", str(config)]) == ExitCode.CONFIG
    pushed = {s.name: s.value for f in text_string_to_metric_families(pushgateway.metrics_text()) for s in f.samples
              if s.labels.get("stage") == "download" and s.labels.get("shard") == "0"}
    if taken_over:
        assert pushed["trajflow_stage_end_time_seconds"] == 0  # the new pod's, running
    else:
        assert pushed["trajflow_stage_end_time_seconds"] > 0 and pushed["trajflow_stage_interrupted"] == 1
        assert pushed["trajflow_stage_success"] == 0


def test_a_new_pod_that_mounted_the_release_before_it_changed_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import trajflow.download.shard as shard_module

    monkeypatch.setattr(shard_module, "RELEASE_PATIENCE_S", 60.0)
    looks = iter([(2, "g"), (2, "g"), (3, "g")])  # the kubelet brings the mount up to date
    pauses: list[float] = []
    shard_module.wait_for_release(lambda: next(looks), 3, "g", pause=lambda s: bool(pauses.append(s)))
    assert len(pauses) == 2
    with pytest.raises(shard_module.Superseded):  # a SIGTERM ends the wait
        shard_module.wait_for_release(lambda: (2, "g"), 3, "g", pause=lambda s: True)


def test_progress_lines_carry_rate_and_eta(server: FaultyServer, tmp_path: Path) -> None:
    server.rate_bytes_per_s = 2 << 20
    url = server.add("/slow.bin", payload(3 << 20))
    config = write_config(tmp_path, [{"type": "https", "name": "web", "urls": [url]}], progressIntervalSeconds=0.3)
    out = trajflow(["download", "--config", str(config)])
    assert out.returncode == 0, out.stderr
    progress = [json.loads(line) for line in out.stderr.splitlines() if '"progress"' in line]
    assert progress, out.stderr[-2000:]
    last = progress[-1]
    assert "ETA" in last["msg"] and "/s" in last["msg"]
    assert last["progress"]["bytes_total"] == 3 << 20 and "rate" in last["progress"]
    # the bytes of the item in flight count (its one part was taken at the start)
    assert any(0 < p["progress"]["bytes_done"] < 3 << 20 for p in progress), progress
    summary = [json.loads(line) for line in out.stderr.splitlines() if '"summary"' in line]
    assert summary and summary[-1]["summary"]["fetched"] == 1


def test_sigterm_pushes_final_metrics_and_exits_for_a_retry(server: FaultyServer, tmp_path: Path) -> None:
    import signal

    server.rate_bytes_per_s = 1 << 20
    url = server.add("/slow.bin", payload(20 << 20))
    gateway = PushCapture()
    try:
        config = write_config(tmp_path, [{"type": "https", "name": "web", "urls": [url]}], pushgateway=gateway.url,
                              multipartThresholdMib=5, partSizeMib=5)
        env = {**os.environ, "JOB_COMPLETION_INDEX": "0", "TRAJFLOW_SHARDS": "1", "TRAJFLOW_LOG_FORMAT": "json"}
        proc = subprocess.Popen([*TRAJFLOW, "download", "--config", str(config)], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        web = tmp_path / "root" / "clirun" / "raw" / "00000" / "web"

        def journaled_lines() -> int:
            return sum(len(j.read_text().splitlines()) for j in web.glob(".trajflow-tmp-dlj-*"))

        deadline = time.monotonic() + 30
        while (lines_at_signal := journaled_lines()) <= 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # past the header: some bytes are on disk
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        gateway.stop()
    # the state this test means to cover: the signal came mid-transfer, with bytes journaled
    # (not before the first part landed, nor after the item was done)
    assert lines_at_signal > 2, ("the journal never grew past its header before SIGTERM", stderr[-2000:])
    assert proc.returncode == ExitCode.TRANSIENT, stderr[-2000:]
    assert "stopped by signal" in stderr
    assert gateway.pushes and "trajflow_stage_success 0.0" in gateway.pushes[-1][2]
    assert "trajflow_stage_interrupted 1.0" in gateway.pushes[-1][2]  # not failed: no failed-shard alert
    # the bytes fetched so far are kept for the next run
    journals = list(web.glob(".trajflow-tmp-dlj-*"))
    assert journals and len(journals[0].read_text().splitlines()) > 2


def test_sigterm_while_planning_stops_instead_of_sleeping_out_the_retries(server: FaultyServer, tmp_path: Path) -> None:
    """A throttled HEAD of each URL, many attempts with long backoffs: the pod's grace period
    is 30 s, planning's retries would take many minutes."""
    import signal

    urls = [server.add(f"/{i}.bin", payload(1000, seed=i)) for i in range(4)]
    for i in range(4):
        server.script(f"HEAD /{i}.bin", *["503"] * 50)
    config = write_config(tmp_path, [{"type": "https", "name": "web", "urls": urls}],
                          retries={"attempts": 50, "backoffSeconds": 60, "maxBackoffSeconds": 300})
    env = {**os.environ, "JOB_COMPLETION_INDEX": "0", "TRAJFLOW_SHARDS": "1", "TRAJFLOW_LOG_FORMAT": "json"}
    proc = subprocess.Popen([*TRAJFLOW, "download", "--config", str(config)], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while len([r for r in server.log if r.method == "HEAD"]) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)  # every URL has had its first HEAD refused: all are waiting to retry
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.TRANSIENT, stderr[-2000:]
    assert "stopped by signal 15" in stderr
    assert len([r for r in server.log if r.method == "HEAD"]) == 4  # none tried again after the signal
    plan = tmp_path / "root" / "clirun" / "plan"
    # nothing but the released lease to plan: no header, no parts
    assert [p.name for p in plan.rglob("*") if p.is_file()] in ([], ["1.json"])
    assert not list(plan.rglob("plan.json")) and not (plan / "download.json").exists()


def test_a_stop_signal_swallowed_by_the_metrics_still_stops_the_download(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The downloader's SIGTERM raises an Exception (exit 4): one arriving in the metrics'
    own `except Exception` (listing the Pushgateway's groups, which never fails the data work)
    is noted all the same, and the shard stops before it plans or fetches anything."""
    import urllib.request

    from trajflow.cli import main
    from trajflow.download import cli as download_cli
    from trajflow.download.failures import STOPPING

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"a")
    config = write_config(tmp_path, [{"type": "file", "name": "ds", "path": str(tmp_path / "src")}],
                          pushgateway="http://127.0.0.1:9")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    monkeypatch.setenv("TRAJFLOW_SHARDS", "1")

    def signalled(*args: Any, **kwargs: Any) -> Any:
        download_cli._terminated(15, None)  # as the SIGTERM handler does, mid-call

    monkeypatch.setattr(urllib.request, "urlopen", signalled)
    try:
        assert main(["download", "--config", str(config)]) == int(ExitCode.TRANSIENT)
    finally:
        STOPPING.clear()
    assert not (tmp_path / "root" / "clirun" / "raw").exists()  # nothing fetched
    assert not list((tmp_path / "root" / "clirun").rglob("download.json"))  # nor planned


def test_a_stop_that_ended_an_earlier_run_in_this_process_does_not_end_the_next(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from trajflow.cli import main
    from trajflow.download.failures import STOPPING

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"a")
    config = write_config(tmp_path, [{"type": "file", "name": "ds", "path": str(tmp_path / "src")}])
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    monkeypatch.setenv("TRAJFLOW_SHARDS", "1")
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    STOPPING.set()  # as a SIGTERM left it
    try:
        assert main(["download", "--config", str(config)]) == 0
    finally:
        STOPPING.clear()
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is back


def test_values_files_give_the_shard_count_and_say_so(server: FaultyServer, tmp_path: Path) -> None:
    urls = [server.add(f"/{i}.bin", payload(1000 * (i + 1), seed=i)) for i in range(4)]
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({
        "global": {"runId": "v", "storage": {"type": "filesystem", "filesystem": {"path": str(tmp_path / "root")}}},
        "downloader": {"shards": 2, "config": {"sources": [{"type": "https", "name": "web", "urls": urls}]}},
    }))
    env = {k: v for k, v in os.environ.items() if k not in ("JOB_COMPLETION_INDEX", "TRAJFLOW_SHARDS")}
    proc = subprocess.run([*TRAJFLOW, "download", "-f", str(values)], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fetching shard 0 of 2 only (downloader.shards)" in proc.stderr
    done = tmp_path / "root" / "v" / "raw" / "_done"
    assert sorted(p.name for p in done.iterdir()) == ["00000.json"]
    assert json.loads((done / "00000.json").read_text())["shards"] == 2
