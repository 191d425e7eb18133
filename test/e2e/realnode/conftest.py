"""A full local cluster with a real node (hack/realnode.py) and the project's images (hack/images.py).

Each module gets a cluster of its own: what it installs (cluster-wide admission webhooks, the
kaito-system controllers, Helm releases) must not meet the other suites' shared cluster. Only one real
node can exist on a machine; its lock makes a second start wait, and module scope ends one node before
the next module starts its own.

Skipped only when not root (containerd, runc, the bridge and netfilter rules need it); in CI (root)
these tests run, building what they need first.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from hack import images
from hack.localcluster import LocalCluster
from hack.realnode import MACHINE_LOCK, RealNode, unmet_requirements
from test.conftest import local_cluster


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = unmet_requirements()
    if reason:
        here = os.path.dirname(__file__)
        for item in items:
            if str(item.path).startswith(here):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def project_images() -> dict[str, str]:
    """The base, controller and provisioner images (built once, content-tagged: cached when unchanged)."""
    subprocess.run(["bash", "hack/install-node-deps.sh"], check=True, cwd=images.REPO_ROOT)
    t0 = time.monotonic()
    refs = images.build(["pause", "base", "controller", "provisioner"])
    print(f"images ready in {time.monotonic() - t0:.1f}s: {refs}")
    return refs


@pytest.fixture(scope="session")
def machine_lock() -> Iterator[None]:
    """The machine-wide real-node lock for the whole session, so no other run's node slips in between
    two modules' nodes (another run waits; so does this one, for a run already holding it)."""
    with MACHINE_LOCK.held():
        yield


@pytest.fixture(scope="module")
def node_cluster(machine_lock: None) -> Iterator[LocalCluster]:
    """A full cluster of this module's own."""
    yield from local_cluster("full")


@pytest.fixture(scope="module")
def real_node(node_cluster: LocalCluster, project_images: dict[str, str]) -> Iterator[RealNode]:
    """The real node joined to the module's cluster, with the project's images loaded."""
    node = RealNode(node_cluster)
    t0 = time.monotonic()
    node.start()
    for name in ("base", "controller", "provisioner"):
        node.load(project_images[name])
    print(f"real node Ready with images in {time.monotonic() - t0:.1f}s")
    try:
        yield node
    finally:
        node.stop()
