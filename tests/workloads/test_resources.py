"""Pod budgets: the CPU budget follows the affinity mask and a cgroup v2 CPU limit (a pod's
resources.limits.cpu); the size limit of TMPDIR comes from the chart as a Kubernetes quantity."""
import io

import pytest

from trajflow import resources


@pytest.mark.parametrize("cpu_max, affinity, expected", [
    ("max 100000\n", 8, 8),            # no limit: every CPU of the mask
    ("400000 100000\n", 8, 4),         # limits.cpu: 4
    ("150000 100000\n", 8, 1),         # limits.cpu: 1500m rounds down
    ("50000 100000\n", 8, 1),          # limits.cpu: 500m still gets one
    ("800000 100000\n", 2, 2),         # a limit above the mask does not add CPUs
    ("garbage\n", 3, 3),               # unreadable limit: the mask
])
def test_cpu_budget(monkeypatch, cpu_max, affinity, expected):
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: set(range(affinity)))

    def fake_open(path, *args, **kwargs):
        if path != "/sys/fs/cgroup/cpu.max":
            raise FileNotFoundError(path)  # no cgroup v1 files beside v2's
        return io.StringIO(cpu_max)

    monkeypatch.setattr(resources, "open", fake_open, raising=False)
    assert resources.cpu_budget() == expected


def test_cpu_budget_without_cgroup_v2(monkeypatch):
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: {0, 1, 2})

    def missing(path, *args, **kwargs):
        raise FileNotFoundError(path)

    monkeypatch.setattr(resources, "open", missing, raising=False)
    assert resources.cpu_budget() == 3


@pytest.mark.parametrize("quota_us, expected", [("250000", 2), ("-1", 192), ("50000", 1)])
def test_cpu_budget_under_cgroup_v1(monkeypatch, quota_us, expected):
    """Nodes on older images (cgroup v1) give the limit as a CFS quota: 2.5 CPUs, none, 0.5."""
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: set(range(192)))
    files = {"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": quota_us + "\n", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}

    def v1_open(path, *args, **kwargs):
        if path not in files:
            raise FileNotFoundError(path)
        return io.StringIO(files[path])

    monkeypatch.setattr(resources, "open", v1_open, raising=False)
    assert resources.cpu_budget() == expected


@pytest.mark.parametrize("files, expected_gib", [
    ({"/sys/fs/cgroup/memory.max": "2147483648\n"}, 2),                        # limits.memory: 2Gi
    ({"/sys/fs/cgroup/memory.max": "max\n"}, 16),                              # no limit: the machine's
    ({"/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n"}, 16),  # v1 without a limit
    ({"/sys/fs/cgroup/memory/memory.limit_in_bytes": "4294967296\n"}, 4),      # v1 with one
    ({"/sys/fs/cgroup/memory.max": "68719476736\n"}, 16),                      # above the machine's
    ({}, 16),                                                                   # no cgroup files
])
def test_memory_limit_is_the_cgroups_capped_by_the_machine(monkeypatch, files, expected_gib):
    monkeypatch.setattr(resources.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 4 * 2**20}[name])

    def fake_open(path, *args, **kwargs):
        if path not in files:
            raise FileNotFoundError(path)
        return io.StringIO(files[path])

    monkeypatch.setattr(resources, "open", fake_open, raising=False)
    assert resources.memory_limit() == expected_gib * 2**30


@pytest.mark.parametrize("quantity, expected", [
    ("2Gi", 2 * 2**30), ("512Mi", 512 * 2**20), ("1.5Gi", 3 * 2**29), ("500M", 500 * 10**6), ("4096", 4096),
    ("1k", 1000), (" 3Ti ", 3 * 2**40), ("1e9", 10**9), ("2.147483648e+09", 2**31), ("+1E3", 1000),
    ("1E", 10**18), ("2000m", 2),
])
def test_parse_bytes(quantity, expected):
    assert resources.parse_bytes(quantity) == expected


@pytest.mark.parametrize("quantity", ["", "Gi", "2GB", "-1Gi", "1e", "1.5.0", "two"])
def test_parse_bytes_rejects_what_is_not_a_byte_quantity(quantity):
    with pytest.raises(ValueError, match="is not a byte quantity"):
        resources.parse_bytes(quantity)


def test_tmp_size_limit_from_the_chart_env():
    from trajflow.errors import ConfigError

    assert resources.tmp_size_limit({}) is None
    assert resources.tmp_size_limit({"TRAJFLOW_TMP_SIZE_LIMIT": "2Gi"}) == 2 * 2**30
    with pytest.raises(ConfigError, match="TRAJFLOW_TMP_SIZE_LIMIT: '2 gigs' is not a byte quantity"):
        resources.tmp_size_limit({"TRAJFLOW_TMP_SIZE_LIMIT": "2 gigs"})


def test_the_cli_raises_its_soft_open_files_limit_to_the_hard_one() -> None:
    """Each memory-mapped shard keeps a descriptor: systemd's soft 1024 stops a training over 1000 shards."""
    import resource
    import subprocess
    import sys

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)

    def lowered() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    script = ("import resource, sys; from trajflow.cli import main\n"
              "main(['schema']); print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          preexec_fn=lowered)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stderr.strip().splitlines()[-1]) == hard


@pytest.mark.parametrize("use_cuda", [False, True])
def test_each_training_rank_sizes_its_threads_by_its_share_of_the_pod(monkeypatch, use_cuda):
    # 8 ranks in a pod limited to 16 CPUs: 2 threads each, on GPU nodes too (torch would
    # otherwise size each rank's pool by the node's cores)
    import torch

    from trajflow.train import dist

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(dist, "cpu_budget", lambda: 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: use_cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    before = torch.get_num_threads()
    torch.set_num_threads(64)
    try:
        context = dist.DistContext(rank=3, world_size=1, local_rank=3, local_world_size=8)  # no process group
        context.setup("auto")
        assert torch.get_num_threads() == 2
        assert context.device == (torch.device("cuda", 3) if use_cuda else torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
