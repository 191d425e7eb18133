"""The CPU thread budget: torch threads follow the container's cgroup CPU limit (v2 and v1 layouts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kaito_inference.config import ConfigError, parse_args
from kaito_inference.threads import available_cpus, cgroup_cpu_limit, default_torch_threads

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(30)]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit(tmp_path: Path) -> None:
    write(tmp_path / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    assert default_torch_threads(tmp_path) == min(2, available_cpus())


def test_cgroup_v2_unlimited_falls_back_to_affinity(tmp_path: Path) -> None:
    write(tmp_path / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert default_torch_threads(tmp_path) == len(os.sched_getaffinity(0))


def test_cgroup_v1_limit(tmp_path: Path) -> None:
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "50000\n")
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path) == 0.5
    assert default_torch_threads(tmp_path) == 1  # rounded up, never 0


def test_cgroup_v1_unlimited_and_missing(tmp_path: Path) -> None:
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert cgroup_cpu_limit(tmp_path / "nothing-here") is None


def test_limit_above_the_cpus_is_capped(tmp_path: Path) -> None:
    write(tmp_path / "cpu.max", "6400000 100000\n")  # 64 CPUs
    assert default_torch_threads(tmp_path) == available_cpus()


def test_torch_threads_flag() -> None:
    assert parse_args(["--torch_threads=3"], environ={}).torch_threads == 3
    assert parse_args([], environ={}).torch_threads is None
    with pytest.raises(ConfigError, match="torch_threads"):
        parse_args(["--torch_threads=0"], environ={})


def test_load_model_applies_the_thread_budget(tiny_model_dir: Path) -> None:
    import torch
    from kaito_inference.engine import load_model
    from runtime_support import make_config

    before = torch.get_num_threads()
    try:
        load_model(make_config(tiny_model_dir, torch_threads=2))
        assert torch.get_num_threads() == 2
        load_model(make_config(tiny_model_dir, torch_threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
