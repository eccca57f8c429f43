"""SIGKILL the downloader at random points, then rerun: it completes, nothing corrupt or
partial is ever visible, and an item verified before a kill is never requested again."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from download_helpers import FaultyServer, hidden_files, payload, visible_files

MiB = 1 << 20
KILLS = 10
MAX_TRIALS = 20
TRAJFLOW = [sys.executable, "-m", "trajflow.cli"]


@pytest.fixture
def server() -> Iterator[FaultyServer]:
    # slow enough (about 8 MiB/s in all) that kills land in the middle of transfers
    with FaultyServer(rate_bytes_per_s=2.0 * MiB) as srv:
        yield srv


def _config_file(tmp_path: Path, urls: list[str]) -> Path:
    doc = {
        "global": {"runId": "kill", "storage": {"type": "filesystem", "filesystem": {"path": str(tmp_path / "root")}}},
        "config": {
            "sources": [{"type": "https", "name": "web", "urls": urls}],
            "concurrency": 4,
            "partSizeMib": 5,
            "multipartThresholdMib": 5,
            "timeoutSeconds": 5,
            "retries": {"attempts": 3, "backoffSeconds": 0.05, "maxBackoffSeconds": 0.2},
            "progressIntervalSeconds": 60,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _check_invariants(run_root: Path, expected: dict[str, bytes]) -> set[str]:
    """Every visible file is whole and correct; every record matches its file. Returns the
    items verified so far."""
    raw = run_root / "raw" / "00000"
    for rel, data in (visible_files(raw) if raw.exists() else {}).items():
        assert rel in expected, f"unexpected file {rel}"
        assert data == expected[rel], f"{rel} is visible but not the source's bytes"
    verified = set()
    records = run_root / "raw" / ".trajflow-verified"
    for path in records.rglob("*.json") if records.exists() else []:
        record = json.loads(path.read_bytes())
        data = (run_root / record["location"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"], f"record of {record['item']} lies"
        verified.add(record["item"])
    return verified


def test_sigkill_at_random_points_then_rerun(server: FaultyServer, tmp_path: Path) -> None:
    objects = {"/big.bin": payload(24 * MiB + 3, seed=1), "/mid1.bin": payload(8 * MiB, seed=2),
               "/mid2.bin": payload(8 * MiB + 11, seed=3)}
    objects.update({f"/s{i:02d}.bin": payload(40_000 + 40_000 * i, seed=10 + i) for i in range(16)})
    urls = [server.add(path, data) for path, data in objects.items()]
    config = _config_file(tmp_path, urls)
    expected = {f"web{p}": d for p, d in objects.items()}
    run_root = tmp_path / "root" / "kill"
    env = {**os.environ, "TRAJFLOW_LOG_FORMAT": "json", "JOB_COMPLETION_INDEX": "0", "TRAJFLOW_SHARDS": "1"}
    rng = random.Random(20260101)

    killed = trials = 0
    while killed < KILLS and trials < MAX_TRIALS:
        trials += 1
        before = _check_invariants(run_root, expected)
        server.clear_log()
        proc = subprocess.Popen([*TRAJFLOW, "download", "--config", str(config)], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if trials <= 2:
            time.sleep(rng.uniform(0.1, 1.0))  # anywhere: while importing, planning or fetching
        else:
            # once bytes flow (startup time varies a lot on a loaded machine), a random moment later
            deadline = time.monotonic() + 30
            while not server.started and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait(timeout=30)
        assert proc.returncode in (0, -signal.SIGKILL)
        _check_invariants(run_root, expected)
        refetched = {f"web{r.path}" for r in server.requests()} & before
        assert not refetched, f"verified before the kill, fetched again: {sorted(refetched)}"
    assert killed >= KILLS, f"only {killed} of {trials} runs were killed mid-way; the data set is too small for this machine"

    verified = _check_invariants(run_root, expected)
    server.clear_log()
    summary_file = tmp_path / "summary.json"
    final = subprocess.run([*TRAJFLOW, "download", "--config", str(config), "--summary-json", str(summary_file)],
                           env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert final.returncode == 0, final.stderr.decode()[-2000:]
    assert visible_files(run_root / "raw" / "00000") == expected
    assert hidden_files(run_root / "raw" / "00000") == []  # no download temporary is left
    # the killed runs' work counted: the last run fetched well under the whole data set
    summary = json.loads(summary_file.read_text())
    total = sum(len(d) for d in objects.values())
    assert summary["bytes_received"] < total, summary
    # every item verified by a killed run is kept as it is, not fetched again
    assert summary["skipped"] + summary["adopted"] >= len(verified), (sorted(verified), summary)
    assert not {f"web{r.path}" for r in server.requests()} & verified

    server.clear_log()
    again = subprocess.run([*TRAJFLOW, "download", "--config", str(config)], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=60)
    assert again.returncode == 0
    assert server.requests() == [] and server.requests(method="HEAD") == []
