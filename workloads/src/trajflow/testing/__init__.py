"""Helpers for tests and benchmarks: free ports, throw-away servers on 127.0.0.1, tool checks.

Nothing here is imported by the stages themselves; pytest is imported only inside the
helpers that need it, so benchmarks can use the servers without the test extra.
"""
from __future__ import annotations

import os
import shutil
import socket
from typing import Any

# Debian installs some daemons outside PATH for non-login shells
_EXTRA_TOOL_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin")


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


__all__ = ["free_port", "requires_tool", "tool_path"]
