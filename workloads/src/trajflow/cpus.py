"""How many CPUs this process may really use (a pod's CPU limit, not the node's core count)."""
from __future__ import annotations

import os


def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU limit."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(cpus, 1)
