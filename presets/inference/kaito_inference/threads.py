"""torch's CPU thread budget from the container's CPU limit.

torch sizes its intra-op pool by the host's cores, not the pod's CPU limit: a pod limited to 2 CPUs on a
64-core node starts 64 OpenMP threads that the CFS quota then throttles, and throughput collapses. The
default of ``--torch_threads`` is the cgroup limit (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``), rounded up, capped by the CPUs this process may run on.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _quota_v2(root: Path) -> float | None:
    try:
        fields = (root / "cpu.max").read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota_v1(root: Path) -> float | None:
    for base in (root / "cpu,cpuacct", root / "cpu", root / "cpuacct,cpu"):
        try:
            quota = int((base / "cpu.cfs_quota_us").read_text().strip())
            period = int((base / "cpu.cfs_period_us").read_text().strip())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The container's CPU limit in CPUs (e.g. 1.5), or None when it has none."""
    limit = _quota_v2(root)
    return limit if limit is not None else _quota_v1(root)


def available_cpus() -> int:
    """CPUs this process may be scheduled on (its affinity mask, else the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_torch_threads(root: Path = CGROUP_ROOT) -> int:
    """Intra-op threads for torch: the cgroup CPU limit rounded up, at most the usable CPUs, at least 1."""
    cpus = available_cpus()
    limit = cgroup_cpu_limit(root)
    if limit is None:
        return cpus
    return max(1, min(cpus, math.ceil(limit)))
