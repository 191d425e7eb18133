"""The seed's CPU quick starts on the real node: images, peers and the operator for one test namespace.

The cluster and its real node (containerd + kubelet + kube-proxy; hack/realnode.py) are the real-node
suite's (``../conftest.py``: one of each per module, skipped when not root). Here, per module: the tiny
preset and curl images built by ``hack/seed_images.py`` and loaded into the node's containerd under the
names the operator and the seed's command use; the dataset server and the authenticating TLS registry on
the node's bridge address; the node labelled as a CPU VM with the label the workspaces select. Per test:
a namespace whose pods tolerate the real node's taint, and the workspace controller (+ provisioner) as
processes for it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hack import seed_images
from hack.localcluster import LocalCluster
from hack.realnode import NODE_IP, TOLERATION, RealNode
from kaito.presets.registry import default_registry
from test.e2e.realnode.seed.seedbed import (
    CPUTarget,
    DatasetServer,
    SeedRegistry,
    start_seed_registry,
    write_dataset,
)
from test.e2e.workspace.conftest import Operator, install_crds

# The images' registry as the operator names preset images (--image-registry); they are loaded into
# containerd under these names, so nothing is ever pulled from a registry.
PRESET_REGISTRY = "localhost/kaito-py"
TINY_PRESET = "tiny-llama"
# A CPU size the catalog knows: 2 vCPUs like the real node, so a pod asks for half of what the node can
# give (700m of 1400m) and a rolling update's surge pod fits next to the serving one.
CPU_INSTANCE_TYPE = "Standard_D2s_v3"
SEED_LABEL = ("apps", "kaito-seed-cpu")
# PodTolerationRestriction (enabled by hack/localcluster.py): tolerations every pod of the namespace gets.
DEFAULT_TOLERATIONS = "scheduler.alpha.kubernetes.io/defaultTolerations"


@dataclass(frozen=True)
class SeedImages:
    """References of the images on the real node."""

    tiny_preset: str  # as the operator names it: <PRESET_REGISTRY>/kaito-tiny-llama:<tag>
    curl: str


@pytest.fixture(scope="module")
def seed_images_loaded(real_node: RealNode) -> SeedImages:
    """Build (or find, by content) the tiny preset and curl images, and load them into the node."""
    t0 = time.monotonic()
    refs = seed_images.build(["tiny-preset", "curl"])
    preset_ref = default_registry().get(TINY_PRESET).image_ref(PRESET_REGISTRY)
    real_node.load(refs["tiny-preset"], [preset_ref])
    real_node.load(refs["curl"])
    print(f"seed images on the node in {time.monotonic() - t0:.1f}s: {refs}")
    return SeedImages(tiny_preset=preset_ref, curl=refs["curl"])


@pytest.fixture(scope="module")
def cpu_target(real_node: RealNode) -> CPUTarget:
    """The real node labelled as a CPU VM of :data:`CPU_INSTANCE_TYPE` that the seed workspaces select."""
    real_node.cluster.kubectl(
        "label", "node", real_node.name, "--overwrite",
        f"node.kubernetes.io/instance-type={CPU_INSTANCE_TYPE}", f"{SEED_LABEL[0]}={SEED_LABEL[1]}",
    )  # fmt: skip
    return CPUTarget(real_node.name, CPU_INSTANCE_TYPE, SEED_LABEL, TINY_PRESET)


@pytest.fixture(scope="module")
def dataset_server(real_node: RealNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatasetServer]:
    """The parquet dataset the tuning workspaces download, served on the node's bridge address."""
    root = tmp_path_factory.mktemp("datasets")
    write_dataset(root / "train.parquet")
    server = DatasetServer(root, NODE_IP)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def seed_registry(real_node: RealNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeedRegistry]:
    """docker-registry with htpasswd auth over TLS on the node's bridge address."""
    ca = seed_images.test_ca()
    workdir = tmp_path_factory.mktemp("seed-registry")
    cert, key = ca.issue(workdir / "tls", [NODE_IP])
    registry = start_seed_registry(workdir, NODE_IP, (cert, key, ca.cert))
    yield registry
    registry.registry.stop()


@pytest.fixture
def seed_namespace(node_cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace whose pods tolerate the real node's taint by default.

    PodTolerationRestriction's namespace annotation (the plugin is on in hack/localcluster.py): the
    workspaces' pods and the seed's ``kubectl run ... curl`` land on the real node as a user's would on
    an untainted CPU node, their manifests unchanged.
    """
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"s-{base}-{secrets.token_hex(3)}"
    node_cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "annotations": {DEFAULT_TOLERATIONS: json.dumps([TOLERATION])}},
        }
    )
    yield name
    node_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
async def seed_operator(
    node_cluster: LocalCluster,
    seed_images_loaded: SeedImages,
    seed_namespace: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Operator]:
    """Controller (webhook, tuning on) + provisioner for the test's namespace, naming preset images as
    they are loaded on the node. The CRDs are installed once per cluster."""
    install_crds(node_cluster)
    op = Operator(node_cluster, seed_namespace, tmp_path)
    op.install_webhooks()
    try:
        ctrl = op.start_controller("--enable-tuning", "--image-registry", PRESET_REGISTRY)
        prov = op.start_provisioner()
        await op.ready(ctrl)
        await op.ready(prov)
        yield op
    finally:
        failed = getattr(request.node, "rep_call", None)
        op.cluster.kubectl(
            "delete", "workspaces", "--all", "-n", seed_namespace, "--timeout=120s", check=False, timeout=150
        )
        op.remove_webhooks()
        if os.environ.get("KAITO_SHOW_LOGS") or (failed is not None and failed.failed):
            print(op.dump())
        op.stop_all()
