"""A throw-away Prometheus Pushgateway on 127.0.0.1 (Debian `prometheus-pushgateway`)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trajflow.testing import free_port, tool_path

BINARY = "prometheus-pushgateway"


class PushgatewayUnavailable(RuntimeError):
    """The binary is missing or the server did not come up."""


@dataclass
class Pushgateway:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, timeout_s: float = 30.0) -> "Pushgateway":
        binary = tool_path(BINARY) or tool_path("pushgateway")
        if binary is None:
            raise PushgatewayUnavailable(f"{BINARY} is not installed")
        port = free_port()
        log_path = Path(tempfile.mkstemp(prefix="trajflow-pushgateway-", suffix=".log")[1])
        with open(log_path, "ab") as log_fh:
            process = subprocess.Popen(
                [
                    binary,
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--web.enable-admin-api",
                    "--persistence.file=",  # keep nothing between runs (Debian's default persists)
                ],
                stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True,
            )
        server = cls(f"http://127.0.0.1:{port}", process, log_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                server.stop()
                raise PushgatewayUnavailable(f"{BINARY} exited with status {process.returncode}: {tail}")
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return server
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        server.stop()
        raise PushgatewayUnavailable(f"{BINARY} on {server.url} not ready after {timeout_s:.0f}s")

    def groups(self) -> list[dict[str, Any]]:
        """The pushed groups as the Pushgateway's API reports them."""
        with urllib.request.urlopen(f"{self.url}/api/v1/metrics", timeout=5) as resp:
            return list(json.load(resp)["data"])

    def metrics_text(self) -> str:
        """Everything the Pushgateway exposes to Prometheus (text format)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def wipe(self) -> None:
        """Delete every pushed group (admin API)."""
        req = urllib.request.Request(f"{self.url}/api/v1/admin/wipe", method="PUT")
        with urllib.request.urlopen(req, timeout=5):
            pass

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        with contextlib.suppress(OSError):
            self.log_path.unlink()

    def __enter__(self) -> "Pushgateway":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
