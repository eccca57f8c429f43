"""Downloader benchmark (`trajflow bench download`).

1. Throughput against boto3's TransferManager (s3transfer): the same objects from the same
   SeaweedFS (on 127.0.0.1), the same concurrency, part size and multipart threshold, into
   a fresh local directory each run, alternating the two so load on the machine hits both
   alike. The downloader verifies as it goes (sha256 always; the objects are single-part
   uploads, so their ETags are MD5s and are checked too); s3transfer checks nothing beyond
   what botocore does by default. Reported: median wall time of each, and the ratio of
   throughputs (downloader / s3transfer).
2. Resume: one large object fetched by `trajflow download` through a byte-counting TCP
   relay; the process is SIGKILLed once half the object has crossed the relay, then run
   again. Reported: bytes that crossed the relay twice (re-transferred), i.e. all bytes
   relayed minus the object size (HTTP headers included, a few KiB).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20


def _dataset(quick: bool) -> dict[str, int]:
    if quick:
        sizes = {f"data/large-{i}.bin": 48 * MiB + i for i in range(3)}
        sizes.update({f"data/small/s{i:03d}.bin": 256 * 1024 + 17 * i for i in range(48)})
    else:
        sizes = {f"data/large-{i}.bin": 96 * MiB + i for i in range(6)}
        sizes.update({f"data/small/s{i:03d}.bin": 512 * 1024 + 17 * i for i in range(192)})
    return sizes


def _upload(client: Any, bucket: str, sizes: dict[str, int]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def put(item: tuple[str, int]) -> None:
        key, size = item
        client.put_object(Bucket=bucket, Key=key, Body=os.urandom(size))  # one PUT: the ETag is the MD5

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(put, sizes.items()))


def _run_s3transfer(server: Any, bucket: str, dest: Path, concurrency: int, part: int, threshold: int) -> float:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
    from s3transfer.manager import TransferManager

    # timed from the client's creation, as the downloader's run creates its own
    start = time.perf_counter()
    client = boto3.session.Session().client(
        "s3", endpoint_url=server.endpoint, region_name=server.region,
        aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
        # a pool large enough that s3transfer never has to drop and reopen connections
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=4 * concurrency),
    )
    config = TransferConfig(multipart_threshold=threshold, multipart_chunksize=part, max_concurrency=concurrency,
                            use_threads=True)
    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="data/")
            for obj in page.get("Contents", [])]
    with TransferManager(client, config) as manager:
        futures = []
        for key in keys:
            path = dest / key
            path.parent.mkdir(parents=True, exist_ok=True)
            futures.append(manager.download(bucket, key, str(path)))
        for future in futures:
            future.result()
    return time.perf_counter() - start


def _run_trajflow(server: Any, bucket: str, dest: Path, concurrency: int, part: int, threshold: int) -> tuple[float, Any]:
    from trajflow.config.download import DownloadConfig
    from trajflow.download.shard import ShardDownloader
    from trajflow.storage import LocalStorage

    config = DownloadConfig.model_validate({
        "sources": [{"type": "s3", "name": "data", "url": f"s3://{bucket}/data", "endpoint": server.endpoint,
                     "region": server.region}],
        "concurrency": concurrency, "partSizeMib": part // MiB, "multipartThresholdMib": threshold // MiB,
    })
    start = time.perf_counter()
    summary = ShardDownloader(LocalStorage(dest), config, 0, 1).run()
    elapsed = time.perf_counter() - start
    if summary.exit_code != 0:
        raise RuntimeError(f"the downloader failed: {[r.error for r in summary.failed][:3]}")
    return elapsed, summary


class CountingRelay:
    """A TCP relay on 127.0.0.1 that counts the bytes flowing from the target to clients."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.downstream_bytes = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
                if count:
                    with self._lock:
                        self.downstream_bytes += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._stop = True
        self._sock.close()


def _resume(server: Any, work: Path, size: int) -> dict[str, Any]:
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    client = server.client()
    bucket = server.make_bucket("resume")
    client.put_object(Bucket=bucket, Key="big/object.bin", Body=os.urandom(size))
    relay = CountingRelay(int(server.endpoint.rsplit(":", 1)[1]))
    try:
        doc = {
            "global": {"runId": "resume", "storage": {"type": "filesystem", "filesystem": {"path": str(work / "root")}}},
            "config": {
                "sources": [{"type": "s3", "name": "big", "url": f"s3://{bucket}/big",
                             "endpoint": f"http://127.0.0.1:{relay.port}", "region": server.region}],
                "concurrency": 8, "partSizeMib": 16, "multipartThresholdMib": 32,
            },
        }
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump(doc))
        env = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
               "TRAJFLOW_LOG_FORMAT": "json", "JOB_COMPLETION_INDEX": "0", "TRAJFLOW_SHARDS": "1"}
        command = [sys.executable, "-m", "trajflow.cli", "download", "--config", str(config)]
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while relay.downstream_bytes < size // 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        at_kill = relay.downstream_bytes
        if proc.poll() is not None:
            raise RuntimeError("the download finished before it could be killed at 50%")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        journal = next((work / "root" / "resume" / "raw" / "00000" / "big").glob(".trajflow-tmp-dlj-*"), None)
        durable = 0
        if journal is not None:
            for line in journal.read_text().splitlines()[1:]:
                a, _, b = line.partition(" ")
                if a.isdigit() and b.isdigit():
                    durable += int(b) - int(a)
        summary_path = work / "summary.json"
        rerun = subprocess.run([*command, "--summary-json", str(summary_path)], env=env, stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=600)
        if rerun.returncode != 0:
            raise RuntimeError(f"the resumed download failed: {rerun.stderr.decode()[-500:]}")
        summary = json.loads(summary_path.read_text())
        relayed = relay.downstream_bytes
    finally:
        relay.close()
    return {
        "object_bytes": size,
        "relayed_at_kill": at_kill,
        "journaled_at_kill": durable,
        "rerun_bytes_received": summary["bytes_received"],
        "relayed_total": relayed,
        "retransferred_bytes": max(relayed - size, 0),
        "retransferred_fraction": round(max(relayed - size, 0) / size, 4),
    }


def run(quick: bool = False) -> tuple[dict[str, Any], str]:
    from trajflow.testing.seaweed import SeaweedS3

    concurrency, part, threshold = 8, 16 * MiB, 32 * MiB
    load_before = [round(x, 2) for x in os.getloadavg()]  # other work on the machine skews both sides
    repeats = 2 if quick else 3
    sizes = _dataset(quick)
    total = sum(sizes.values())
    work = Path(tempfile.mkdtemp(prefix="trajflow-bench-download-"))
    saved_env = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    try:
        with SeaweedS3.start() as server:
            # the downloader's S3 source uses the standard credential chain
            os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = server.access_key, server.secret_key
            bucket = server.make_bucket("bench")
            _upload(server.client(), bucket, sizes)
            ours, theirs = [], []
            for i in range(repeats):
                # alternate, and start with the baseline on even repeats, so order effects cancel
                for which in (("s3transfer", "trajflow") if i % 2 == 0 else ("trajflow", "s3transfer")):
                    dest = work / f"{which}-{i}"
                    if which == "s3transfer":
                        theirs.append(_run_s3transfer(server, bucket, dest, concurrency, part, threshold))
                    else:
                        elapsed, summary = _run_trajflow(server, bucket, dest, concurrency, part, threshold)
                        ours.append(elapsed)
                        checks = sorted({c for r in summary.results for c in (r.record.checks if r.record else [])})
                    shutil.rmtree(dest, ignore_errors=True)
            resume = _resume(server, work / "resume", (256 if not quick else 96) * MiB)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
    result = {
        "load_average_at_start": load_before,
        "objects": len(sizes),
        "bytes": total,
        "concurrency": concurrency,
        "part_size": part,
        "multipart_threshold": threshold,
        "repeats": repeats,
        "trajflow_seconds": [round(t, 3) for t in ours],
        "s3transfer_seconds": [round(t, 3) for t in theirs],
        "trajflow_mib_per_s": round(total / MiB / t_ours, 1),
        "s3transfer_mib_per_s": round(total / MiB / t_theirs, 1),
        "throughput_ratio": round(t_theirs / t_ours, 3),
        "trajflow_checks": checks,
        "resume": resume,
        "quick": quick,
    }
    md = f"""Downloader vs boto3 TransferManager (s3transfer {_version('s3transfer')}), same SeaweedFS on 127.0.0.1,
{len(sizes)} objects, {total / MiB:.0f} MiB, concurrency {concurrency}, parts {part // MiB} MiB, threshold {threshold // MiB} MiB,
median of {repeats} alternating runs into a fresh local directory, client creation included on both sides
(load average when it started: {', '.join(map(str, load_before))}).

| | median s | MiB/s | runs (s) |
|---|---|---|---|
| trajflow download (sha256 computed and recorded; checked: {', '.join(checks)}) | {t_ours:.2f} | {result['trajflow_mib_per_s']} | {', '.join(f'{t:.2f}' for t in ours)} |
| s3transfer TransferManager | {t_theirs:.2f} | {result['s3transfer_mib_per_s']} | {', '.join(f'{t:.2f}' for t in theirs)} |

**Throughput ratio (trajflow / s3transfer): {result['throughput_ratio']}x** (goal: at least 1.0x with verification on).

Resume: a {resume['object_bytes'] // MiB} MiB object in {resume['object_bytes'] // part} parts, SIGKILL once
{resume['relayed_at_kill'] / MiB:.1f} MiB had crossed the relay (50%); the journal kept
{resume['journaled_at_kill'] / MiB:.1f} MiB and the rerun fetched {resume['rerun_bytes_received'] / MiB:.1f} MiB (the rest).
Bytes re-transferred: **{resume['retransferred_bytes'] / MiB:.2f} MiB ({100 * resume['retransferred_fraction']:.1f}% of the
object)**, HTTP headers included. They are what was in flight when the process died: at most 1 MiB per stream not
yet journaled, the rest in TCP buffers (socket buffers on loopback grow to several MiB per connection).
"""
    return result, md


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # pragma: no cover
        return "?"
