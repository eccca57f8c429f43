"""What this process may really use: a pod's limits, not the node's capacity."""
from __future__ import annotations

import os
import re

# TMPDIR's size limit as the chart sets it (preprocessing.tmp.sizeLimit, a Kubernetes quantity)
TMP_SIZE_LIMIT_ENV = "TRAJFLOW_TMP_SIZE_LIMIT"

# Kubernetes' quantity grammar: a number, then a binary or decimal suffix or an exponent
# ("2Gi", "500M", "1e9", "2.147483648e+09" as Helm prints a large number)
_QUANTITY = re.compile(r"^\s*\+?([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E))?\s*$")
_SUFFIX = {
    None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "m": 1e-3, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}


def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup's CPU limit (v2's
    cpu.max, or v1's CFS quota, which nodes on older images still have)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, int(limit)))
    return max(cpus, 1)


def _cgroup_cpu_limit() -> float | None:
    """The CPU limit of this process's cgroup (quota / period); None without one."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as fh:
            quota_us = int(fh.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as fh:
            period_us = int(fh.read())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us  # -1: no quota
    except (OSError, ValueError):
        return None


def memory_limit() -> int | None:
    """Bytes this process may use: its cgroup's memory limit (v2's memory.max, or v1's
    memory.limit_in_bytes), capped by the machine's memory; None when neither is known."""
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                raw = fh.read().strip()
        except OSError:
            continue
        if raw.isdigit():  # "max": none (v1 writes a huge number instead, which the cap below takes)
            limits.append(int(raw))
        break
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        pass
    return min(limits) if limits else None


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; returns the soft
    limit now. Runtimes that leave systemd's 1024 as the soft limit stop a training over
    1000 shards (each memory-mapped shard keeps a descriptor) with EMFILE."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft
    # an unlimited hard limit (macOS) is no soft limit the kernel takes; its OPEN_MAX (10240) is
    for target in (hard, 10240):
        if target != resource.RLIM_INFINITY and target <= soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft


def parse_quantity(quantity: str | float) -> float:
    """A Kubernetes quantity ("2Gi", "500m", "1e9", 2) as a number of its units."""
    m = _QUANTITY.match(str(quantity))
    if m is None:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity such as 500m, 512Mi or 2Gi")
    number, exponent, suffix = m.groups()
    return float(number + exponent) if exponent else float(number) * _SUFFIX[suffix]


def parse_bytes(quantity: str) -> int:
    """A Kubernetes quantity of bytes ("2Gi", "500M", "1e9") as a whole number of bytes."""
    try:
        return int(parse_quantity(quantity))
    except ValueError:
        raise ValueError(f"{quantity!r} is not a byte quantity such as 512Mi or 2Gi") from None


def human_bytes(n: float) -> str:
    """A byte count as people read it ("3.0 GiB", "12 B")."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def tmp_size_limit(env: dict[str, str] | None = None) -> int | None:
    """The size limit of TMPDIR in bytes where the chart set one (an emptyDir's sizeLimit:
    the kubelet evicts the pod beyond it, so writers must stop short of it); None: unknown."""
    raw = (os.environ if env is None else env).get(TMP_SIZE_LIMIT_ENV, "").strip()
    if not raw:
        return None
    try:
        return parse_bytes(raw)
    except ValueError as exc:
        from trajflow.errors import ConfigError

        raise ConfigError(f"{TMP_SIZE_LIMIT_ENV}: {exc}") from None
