"""Fixtures shared by every suite: the local control plane, an API client, a fresh namespace.

Module-level imports are stdlib + pytest only: the runtime suite (test/runtime) runs in its own venv
without the operator's dependencies.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from hack.localcluster import LocalCluster

SUITE_MARKERS = {"integration": "integration", "e2e": "e2e", "runtime": "runtime"}


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (CI cancelling, a parent shell exiting) must tear the control plane down like Ctrl-C does.
    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupt)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by the suite directory it lives in (test/<suite>/...)."""
    root = Path(__file__).resolve().parent
    for item in items:
        try:
            suite = Path(str(item.path)).resolve().relative_to(root).parts[0]
        except (ValueError, IndexError):
            continue
        if suite in SUITE_MARKERS:
            item.add_marker(getattr(pytest.mark, SUITE_MARKERS[suite]))


def local_cluster(profile: str) -> Iterator[LocalCluster]:
    """A started local cluster of ``profile`` (generator: stopped when resumed), for fixtures of any scope."""
    cluster = LocalCluster(profile=profile, keep_workdir=bool(os.environ.get("KAITO_KEEP_CLUSTER_DIR")))
    cluster.start(timeout=float(os.environ.get("KAITO_CLUSTER_START_TIMEOUT", "90")))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def control_plane() -> Iterator[LocalCluster]:
    """etcd + kube-apiserver (RBAC, admin token) for the whole test session."""
    yield from local_cluster("apiserver")


@pytest.fixture(scope="session")
def full_cluster() -> Iterator[LocalCluster]:
    """Plus controller-manager, scheduler and kwok, for the whole test session."""
    yield from local_cluster("full")


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> LocalCluster:
    """The plane this test's suite uses: the full cluster for e2e tests, the apiserver otherwise."""
    name = "full_cluster" if request.node.get_closest_marker("e2e") else "control_plane"
    plane: LocalCluster = request.getfixturevalue(name)
    return plane


@pytest.fixture
async def api_client(cluster: LocalCluster) -> AsyncIterator[Any]:
    """A kubernetes_asyncio ApiClient authenticated as the cluster admin."""
    from kubernetes_asyncio.client import ApiClient

    async with ApiClient(cluster.client_configuration()) as client:
        yield client


@pytest.fixture
async def namespace(
    cluster: LocalCluster, api_client: Any, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """A fresh namespace for one test, deleted afterwards (best effort)."""
    from kubernetes_asyncio.client import CoreV1Api

    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{base}-{secrets.token_hex(3)}"
    core = CoreV1Api(api_client)
    await core.create_namespace({"metadata": {"name": name, "labels": {"kaito.test/namespace": "true"}}})
    try:
        yield name
    finally:
        # Without a namespace controller (apiserver profile) it stays Terminating; names never repeat.
        try:
            await core.delete_namespace(name)
        except Exception as e:  # pragma: no cover - cleanup must not mask the test's own result
            print(f"namespace cleanup of {name} failed: {e}")
