"""The CPU budget follows the affinity mask and a cgroup v2 CPU limit (a pod's resources.limits.cpu)."""
import io

import pytest

from trajflow import cpus


@pytest.mark.parametrize("cpu_max, affinity, expected", [
    ("max 100000\n", 8, 8),            # no limit: every CPU of the mask
    ("400000 100000\n", 8, 4),         # limits.cpu: 4
    ("150000 100000\n", 8, 1),         # limits.cpu: 1500m rounds down
    ("50000 100000\n", 8, 1),          # limits.cpu: 500m still gets one
    ("800000 100000\n", 2, 2),         # a limit above the mask does not add CPUs
    ("garbage\n", 3, 3),               # unreadable limit: the mask
])
def test_cpu_budget(monkeypatch, cpu_max, affinity, expected):
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(affinity)))

    def fake_open(path, *args, **kwargs):
        assert path == "/sys/fs/cgroup/cpu.max"
        return io.StringIO(cpu_max)

    monkeypatch.setattr(cpus, "open", fake_open, raising=False)
    assert cpus.cpu_budget() == expected


def test_cpu_budget_without_cgroup_v2(monkeypatch):
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 1, 2})

    def missing(path, *args, **kwargs):
        raise FileNotFoundError(path)

    monkeypatch.setattr(cpus, "open", missing, raising=False)
    assert cpus.cpu_budget() == 3
