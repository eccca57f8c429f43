"""`trajflow wait`: backoff until upstream manifests exist, exit 6 with a clear line on timeout."""
from __future__ import annotations

import threading
import time

import pytest

from trajflow import cli
from trajflow.errors import ConfigError, ExitCode, WaitTimeout
from trajflow.storage import LocalStorage, write_manifest
from trajflow.storage.wait import parse_duration, parse_shards, wait_for_shards


@pytest.mark.parametrize(
    "text,seconds",
    [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1h30m", 5400), ("1.5h", 5400), ("0.5s", 0.5), (" 2h ", 7200)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "2d", "-5s", "1m2h", "abc", "5 minutes"])
def test_bad_duration_is_a_config_error(text):
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("spec,shards", [("3", {3}), ("0-3", {0, 1, 2, 3}), ("0,2,5-6", {0, 2, 5, 6}), ("1, 1-2", {1, 2})])
def test_parse_shards(spec, shards):
    assert parse_shards(spec) == shards


@pytest.mark.parametrize("spec", ["", "a", "3-1", "1-", "-2", "1,,2"])
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


def test_cli_exits_6_with_one_line_on_timeout(tmp_path, capsys):
    code = cli.main(["wait", "--stage", "download", "--shards", "0-1", "--timeout", "1s", "--config", _config(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.TIMEOUT == 6
    assert err[-1] == (f"trajflow wait: error: timed out after 1s waiting for 2 download shard(s) under "
                       f"{(tmp_path / 'run-a').as_uri()}/raw/_done: 0, 1")


def test_cli_returns_0_once_upstream_finishes(tmp_path):
    root = LocalStorage(tmp_path / "run-a")

    def upstream() -> None:
        time.sleep(0.5)
        for shard in (0, 1, 2):
            write_manifest(root, "download", shard, 3, [])

    writer = threading.Thread(target=upstream)
    writer.start()
    started = time.monotonic()
    try:
        code = cli.main(["wait", "--stage", "download", "--shards", "0-2", "--timeout", "2m", "--config", _config(tmp_path)])
    finally:
        writer.join()
    assert code == 0
    assert time.monotonic() - started < 30


def test_cli_rejects_an_unknown_stage(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["wait", "--stage", "train", "--shards", "0", "--config", _config(tmp_path)])
    assert info.value.code == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err
