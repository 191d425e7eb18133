"""Bad input on the seed's CPU quick starts gets a clear answer and loses nothing: refused at admission
with the fix, or a typed reason in the workspace's status and an Event, within a deadline (never a
silent hang). Real pods on the real node; real dataset server and registry."""

from __future__ import annotations

import json
import urllib.error
from typing import Any

import pytest

from kaito.api.quantity import to_gib
from kaito.presets.cpu import cpu_memory_needed_gib
from kaito.presets.registry import default_registry
from test.e2e.realnode.seed.seedbed import (
    CPUTarget,
    DatasetServer,
    SeedRegistry,
    conditions,
    events_for,
    kget,
    sample,
)
from test.e2e.realnode.seed.test_seed_tuning_adapters import registry_manifest
from test.e2e.workspace.conftest import Operator
from test.waiting import eventually

# The module's first test also waits for its cluster, its real node and the images (built once per
# machine, ~10 min; then cached by content).
pytestmark = pytest.mark.timeout(1800)

BYPASS = "kaito.sh/bypass-resource-checks"


def apply(op: Operator, doc: dict[str, Any], check: bool = True) -> Any:
    return op.cluster.kubectl("apply", "-n", op.namespace, "-f", "-", input=json.dumps(doc), check=check)


async def failed_with(
    op: Operator, name: str, reason: str, words: str, timeout: float = 240
) -> dict[str, Any]:
    """Wait until the workspace's status carries ``reason`` (status.reason or a condition's) and a
    Warning Event about it says ``words`` (the problem in the program's or the scheduler's words)."""

    async def check() -> Any:
        ws = kget(op.cluster, "workspace", name, "-n", op.namespace)
        assert all(p.healthy() for p in op.procs), op.dump()
        status = (ws or {}).get("status") or {}
        reasons = {status.get("reason")} | {c.get("reason") for c in status.get("conditions") or []}
        if reason not in reasons:
            return None
        warned = [
            e
            for e in events_for(op.cluster, op.namespace, name)
            if e.get("type") == "Warning" and words in f"{e.get('reason')} {e.get('message')}"
        ]
        return ws if warned else None

    result: dict[str, Any] = await eventually(
        check, timeout, f"{name}: {reason} + a Warning Event saying {words!r}", interval=1.0
    )
    return result


def _tuning(target: CPUTarget, *, url: str, image: str, secret: str, method: str = "lora") -> Any:
    def shape(doc: dict[str, Any]) -> None:
        target.place(doc)
        doc["tuning"]["method"] = method
        doc["tuning"]["input"]["urls"] = [url]
        doc["tuning"]["output"] = {"image": image, "imagePushSecret": secret}

    return sample("kaito_workspace_tuning_phi_3.yaml", shape)


async def test_cpu_preset_bigger_than_the_instance_type_is_refused_with_the_fix(
    seed_operator: Operator, cpu_target: CPUTarget
) -> None:
    """Admission: a CPU preset that needs more memory than the CPU VM has; the answer names both and the
    size to pick, and nothing is created."""
    op = seed_operator

    def too_small(doc: dict[str, Any]) -> None:
        cpu_target.place(doc)
        doc["inference"]["preset"]["name"] = "phi-3-mini-128k-instruct"  # 12Gi on CPU; a 2-vCPU VM has 8

    out = apply(op, sample("kaito_workspace_phi_3.yaml", too_small), check=False)
    assert out.returncode != 0
    assert "resource.instanceType" in out.stderr and cpu_target.instance_type in out.stderr, out.stderr
    assert "phi-3-mini-128k-instruct needs" in out.stderr and "pick Standard_D" in out.stderr, out.stderr
    assert kget(op.cluster, "workspace", "workspace-phi-3-mini", "-n", op.namespace) is None


async def test_cpu_preset_bigger_than_the_node_is_unschedulable_in_status(
    seed_operator: Operator, cpu_target: CPUTarget
) -> None:
    """Past admission (its bypass annotation), a CPU preset whose memory the real node does not have:
    the pod cannot be placed, and the workspace says so (reason Unschedulable + Event)."""
    op = seed_operator
    node = kget(op.cluster, "node", cpu_target.node)
    allocatable = to_gib(node["status"]["allocatable"]["memory"])
    registry = default_registry()
    presets = [registry.get(n) for n in registry.names()]
    too_big = sorted(
        (p for p in presets if p.cpu is not None and cpu_memory_needed_gib(p) > allocatable),
        key=cpu_memory_needed_gib,
    )
    if not too_big:
        pytest.skip(f"no preset needs more than this node's {allocatable} GiB on CPU")

    def big(doc: dict[str, Any]) -> None:
        cpu_target.place(doc)
        doc["metadata"]["annotations"] = {BYPASS: "true"}
        doc["inference"]["preset"]["name"] = too_big[0].name

    apply(op, sample("kaito_workspace_phi_3.yaml", big))
    ws = await failed_with(op, "workspace-phi-3-mini", "Unschedulable", "Insufficient memory")
    assert conditions(ws)["WorkspaceReady"] != "True"
    assert "Insufficient memory" in json.dumps(ws["status"]), ws["status"]


async def test_qlora_on_a_cpu_node_is_refused(seed_operator: Operator, cpu_target: CPUTarget) -> None:
    """The seed's own qlora on a CPU VM: refused at admission naming the fix; past admission (bypass),
    the workspace fails with reason MethodNeedsGPU and no Job."""
    op = seed_operator
    doc = _tuning(
        cpu_target, url="http://unused.invalid/d.parquet", image="r.invalid/a:1", secret="s", method="qlora"
    )
    out = apply(op, doc, check=False)
    assert out.returncode != 0 and "qlora" in out.stderr and "use method lora" in out.stderr, out.stderr

    doc["metadata"]["annotations"] = {BYPASS: "true"}
    apply(op, doc)
    ws = await failed_with(op, "workspace-phi-3-mini", "MethodNeedsGPU", "NVIDIA GPU", timeout=60)
    assert ws["status"]["state"] == "Failed"
    assert kget(op.cluster, "job", "workspace-phi-3-mini", "-n", op.namespace) is None


@pytest.mark.parametrize("case", ["missing-push-secret", "registry-refuses-push", "dataset-404"])
async def test_tuning_bad_input_fails_fast_with_a_typed_reason(
    case: str,
    seed_operator: Operator,
    cpu_target: CPUTarget,
    seed_registry: SeedRegistry,
    dataset_server: DatasetServer,
) -> None:
    """The tuning Job's steps on the real node: a push secret that does not exist, one the registry
    refuses, a dataset URL that 404s. Each fails the workspace in seconds (before any training) with the
    step's reason, the program's words and what to check; the registry holds nothing."""
    op = seed_operator
    repository = f"seed/{op.namespace}/bad"
    image = f"{seed_registry.host}/{repository}:0.0.1"
    url, secret = dataset_server.url("train.parquet"), "seed-registry-secret"
    if case == "missing-push-secret":
        secret, reason, words = "no-such-secret", "PushSecretInvalid", "does not exist"
    elif case == "registry-refuses-push":
        apply(op, seed_registry.push_secret(secret, password="not-the-password"))
        reason, words = "PushRefused", "HTTP 401"
    else:
        apply(op, seed_registry.push_secret(secret))
        url, reason, words = dataset_server.url("missing.parquet"), "DatasetDownloadFailed", "404"

    apply(op, _tuning(cpu_target, url=url, image=image, secret=secret))
    ws = await failed_with(op, "workspace-phi-3-mini", reason, words)
    status = ws["status"]
    assert status["state"] == "Failed" and status["reason"] == reason, status
    text = json.dumps(status)
    assert words in text, text
    if reason != "DatasetDownloadFailed":
        assert f"imagePushSecret {secret}" in text, text  # what to check
    else:
        assert ("missing.parquet", 404) in dataset_server.hits
    assert "not-the-password" not in text and seed_registry.password not in text
    # It stopped at an init step: the trainer never ran, and the registry holds nothing.
    (pod,) = kget(op.cluster, "pods", "-n", op.namespace, "-l", "job-name=workspace-phi-3-mini")["items"]
    assert pod["status"]["phase"] == "Failed"
    assert not any(
        "running" in (c.get("lastState") or {}) for c in pod["status"].get("containerStatuses") or []
    )
    assert all(
        "terminated" not in (c.get("state") or {}) for c in pod["status"].get("containerStatuses") or []
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        registry_manifest(seed_registry, repository, "0.0.1")
    assert err.value.code == 404
