"""Atomicity across processes: a writer killed mid-write leaves nothing visible, and
write-if-absent has exactly one winner among concurrent processes, on both backends."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trajflow.storage import LocalStorage
from trajflow.storage.s3 import S3Storage

MiB = 1024 * 1024

CHILD = r"""
import json, os, sys, time
from trajflow.storage import open_storage
from trajflow.storage import s3 as s3mod

cfg = json.loads(sys.argv[1])
store = open_storage(cfg["uri"], **cfg.get("options", {}))
if cfg.get("part_size"):
    store.part_size = cfg["part_size"]
if cfg.get("no_conditional"):
    s3mod._conditional_support[(str(store.client.meta.endpoint_url), store.bucket)] = False
    store.elect_settle_s = cfg["settle"]
if cfg["mode"] == "write-and-hang":
    with store.writer(cfg["key"]) as fh:
        for _ in range(cfg["chunks"]):
            fh.write(os.urandom(cfg["chunk"]))
        print("WROTE", flush=True)
        time.sleep(600)
elif cfg["mode"] == "race":
    print("READY", flush=True)
    while not os.path.exists(cfg["go"]):
        time.sleep(0.002)
    won = store.write_if_absent(cfg["key"], cfg["data"].encode())
    print(json.dumps({"won": won}), flush=True)
"""


def _target(storage) -> tuple[str, dict]:
    """URI and open options a child process needs to open the same storage."""
    if isinstance(storage, LocalStorage):
        return storage.uri, {}
    return storage.uri, {"endpoint": storage.client.meta.endpoint_url, "addressing_style": "path"}


def _spawn(cfg: dict) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def _wait_for_line(proc: subprocess.Popen[str], expected: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == expected:
            return
        if line == "" and proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before {expected}: {proc.stderr.read()}")
    raise AssertionError(f"child did not print {expected} within {timeout_s}s")


def _kill(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("had_old_version", [False, True], ids=["new", "overwrite"])
def test_writer_killed_mid_write_leaves_no_partial_object(storage, had_old_version):
    key = "raw/00000/episode.bin"
    if had_old_version:
        storage.write_bytes(key, b"the complete old version")
    uri, options = _target(storage)
    # on S3, 7 MiB with 5 MiB parts: the multipart upload has started and sent a part
    cfg = {"uri": uri, "options": options, "mode": "write-and-hang", "key": key, "chunks": 7, "chunk": MiB}
    if isinstance(storage, S3Storage):
        cfg["part_size"] = 5 * MiB
    proc = _spawn(cfg)
    try:
        _wait_for_line(proc, "WROTE")
    finally:
        _kill(proc)

    if had_old_version:
        assert storage.read_bytes(key) == b"the complete old version"
        assert [i.key for i in storage.list()] == [key]
    else:
        assert not storage.exists(key)
        assert list(storage.list()) == []
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(key)

    # what the killed writer left behind is hidden: a temporary the cleanup finds, an
    # incomplete upload for the bucket's lifecycle rule
    if isinstance(storage, LocalStorage):
        leftovers = [p for p in (storage.root / "raw/00000").iterdir() if p.name != "episode.bin"]
        assert len(leftovers) == 1 and leftovers[0].stat().st_size >= MiB
        assert storage.remove_stale_temporaries(older_than_s=0) == 1
        assert [p.name for p in (storage.root / "raw/00000").iterdir()] == (["episode.bin"] if had_old_version else [])
    else:
        uploads = storage.client.list_multipart_uploads(Bucket=storage.bucket, Prefix=storage.prefix + "/").get("Uploads", [])
        assert [u["Key"] for u in uploads] == [f"{storage.prefix}/{key}"]
        for upload in uploads:  # what the bucket's lifecycle rule would do
            storage.client.abort_multipart_upload(Bucket=storage.bucket, Key=upload["Key"], UploadId=upload["UploadId"])


def _race(storage, tmp_path: Path, contenders: int, extra: dict | None = None) -> list[int]:
    uri, options = _target(storage)
    go = tmp_path / "go"
    procs = []
    try:
        for i in range(contenders):
            cfg = {"uri": uri, "options": options, "mode": "race", "key": "plan/download.json",
                   "data": f"contender-{i}", "go": str(go), **(extra or {})}
            procs.append(_spawn(cfg))
        for proc in procs:
            _wait_for_line(proc, "READY")
        go.write_text("go")  # every contender is poised: release them together
        outcomes = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            outcomes.append(json.loads(out.strip().splitlines()[-1])["won"])
    finally:
        for proc in procs:
            if proc.poll() is None:
                _kill(proc)
    winners = [i for i, won in enumerate(outcomes) if won]
    assert len(winners) == 1, outcomes
    assert storage.read_bytes("plan/download.json") == f"contender-{winners[0]}".encode()
    assert [i.key for i in storage.list()] == ["plan/download.json"]
    return winners


def test_write_if_absent_across_processes_has_exactly_one_winner(storage, tmp_path):
    _race(storage, tmp_path, contenders=6)


def test_claim_election_across_processes_has_exactly_one_winner(s3_storage, tmp_path):
    """The fallback for S3 servers that ignore conditional writes, under the same race."""
    _race(s3_storage, tmp_path, contenders=5, extra={"no_conditional": True, "settle": 1.5})


def test_bytes_reach_the_disk_before_their_final_name(tmp_path, monkeypatch):
    """After a node crash a final name must never point at bytes the page cache lost: the
    storage's writer and a download both sync the data before the rename."""
    from test_download_http import make_config, run

    from trajflow.download import transfer
    from trajflow.storage import local

    events: list[str] = []
    for module, name in ((local.os, "fsync"), (transfer.os, "fdatasync"), (local.os, "replace")):
        real = getattr(module, name)

        def record(*args, _real=real, _name=name):
            events.append(_name if _name != "replace" else f"replace {Path(args[1]).name}")
            return _real(*args)

        monkeypatch.setattr(module, name, record)  # (one os module: both patches see every call)
    with LocalStorage(tmp_path / "s").writer("k.bin") as fh:
        fh.write(b"data")
    assert events.index("fsync") < events.index("replace k.bin")

    events.clear()
    big = tmp_path / "src" / "big.bin"
    big.parent.mkdir()
    big.write_bytes(os.urandom(6 << 20))  # over the 5 MiB threshold: a resumable temporary, renamed
    config = make_config([{"type": "file", "name": "ds", "path": str(big.parent)}])
    assert run(tmp_path / "root", config).exit_code == 0
    assert events.index("fdatasync") < events.index("replace big.bin")
