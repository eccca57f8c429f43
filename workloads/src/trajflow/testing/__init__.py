"""Helpers for tests and benchmarks: free ports, throw-away servers on 127.0.0.1, tool checks.

Nothing here is imported by the stages themselves; pytest is imported only inside the
helpers that need it, so benchmarks can use the servers without the test extra.
"""
from __future__ import annotations

import os
import random
import shutil
import socket
from typing import Any

# Debian installs some daemons outside PATH for non-login shells
_EXTRA_TOOL_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin")


# Throw-away servers' ports lie below the kernel's range for outgoing connections (from
# 32768 on Linux), which could otherwise take one between its check and the server's bind,
# and apart from SeaweedFS's (testing.seaweed).
_SERVER_PORTS = range(10000, 15000)


def bindable(port: int) -> bool:
    """Whether a TCP server could listen on 127.0.0.1:`port` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(count: int = 1) -> int:
    """A TCP port p free on 127.0.0.1 right now, with p + 1 ... p + count - 1 free too."""
    rng = random.SystemRandom()  # not the `random` state a test (or hypothesis) may have seeded
    for _ in range(2000):
        port = rng.randrange(_SERVER_PORTS.start, _SERVER_PORTS.stop - count + 1)
        if all(bindable(port + i) for i in range(count)):
            return port
    raise RuntimeError(f"no {count} free port(s) on 127.0.0.1 in {_SERVER_PORTS.start}-{_SERVER_PORTS.stop - 1}")


def tool_path(name: str) -> str | None:
    """Absolute path of an executable on PATH or in the usual system directories."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _EXTRA_TOOL_DIRS:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def requires_tool(*names: str, why: str = "") -> Any:
    """`@requires_tool("promtool")`: skip unless every tool is installed, naming what is missing."""
    import pytest

    missing = [n for n in names if tool_path(n) is None]
    hint = why or "run `bash ci/scripts/install-test-tools.sh` as root to install it"
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed; {hint}")


__all__ = ["bindable", "free_port", "requires_tool", "tool_path"]
