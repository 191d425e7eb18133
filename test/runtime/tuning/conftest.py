"""Fixtures for the tuning program and OCI push/pull tests (tiny model fixtures come from ../conftest.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The trainer is not an installed package (the image copies it to /workspace/tfs); the OCI tool is
# imported as presets.oci from the repository root, as `python -m presets.oci` runs it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "presets" / "tuning"))
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from registry_support import PASSWORD, USER, Registry, registry_available, start_registry


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An anonymous registry on loopback."""
    if not registry_available():
        pytest.fail(
            "docker-registry is not installed: apt-get install -y --no-install-recommends docker-registry"
        )
    running = start_registry(tmp_path_factory.mktemp("registry"))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry with htpasswd basic auth (user ``USER``, password ``PASSWORD``)."""
    if not registry_available():
        pytest.fail(
            "docker-registry is not installed: apt-get install -y --no-install-recommends docker-registry"
        )
    running = start_registry(tmp_path_factory.mktemp("auth-registry"), users={USER: PASSWORD})
    yield running
    running.stop()
