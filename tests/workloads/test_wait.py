"""`trajflow wait`: backoff until upstream manifests exist, exit 6 with a clear line on timeout."""
from __future__ import annotations

import errno
import os
import threading
import time
import uuid

import pytest
import yaml

from trajflow import cli
from trajflow.errors import ConfigError, ExitCode, StorageUnavailable, WaitTimeout
from trajflow.storage import LocalStorage, manifest_key, write_manifest
from trajflow.storage.wait import done_manifests, parse_duration, parse_shards, wait_for_shards


@pytest.mark.parametrize(
    "text,seconds",
    [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1h30m", 5400), ("1.5h", 5400), ("0.5s", 0.5), (" 2h ", 7200)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "2d", "-5s", "1m2h", "abc", "5 minutes", "1h30", "2m15", "1.5h30"])
def test_bad_duration_is_a_config_error(text):
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("spec,shards", [("3", {3}), ("0-3", {0, 1, 2, 3}), ("0,2,5-6", {0, 2, 5, 6}), ("1, 1-2", {1, 2})])
def test_parse_shards(spec, shards):
    assert parse_shards(spec) == shards


@pytest.mark.parametrize("spec", ["", "a", "3-1", "1-", "-2", "1,,2", "0-99999999999", "100000"])
def test_bad_shard_list_is_a_config_error(spec):
    with pytest.raises(ConfigError):
        parse_shards(spec)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.on_sleep = lambda: None

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        self.on_sleep()


def test_waits_with_capped_exponential_backoff_until_every_manifest_exists(local_storage):
    fake = FakeClock()
    write_manifest(local_storage, "download", 0, 3, [])

    def upstream_progress() -> None:
        if len(fake.sleeps) == 4:
            write_manifest(local_storage, "download", 1, 3, [])
        if len(fake.sleeps) == 7:
            write_manifest(local_storage, "download", 2, 3, [])

    fake.on_sleep = upstream_progress
    wait_for_shards(local_storage, "download", {0, 1, 2}, timeout_s=3600, initial_delay_s=1, max_delay_s=8,
                    clock=fake.clock, sleep=fake.sleep)
    assert len(fake.sleeps) == 7
    # 1, 2, 4, 8, 8, ... with +-20% jitter
    for sleep, nominal in zip(fake.sleeps, [1, 2, 4, 8, 8, 8, 8]):
        assert 0.8 * nominal <= sleep <= 1.2 * nominal


def test_timeout_names_the_missing_shards(local_storage):
    fake = FakeClock()
    write_manifest(local_storage, "preprocess", 1, 4, [])
    with pytest.raises(WaitTimeout) as info:
        wait_for_shards(local_storage, "preprocess", {0, 1, 2, 3}, timeout_s=60, clock=fake.clock, sleep=fake.sleep)
    message = str(info.value)
    assert "\n" not in message
    assert message == (f"timed out after 60s waiting for 3 preprocess shard(s) under "
                       f"{local_storage.uri}/resampled/_done: 0, 2, 3")
    assert sum(fake.sleeps) == pytest.approx(60)  # the last sleep is cut to the deadline
    assert info.value.exit_code == ExitCode.TIMEOUT


def test_already_done_returns_without_sleeping(storage):
    for shard in range(2):
        write_manifest(storage, "download", shard, 2, [])
    fake = FakeClock()
    wait_for_shards(storage, "download", {0, 1}, timeout_s=0, clock=fake.clock, sleep=fake.sleep)
    assert fake.sleeps == []


def _config(tmp_path) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(f"global:\n  runId: run-a\n  storage:\n    filesystem: {{path: {tmp_path}}}\nconfig: {{}}\n")
    return str(path)


def test_cli_exits_6_with_one_line_on_timeout(terminal_output, tmp_path, capsys):
    code = cli.main(["wait", "--stage", "download", "--shards", "0-1", "--timeout", "1s", "--config", _config(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.TIMEOUT == 6
    assert err[-1] == (f"trajflow wait: error: timed out after 1s waiting for 2 download shard(s) under "
                       f"{(tmp_path / 'run-a').as_uri()}/raw/_done: 0, 1")


def test_cli_given_values_takes_the_release_pushgateway_template_as_no_pushing(terminal_output, tmp_path, capsys):
    """As `trajflow run` does: values files name the in-release Pushgateway with a template
    only the chart renders, and waiting pushes nothing anyway."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"global": {"runId": "run-a", "storage": {"filesystem": {"path": str(tmp_path)}},
                                                 "metrics": {"pushgatewayUrl": '{{ include "x" . }}'}}}))
    code = cli.main(["wait", "--stage", "download", "--shards", "0", "--timeout", "1s", "-f", str(values)])
    assert code == ExitCode.TIMEOUT and "timed out after 1s" in capsys.readouterr().err
    values.write_text(yaml.safe_dump({"global": {"runId": "{{ .Release.Name }}"}}))  # any other template is refused
    assert cli.main(["wait", "--stage", "download", "--shards", "0", "--timeout", "1s", "-f", str(values)]) == 2
    assert "global.runId is a Helm template ({{ .Release.Name }}), which only the chart renders" in \
        capsys.readouterr().err


def test_cli_checks_the_stage_config_before_waiting(terminal_output, tmp_path, capsys):
    """The training init container fails at once on a config the workers would refuse, not
    after every preprocessing shard is done while the GPUs are held."""
    path = tmp_path / "config.yaml"
    path.write_text(f"global:\n  runId: run-a\n  storage:\n    filesystem: {{path: {tmp_path}}}\n"
                    "config: {model: {type: transformer, hiddenSize: 100, numHeads: 8}}\n")
    code = cli.main(["wait", "--stage", "preprocess", "--shards", "0", "--timeout", "1h", "--config", str(path),
                     "--check-config", "training"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.CONFIG and "hiddenSize" in err[-1] and "numHeads" in err[-1], err
    # without the check the same file only needs a valid global
    code = cli.main(["wait", "--stage", "preprocess", "--shards", "0", "--timeout", "1s", "--config", str(path)])
    assert code == ExitCode.TIMEOUT


def test_cli_returns_0_once_upstream_finishes(tmp_path):
    root = LocalStorage(tmp_path / "run-a")

    def upstream() -> None:
        time.sleep(0.5)
        for shard in (0, 1, 2):
            write_manifest(root, "download", shard, 3, [])

    writer = threading.Thread(target=upstream)
    writer.start()
    try:
        code = cli.main(["wait", "--stage", "download", "--shards", "0-2", "--timeout", "2m", "--config", _config(tmp_path)])
        there_on_return = set(done_manifests(root, "download"))
    finally:
        writer.join()
    assert code == 0 and there_on_return == {0, 1, 2}  # it returned once all three were written


def test_cli_rejects_an_unknown_stage(terminal_output, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["wait", "--stage", "train", "--shards", "0", "--config", _config(tmp_path)])
    assert info.value.code == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err


# ---- manifests of another run ----------------------------------------------------------


def test_manifest_of_another_shard_count_keeps_the_gate_closed_until_rewritten(local_storage, caplog):
    fake = FakeClock()
    write_manifest(local_storage, "download", 0, 4, [])
    write_manifest(local_storage, "download", 1, 8, [])  # left by an earlier 8-shard run

    def upstream_rerun() -> None:
        if len(fake.sleeps) == 3:
            write_manifest(local_storage, "download", 1, 4, [])

    fake.on_sleep = upstream_rerun
    with caplog.at_level("WARNING", logger="trajflow.storage.wait"):
        wait_for_shards(local_storage, "download", {0, 1}, timeout_s=3600, clock=fake.clock, sleep=fake.sleep,
                        expect_shards=4)
    assert len(fake.sleeps) == 3  # the stale manifest held the gate until shard 1 was rewritten
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{local_storage.uri}/raw/_done/00001.json records shards=8 (expected 4): "
                        "waiting for upstream shard 1 to rewrite it"]  # once, not once per poll


def test_without_an_expected_count_any_manifest_counts(local_storage):
    write_manifest(local_storage, "download", 0, 8, [])
    fake = FakeClock()
    wait_for_shards(local_storage, "download", {0}, timeout_s=0, clock=fake.clock, sleep=fake.sleep)
    assert fake.sleeps == []


def test_timeout_names_the_stale_manifests_and_why(storage):
    fake = FakeClock()
    write_manifest(storage, "download", 0, 4, [])
    write_manifest(storage, "download", 1, 3, [])
    storage.write_bytes("raw/_done/00002.json", b"{not json")
    with pytest.raises(WaitTimeout) as info:
        wait_for_shards(storage, "download", {0, 1}, timeout_s=10, clock=fake.clock, sleep=fake.sleep,
                        expect_shards=2)
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        f"timed out after 10s waiting for 2 download shard(s) under {storage.uri}/raw/_done: 0, 1; "
        "2 of them have a manifest that does not count: shard 0 records shards=4 (expected 2); "
        "shard 1 records shards=3 (expected 2)"
    )
    assert info.value.exit_code == ExitCode.TIMEOUT


def test_an_unreadable_manifest_does_not_count(local_storage):
    fake = FakeClock()
    local_storage.write_bytes("resampled/_done/00000.json", b"{not json")
    with pytest.raises(WaitTimeout, match=r": 0; 1 of them have a manifest that does not count: shard 0 is unreadable: "
                                          r"corrupt manifest: the document ends early"):
        wait_for_shards(local_storage, "preprocess", {0}, timeout_s=5, clock=fake.clock, sleep=fake.sleep)


@pytest.mark.parametrize(
    "expect,match", [(0, "at least 1"), (2, r"shard 2 does not exist when there are 2 shard\(s\) \(0-1\)")]
)
def test_impossible_expectations_are_config_errors(local_storage, expect, match):
    with pytest.raises(ConfigError, match=match):
        wait_for_shards(local_storage, "download", {0, 2}, timeout_s=1, expect_shards=expect)


@pytest.mark.parametrize("failure", [OSError("Stale file handle"),
                                     StorageUnavailable("the connection ended at byte 7 of 9 4 times")])
def test_a_failed_poll_is_retried_until_the_deadline(local_storage, caplog, failure):
    """A store failing a read, even one the storage layer already resumed several times
    (an object store's body cut short), is tried again: the wait is what tolerates it."""
    class Flaky(LocalStorage):
        calls = 0

        def list(self, prefix=""):  # type: ignore[no-untyped-def]
            type(self).calls += 1
            if type(self).calls <= 2:
                raise failure
            return super().list(prefix)

    root = Flaky(local_storage.root)
    write_manifest(root, "download", 0, 1, [])
    fake = FakeClock()
    with caplog.at_level("WARNING", logger="trajflow.storage.wait"):
        wait_for_shards(root, "download", {0}, timeout_s=60, clock=fake.clock, sleep=fake.sleep)
    assert len(fake.sleeps) == 2
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"cannot read {root.uri}/raw/_done ({failure}); trying again"]


def test_a_poll_failing_until_the_deadline_is_named_in_the_timeout(local_storage):
    class Down(LocalStorage):
        def list(self, prefix=""):  # type: ignore[no-untyped-def]
            raise OSError("Transport endpoint is not connected")

    fake = FakeClock()
    with pytest.raises(WaitTimeout, match=r"under .*/raw/_done: 0; the last poll failed: Transport endpoint is not "
                                          r"connected$"):
        wait_for_shards(Down(local_storage.root), "download", {0}, timeout_s=30, clock=fake.clock, sleep=fake.sleep)


def test_cli_expect_shards_rejects_a_stale_manifest(terminal_output, tmp_path, capsys):
    root = LocalStorage(tmp_path / "run-a")
    write_manifest(root, "preprocess", 0, 2, [])
    write_manifest(root, "preprocess", 1, 2, [])
    args = ["wait", "--stage", "preprocess", "--shards", "0-1", "--timeout", "1s", "--config", _config(tmp_path)]
    assert cli.main(args) == 0  # no expectation: any manifest counts
    code = cli.main(args + ["--expect-shards", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.TIMEOUT
    assert err[-1].startswith("trajflow wait: error: timed out after 1s waiting for 2 preprocess shard(s)")
    assert err[-1].endswith("shard 0 records shards=2 (expected 3); shard 1 records shards=2 (expected 3)")


# ---- an object store that refuses us ---------------------------------------------------


def _s3_config(tmp_path, endpoint: str, bucket: str = "no-such-run", run_id: str = "run-a") -> str:
    path = tmp_path / "s3-config.yaml"
    path.write_text(f"global:\n  runId: {run_id}\n  storage:\n    type: s3\n"
                    f"    s3: {{bucket: {bucket}, endpoint: '{endpoint}'}}\nconfig: {{}}\n")
    return str(path)


def test_cli_without_s3_credentials_is_one_config_error_line(terminal_output, tmp_path, capsys, monkeypatch):
    from trajflow.testing import free_port

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # nothing listens there: the credential check comes before any connection
    config = _s3_config(tmp_path, f"http://127.0.0.1:{free_port()}")
    code = cli.main(["wait", "--stage", "download", "--shards", "0", "--timeout", "1m", "--config", config])
    err = capsys.readouterr().err
    assert code == ExitCode.CONFIG == 2
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        "trajflow wait: error: cannot read s3://no-such-run/run-a/raw/_done: no usable S3 credentials (Unable to "
        "locate credentials); give the pod credentials through global.storage.s3.existingSecret (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY) or workload identity (on your machine: export AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    ]


def test_cli_with_credentials_the_store_refuses_is_one_config_error_line(terminal_output, s3_server, s3_shared_bucket, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    config = _s3_config(tmp_path, s3_server.endpoint, s3_shared_bucket)
    code = cli.main(["wait", "--stage", "download", "--shards", "0", "--timeout", "1m", "--config", config])
    err = capsys.readouterr().err
    assert code == ExitCode.CONFIG
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1
    assert lines[0].startswith(f"trajflow wait: error: cannot read s3://{s3_shared_bucket}/run-a/raw/_done: ")
    assert lines[0].endswith("the store does not accept these credentials: check global.storage.s3.existingSecret "
                             "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or workload identity (on your machine: "
                             "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")


def test_read_only_credentials_are_enough_to_wait(s3_server, s3_shared_bucket, tmp_path, monkeypatch):
    from trajflow.config import global_settings
    from trajflow.storage import open_run_root

    config = _s3_config(tmp_path, s3_server.endpoint, s3_shared_bucket, run_id=f"readonly-{uuid.uuid4().hex[:8]}")
    write_manifest(open_run_root(global_settings(config, [], [])), "download", 0, 1, [])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.reader_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.reader_secret)
    code = cli.main(["wait", "--stage", "download", "--shards", "0", "--timeout", "1m", "--config", config])
    assert code == ExitCode.OK


def test_cli_on_a_missing_bucket_is_one_config_error_line(terminal_output, s3_server, tmp_path, capsys):
    config = _s3_config(tmp_path, s3_server.endpoint, "trajflow-missing-bucket")
    code = cli.main(["wait", "--stage", "download", "--shards", "0", "--timeout", "1m", "--config", config])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.CONFIG
    assert len(lines) == 1
    assert lines[0].startswith(
        "trajflow wait: error: cannot read s3://trajflow-missing-bucket/run-a/raw/_done: NoSuchBucket (")
    assert lines[0].endswith("the bucket does not exist: check global.storage.s3.bucket and endpoint")


def test_the_plan_is_read_only_on_polls_with_new_manifests(local_storage, monkeypatch):
    # the download plan can hold millions of items: not read on every poll of a long wait
    local_storage.write_bytes("plan/download.json", b'{"shards": 4, "generation": 0, "fingerprint": "x"}')
    reads: list[str] = []
    open_read = local_storage.open_read  # the plan's and the manifests' fields are read in chunks
    monkeypatch.setattr(local_storage, "open_read", lambda key: reads.append(key) or open_read(key))
    fake = FakeClock()
    write_manifest(local_storage, "download", 0, 3, [])

    def upstream_progress() -> None:
        if len(fake.sleeps) == 5:
            write_manifest(local_storage, "download", 1, 3, [])

    fake.on_sleep = upstream_progress
    wait_for_shards(local_storage, "download", {0, 1}, timeout_s=3600, clock=fake.clock, sleep=fake.sleep,
                    expect_shards=3)
    assert len(fake.sleeps) == 5  # six polls
    assert reads.count("plan/download.json") == 2  # the first poll and the one that saw shard 1


def test_on_s3_a_stale_manifest_and_the_plan_are_read_again_only_when_they_change(s3_storage, monkeypatch):
    # thousands of pods polling for hours: an unchanged stale manifest (same ETag) is not
    # fetched again, nor an unchanged plan
    s3_storage.write_bytes("plan/download.json", b'{"shards": 3, "generation": "g2", "fingerprint": "f2"}')
    write_manifest(s3_storage, "download", 0, 3, [], generation="g1", plan_fingerprint="f1")  # the earlier plan's
    reads: list[str] = []
    open_read = s3_storage.open_read  # every read of an S3 object is one
    monkeypatch.setattr(s3_storage, "open_read", lambda key: reads.append(key) or open_read(key))
    fake = FakeClock()

    def upstream_progress() -> None:
        if len(fake.sleeps) == 4:  # the download shard redone for the plan in use
            write_manifest(s3_storage, "download", 0, 3, [], generation="g2", plan_fingerprint="f2")

    fake.on_sleep = upstream_progress
    wait_for_shards(s3_storage, "download", {0}, timeout_s=3600, clock=fake.clock, sleep=fake.sleep, expect_shards=3)
    assert len(fake.sleeps) == 4  # five polls
    assert reads.count("raw/_done/00000.json") == 2 and reads.count("plan/download.json") == 1


def test_a_credential_endpoint_failing_is_retried_not_a_config_error():
    from botocore.exceptions import CredentialRetrievalError, NoCredentialsError

    from trajflow.storage.wait import fatal_storage_error

    assert fatal_storage_error(CredentialRetrievalError(provider="container-role", error_msg="timed out"), "x") is None
    assert isinstance(fatal_storage_error(NoCredentialsError(), "x"), ConfigError)


@pytest.mark.parametrize("code", ["InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"])
def test_credentials_the_store_refuses_are_a_config_error_at_once(code):
    """An expired STS or workload-identity token does not heal by waiting out --timeout."""
    from botocore.exceptions import ClientError

    from trajflow.storage.wait import fatal_storage_error

    refused = ClientError({"Error": {"Code": code, "Message": "no"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
                          "ListObjectsV2")
    error = fatal_storage_error(refused, "s3://bucket/run")
    assert isinstance(error, ConfigError) and "the store does not accept these credentials" in str(error)


def test_a_manifest_removed_after_it_counted_closes_the_gate_again(local_storage):
    """An upstream rerun deleting a done shard's manifest: the shard is waited for again."""
    fake = FakeClock()
    write_manifest(local_storage, "preprocess", 0, 2, [])

    def upstream() -> None:
        if len(fake.sleeps) == 1:
            local_storage.delete(manifest_key("preprocess", 0))  # shard 0 is redone
            write_manifest(local_storage, "preprocess", 1, 2, [])
        if len(fake.sleeps) == 3:
            write_manifest(local_storage, "preprocess", 0, 2, [])

    fake.on_sleep = upstream
    wait_for_shards(local_storage, "preprocess", {0, 1}, timeout_s=3600, clock=fake.clock, sleep=fake.sleep)
    assert len(fake.sleeps) == 3  # not 1: shard 0 counted only once its manifest was back


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOTDIR])
def test_a_run_root_no_retry_can_write_is_a_config_error(code):
    from trajflow.storage.wait import fatal_storage_error

    error = fatal_storage_error(OSError(code, os.strerror(code), "/data/run/plan"), "file:///data/run")
    assert isinstance(error, ConfigError) and str(error).startswith("cannot use file:///data/run: ")
    assert fatal_storage_error(OSError(errno.EIO, "I/O error"), "file:///data/run") is None  # retried


def test_cli_on_an_endpoint_that_is_no_s3_store_is_one_config_error_line(terminal_output, tmp_path, capsys, monkeypatch):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    with ThreadingHTTPServer(("127.0.0.1", 0), NotFound) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            config = _s3_config(tmp_path, f"http://127.0.0.1:{httpd.server_address[1]}")
            code = cli.main(["wait", "--stage", "download", "--shards", "0", "--timeout", "1h", "--config", config])
        finally:
            httpd.shutdown()
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.CONFIG and len(lines) == 1  # not an hour of retries
    assert lines[0].endswith("the endpoint does not answer as an S3 store: check global.storage.s3.endpoint")


@pytest.mark.timeout(120)  # without a bound, one call would hang 8 x 60 s
def test_a_store_that_never_answers_gives_up_near_the_deadline(tmp_path, capsys, monkeypatch):
    import socket

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    accepted: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, reads, never answers
        def accept() -> None:
            while True:
                try:
                    accepted.append(silent.accept()[0])
                except OSError:
                    return

        threading.Thread(target=accept, daemon=True).start()
        config = _s3_config(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}")
        code = cli.main(["wait", "--stage", "download", "--shards", "0", "--timeout", "2s", "--config", config])
    for conn in accepted:
        conn.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.TIMEOUT
    assert "the last poll failed: Read timeout on endpoint URL" in err[-1]


@pytest.mark.parametrize("timeout_s,call_timeout_s", [(2, 2), (20, 15), (120, 30), (3600, 60)])
def test_one_call_to_the_store_never_outlasts_the_wait(timeout_s, call_timeout_s, monkeypatch, tmp_path):
    """Each poll's calls are bounded (two tries each): a quarter of the wait, 15 s to 60 s,
    and never more than the whole wait."""
    from trajflow import storage as storage_module
    from trajflow.storage import wait as wait_module

    opened = {}

    def open_run_root(glob, **client):
        opened.update(client)
        return LocalStorage(tmp_path / "root")

    monkeypatch.setattr(storage_module, "open_run_root", open_run_root)
    monkeypatch.setattr(wait_module, "wait_for_shards", lambda *args, **kwargs: None)
    wait_module.wait_in_run_root(object(), "download", {0}, timeout_s, expect_shards=None)
    assert opened == {"timeout": call_timeout_s, "attempts": 2}


def test_a_store_that_answers_slowly_is_still_heard(s3_server, s3_shared_bucket, tmp_path):
    from s3_proxy import Reply, S3Proxy

    from trajflow.config import global_settings
    from trajflow.storage import open_run_root

    class Slow(S3Proxy):
        def answer(self, method: str, path: str, request_headers: dict[str, str], reply: Reply) -> None:
            time.sleep(6)  # a loaded store: every answer takes 6 s, more than a 20 s wait's quarter

    run_id = f"slow-{uuid.uuid4().hex[:8]}"
    direct = _s3_config(tmp_path, s3_server.endpoint, s3_shared_bucket, run_id=run_id)
    write_manifest(open_run_root(global_settings(direct, [], [])), "preprocess", 0, 1, [])
    with Slow(s3_server.endpoint) as proxy:
        config = _s3_config(tmp_path, proxy.endpoint, s3_shared_bucket, run_id=run_id)
        code = cli.main(["wait", "--stage", "preprocess", "--shards", "0", "--timeout", "20s", "--config", config])
    assert code == ExitCode.OK


# ---- another dataset under the same run id ---------------------------------------------


def _download_done(storage, shard: int, shards: int, generation: str, fingerprint: str) -> None:
    write_manifest(storage, "download", shard, shards, [], generation=generation, plan_fingerprint=fingerprint)


def test_a_reinstall_with_another_dataset_waits_for_its_own_download(local_storage, caplog):
    """Installed again with other sources under the same run id, every stage starts at once:
    until the new download pods have planned, the earlier plan and its manifests are the
    run root's. The generation the downloader's config gives keeps them from counting."""
    local_storage.write_bytes("plan/download.json", b'{"shards": 2, "generation": "aaa", "fingerprint": "fa"}')
    for shard in (0, 1):
        _download_done(local_storage, shard, 2, "aaa", "fa")
    fake = FakeClock()
    wait_for_shards(local_storage, "download", {0, 1}, timeout_s=0, clock=fake.clock, sleep=fake.sleep,
                    expect_shards=2)  # without it the earlier dataset counts at once

    def new_download() -> None:
        if len(fake.sleeps) == 2:  # the download pods plan, then finish one shard at a time
            local_storage.write_bytes("plan/download.json", b'{"shards": 2, "generation": "bbb", "fingerprint": "fb"}')
            _download_done(local_storage, 0, 2, "bbb", "fb")
        if len(fake.sleeps) == 4:
            _download_done(local_storage, 1, 2, "bbb", "fb")

    fake.on_sleep = new_download
    with caplog.at_level("WARNING", logger="trajflow.storage.wait"):
        wait_for_shards(local_storage, "download", {0, 1}, timeout_s=3600, clock=fake.clock, sleep=fake.sleep,
                        expect_shards=2, download_generation="bbb")
    assert len(fake.sleeps) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{local_storage.uri}/raw/_done/00001.json records generation='aaa' (expected 'bbb'): waiting for " \
           "upstream shard 1 to rewrite it" in warnings


def test_a_new_plan_of_this_generation_still_refuses_the_earlier_plans_manifests(local_storage):
    local_storage.write_bytes("plan/download.json", b'{"shards": 1, "generation": "bbb", "fingerprint": "fb"}')
    _download_done(local_storage, 0, 1, "aaa", "fa")
    with pytest.raises(WaitTimeout, match=r"shard 0 records generation='aaa' \(expected 'bbb'\) and "
                                          r"plan_fingerprint='fa' \(expected 'fb'\) \(made for another "
                                          r"downloader.config, a source's endpoint included: its download pods have "
                                          r"yet to fetch what it names"):
        wait_for_shards(local_storage, "download", {0}, timeout_s=0, expect_shards=1, download_generation="bbb")


def test_training_waits_for_shards_preprocessed_from_the_expected_download(local_storage):
    write_manifest(local_storage, "preprocess", 0, 2, [], download_generation="bbb")
    write_manifest(local_storage, "preprocess", 1, 2, [], download_generation="aaa")
    with pytest.raises(WaitTimeout, match=r"1 of them have a manifest that does not count: shard 1 records "
                                          r"download_generation='aaa' \(expected 'bbb'\) \(made from another download: "
                                          r".* use a new global.runId, or raise preprocessing.rerun\)$"):
        wait_for_shards(local_storage, "preprocess", {0, 1}, timeout_s=0, expect_shards=2, download_generation="bbb")
    # one made before the field (preprocessing records it when it next passes over the shard)
    write_manifest(local_storage, "preprocess", 1, 2, [])
    with pytest.raises(WaitTimeout, match=r"shard 1 records no download_generation \(expected 'bbb'\)"):
        wait_for_shards(local_storage, "preprocess", {0, 1}, timeout_s=0, expect_shards=2, download_generation="bbb")
    write_manifest(local_storage, "preprocess", 1, 2, [], download_generation="bbb")
    wait_for_shards(local_storage, "preprocess", {0, 1}, timeout_s=0, expect_shards=2, download_generation="bbb")


def test_cli_expects_the_generation_of_the_downloader_config_it_is_given(terminal_output, tmp_path, capsys,
                                                                          monkeypatch):
    from trajflow.config import DownloadConfig
    from trajflow.config.loader import DATASET_CONFIG_ENV

    sources = [{"name": "lab", "type": "file", "path": str(tmp_path / "lab")}]
    dataset = tmp_path / "dataset.yaml"
    dataset.write_text(yaml.safe_dump({"config": {"sources": sources}}))
    generation = DownloadConfig.model_validate({"sources": sources}).generation_id()
    root = LocalStorage(tmp_path / "run-a")
    _download_done(root, 0, 1, "aaa", "fa")
    monkeypatch.setenv(DATASET_CONFIG_ENV, str(dataset))
    code = cli.main(["wait", "--stage", "download", "--shards", "0", "--timeout", "1s", "--config", _config(tmp_path)])
    assert code == ExitCode.TIMEOUT
    assert f"shard 0 records generation='aaa' (expected '{generation}')" in capsys.readouterr().err
    _download_done(root, 0, 1, generation, "fb")
    assert cli.main(["wait", "--stage", "download", "--shards", "0", "--timeout", "1s", "--config",
                     _config(tmp_path)]) == 0


def test_a_long_wait_says_what_it_waits_for_when_it_changes_and_every_few_minutes(local_storage, caplog):
    # an init container waiting 48 h, polled every 30 s, would write 5,760 identical lines
    import logging

    from trajflow.storage.wait import WAITING_LOG_INTERVAL_S

    fake = FakeClock()

    def upstream_progress() -> None:
        if fake.now >= 3600 and not list(done_manifests(local_storage, "download")):
            write_manifest(local_storage, "download", 0, 2, [])
        if fake.now >= 7200:
            write_manifest(local_storage, "download", 1, 2, [])

    fake.on_sleep = upstream_progress
    with caplog.at_level(logging.INFO, logger="trajflow"):
        wait_for_shards(local_storage, "download", {0, 1}, timeout_s=10_000, max_delay_s=30,
                        clock=fake.clock, sleep=fake.sleep)
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert len(fake.sleeps) > 200
    # two hours: one line per interval, plus one when shard 0 arrived
    assert 7200 / WAITING_LOG_INTERVAL_S <= len(waiting) <= 7200 / WAITING_LOG_INTERVAL_S + 3, len(waiting)
    assert "waiting for 1 download shard(s): [1]" in waiting


def test_the_plan_in_use_is_read_by_its_fields_only(local_storage, peak_in_small_chunks):
    """A plan written before its parts held the items lists them all in plan/download.json
    (240 MB for 1M items): a wait, in a 1Gi init container, reads its header fields only."""
    import json

    from trajflow.storage.wait import plan_in_use

    items = [{"key": f"raw/00001/episode_{i:09d}.parquet", "size": i, "url": f"s3://bucket/episode_{i:09d}"}
             for i in range(20000)]
    local_storage.write_bytes("plan/download.json", json.dumps(
        {"shards": 3, "generation": "g", "fingerprint": "f", "assignments": [items, [], []]}).encode())
    fields, peak = peak_in_small_chunks(lambda: plan_in_use(local_storage, "download", 3))
    assert fields == {"generation": "g", "plan_fingerprint": "f"}
    assert local_storage.stat("plan/download.json").size > 1_500_000 and peak < 8 * 64 * 1024, peak


# ---- an upstream shard that failed for good ---------------------------------------------


def _release_reruns(tmp_path, monkeypatch, downloader: int, preprocessing: int = 0) -> None:
    """The dataset ConfigMap as the chart mounts it: the stages' `rerun` the release names now."""
    path = tmp_path / "dataset.yaml"
    path.write_text(yaml.safe_dump({"config": {}, "shards": 4,
                                    "reruns": {"downloader": downloader, "preprocessing": preprocessing}}))
    monkeypatch.setenv("TRAJFLOW_DATASET_CONFIG", str(path))


def test_a_shard_that_failed_for_good_ends_the_wait_unless_the_release_reruns_it(local_storage, tmp_path,
                                                                                 monkeypatch, caplog):
    """A failed download shard (exit 3: its index is failed) never writes its manifest: the
    preprocessing pod waiting for it says why at once and, when the release's downloader
    `rerun` is still the one that failed, gives up after the grace instead of holding its GPU
    until its timeout."""
    from trajflow.storage.manifest import record_failure
    from trajflow.storage.wait import FAILED_UPSTREAM_GRACE_S, UpstreamFailed

    write_manifest(local_storage, "download", 0, 4, [], generation="g1")
    monkeypatch.setenv("TRAJFLOW_RERUN", "1")  # the download pod's own attempt
    record_failure(local_storage, "download", 3, 4, "g1", "1 item(s) failed permanently, 0 transiently: x.h5: 404")
    monkeypatch.delenv("TRAJFLOW_RERUN")
    _release_reruns(tmp_path, monkeypatch, downloader=1)
    fake = FakeClock()
    with caplog.at_level("WARNING", logger="trajflow.storage.wait"), pytest.raises(UpstreamFailed) as info:
        wait_for_shards(local_storage, "download", {0, 3}, timeout_s=48 * 3600, clock=fake.clock, sleep=fake.sleep,
                        expect_shards=4, download_generation="g1")
    assert FAILED_UPSTREAM_GRACE_S <= fake.now < FAILED_UPSTREAM_GRACE_S + 60
    assert str(info.value) == (
        "download shard 3 failed for good: 1 item(s) failed permanently, 0 transiently: x.h5: 404: fix that, then "
        "raise downloader.rerun (with this stage's rerun, once its Job has failed); downloader.rerun was not raised "
        "in 600s")
    assert info.value.exit_code == ExitCode.TIMEOUT  # retried: a rerun may yet come
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"download shard 3 failed for good: 1 item(s) failed permanently, 0 transiently: x.h5: 404; "
                        f"no rerun of it is on its way: giving up in 600s unless downloader.rerun is raised "
                        f"({local_storage.uri}/raw/_failed/00003.json)"]

    # raised before the rerun's pod of the shard started: the record is an earlier attempt's
    _release_reruns(tmp_path, monkeypatch, downloader=2)
    fake = FakeClock()
    with pytest.raises(WaitTimeout) as info:
        wait_for_shards(local_storage, "download", {3}, timeout_s=3 * 3600, clock=fake.clock, sleep=fake.sleep,
                        expect_shards=4, download_generation="g1")
    assert not isinstance(info.value, UpstreamFailed) and fake.now == pytest.approx(3 * 3600)


def test_a_failure_whose_attempt_is_unknown_is_reported_without_giving_up(local_storage):
    """`trajflow run`, or an install without the dataset ConfigMap: no telling whether a
    rerun is on its way, so the wait goes on to its timeout, which names the failure."""
    from trajflow.storage.manifest import record_failure

    record_failure(local_storage, "preprocess", 1, 2, None, "12 of 40 trajectories are bad")
    fake = FakeClock()
    with pytest.raises(WaitTimeout, match=r"preprocess shard 1 failed for good: 12 of 40 trajectories are bad: fix "
                                          r"that, then raise preprocessing.rerun") as info:
        wait_for_shards(local_storage, "preprocess", {1}, timeout_s=5 * 3600, clock=fake.clock, sleep=fake.sleep,
                        expect_shards=2)
    assert fake.now == pytest.approx(5 * 3600) and type(info.value) is WaitTimeout


def test_a_rerun_of_the_failed_shard_lets_the_wait_go_on(local_storage):
    from trajflow.storage.manifest import clear_failure, record_failure

    record_failure(local_storage, "preprocess", 1, 2, None, "12 of 40 trajectories are bad")
    fake = FakeClock()

    def rerun() -> None:
        if fake.now > 300:  # the upstream pod of the rerun starts, then finishes
            clear_failure(local_storage, "preprocess", 1)
        if fake.now > 900:
            write_manifest(local_storage, "preprocess", 1, 2, [])

    fake.on_sleep = rerun
    wait_for_shards(local_storage, "preprocess", {1}, timeout_s=3600, clock=fake.clock, sleep=fake.sleep,
                    expect_shards=2)
    assert fake.now > 900


@pytest.mark.parametrize("shards,generation", [(8, "g1"), (4, "g0")])
def test_the_failure_of_an_earlier_run_is_not_this_ones(local_storage, shards, generation):
    from trajflow.storage.manifest import record_failure

    record_failure(local_storage, "download", 0, shards, generation, "gone")
    fake = FakeClock()
    with pytest.raises(WaitTimeout) as info:
        wait_for_shards(local_storage, "download", {0}, timeout_s=3 * 3600, clock=fake.clock, sleep=fake.sleep,
                        expect_shards=4, download_generation="g1")
    assert "failed for good" not in str(info.value) and fake.now == pytest.approx(3 * 3600)


def test_a_timeout_before_the_grace_names_the_failed_shard(local_storage):
    from trajflow.storage.manifest import record_failure

    record_failure(local_storage, "download", 2, 4, None, "checksum mismatch")
    with pytest.raises(WaitTimeout, match=r"under .*/raw/_done: 2; download shard 2 failed for good: checksum "
                                          r"mismatch: fix that, then raise downloader.rerun"):
        wait_for_shards(local_storage, "download", {2}, timeout_s=0)
