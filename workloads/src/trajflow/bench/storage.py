"""Storage throughput through trajflow's own interface, for `file://` and for S3 on a
SeaweedFS started here on 127.0.0.1.

Large objects: streaming atomic writes (`writer`, fsync + rename locally, multipart on
S3) and whole-object reads, in MB/s. Small objects: `write_bytes` and `read_bytes`,
in objects/s. Local reads come from the page cache right after writing: they show the
interface's overhead, not the disk. SeaweedFS runs on the same machine, so its figures
are loopback figures: the cost of the S3 path, not of a network.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from typing import Any, Callable

from trajflow.storage import LocalStorage, Storage

MB = 1_000_000
MiB = 1024 * 1024


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _measure(storage: Storage, large_count: int, large_size: int, small_count: int, small_size: int,
             chunk: int, rounds: int) -> dict[str, Any]:
    block = os.urandom(chunk)
    small = os.urandom(small_size)
    best: dict[str, float] = {}

    def keep_best(name: str, value: float) -> None:
        best[name] = max(best.get(name, 0.0), value)

    for round_no in range(rounds):
        prefix = f"bench-{round_no}-{uuid.uuid4().hex[:8]}"
        large_keys = [f"{prefix}/large/{i:04d}.bin" for i in range(large_count)]

        def write_large() -> None:
            for key in large_keys:
                with storage.writer(key) as fh:
                    written = 0
                    while written < large_size:
                        piece = block[: min(chunk, large_size - written)]
                        fh.write(piece)
                        written += len(piece)

        def read_large() -> None:
            for key in large_keys:
                with storage.open_read(key) as fh:
                    while fh.read(chunk):
                        pass

        small_keys = [f"{prefix}/small/{i:05d}.bin" for i in range(small_count)]

        def write_small() -> None:
            for key in small_keys:
                storage.write_bytes(key, small)

        def read_small() -> None:
            for key in small_keys:
                storage.read_bytes(key)

        total = large_count * large_size
        keep_best("large_write_MBps", total / MB / _timed(write_large))
        keep_best("large_read_MBps", total / MB / _timed(read_large))
        keep_best("small_write_per_s", small_count / _timed(write_small))
        keep_best("small_read_per_s", small_count / _timed(read_small))
        listed = sum(1 for _ in storage.list(f"{prefix}/"))
        if listed != large_count + small_count:
            raise RuntimeError(f"listed {listed} objects under {prefix}/, wrote {large_count + small_count}")
        for key in large_keys + small_keys:
            storage.delete(key)
    return {name: round(value, 1) for name, value in best.items()}


def run(quick: bool = False) -> tuple[dict[str, Any], str]:
    params = {
        "large_count": 2 if quick else 4,
        "large_size": (16 if quick else 64) * MiB,
        "small_count": 50 if quick else 300,
        "small_size": 256 * 1024,
        "chunk": 8 * MiB,
        "rounds": 1 if quick else 3,
    }
    results: dict[str, Any] = {"params": params, "backends": {}}

    workdir = tempfile.mkdtemp(prefix="trajflow-bench-storage-")
    try:
        local_root = os.path.join(workdir, "file-root")
        results["backends"]["file"] = {
            "where": f"{local_root} ({_filesystem_type(workdir)})",
            **_measure(LocalStorage(local_root), **params),
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    from trajflow.testing.seaweed import SeaweedS3, SeaweedUnavailable

    try:
        server = SeaweedS3.start(volume_size_mb=1024)
    except SeaweedUnavailable as exc:
        results["backends"]["s3-seaweedfs"] = {"skipped": str(exc).splitlines()[0]}
    else:
        try:
            from trajflow.storage.s3 import S3Storage

            bucket = server.make_bucket("bench")
            store = S3Storage(f"s3://{bucket}/bench", client=server.client())
            results["backends"]["s3-seaweedfs"] = {
                "where": f"SeaweedFS `weed mini` on {server.endpoint} (same machine, part size {store.part_size // MiB} MiB)",
                **_measure(store, **params),
            }
        finally:
            server.stop()
    return results, _markdown(results)


def _filesystem_type(path: str) -> str:
    try:
        best, fstype = "", "unknown filesystem"
        real = os.path.realpath(path)
        with open("/proc/mounts") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) >= 3 and real.startswith(fields[1]) and len(fields[1]) > len(best):
                    best, fstype = fields[1], fields[2]
        return fstype
    except OSError:
        return "unknown filesystem"


def _markdown(results: dict[str, Any]) -> str:
    p = results["params"]
    lines = [
        "Storage throughput through `trajflow.storage` (best of "
        f"{p['rounds']} round(s)): {p['large_count']} objects of {p['large_size'] // MiB} MiB streamed in "
        f"{p['chunk'] // MiB} MiB chunks, and {p['small_count']} objects of {p['small_size'] // 1024} KiB.",
        "",
        "| backend | large write MB/s | large read MB/s | small writes/s | small reads/s | where |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in results["backends"].items():
        if "skipped" in r:
            lines.append(f"| {name} | - | - | - | - | skipped: {r['skipped']} |")
            continue
        lines.append(
            f"| {name} | {r['large_write_MBps']} | {r['large_read_MBps']} | {r['small_write_per_s']} | "
            f"{r['small_read_per_s']} | {r['where']} |"
        )
    lines += [
        "",
        "Local writes include fsync of the file and its directory; local reads come from the page cache. "
        "SeaweedFS shares the machine's cores with the client, so S3 figures are a floor for a real endpoint's "
        "per-connection cost, not its bandwidth.",
    ]
    return "\n".join(lines)
