"""The seed's tuning and adapter quick starts answered for real on the real node (CPU).

Tuning: the seed's tuning manifest (``method: lora`` on a CPU VM, ``tuning.config`` raising the learning
rate: see :func:`training_config`), ``input.urls`` from an HTTP server the pod reaches, ``output.image`` pushed with ``imagePushSecret`` to a registry that authenticates over TLS;
the Job runs as a real pod to WorkspaceSucceeded=True. Adapters: the seed's adapter manifest serving the
base preset with that pushed artifact at ``strength: "1.0"`` (the init step pulls it), answering
differently from the base model for the same greedy request; changing the strength and then the adapter
list rolls the Deployment while a client keeps asking, with no failed request.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
import yaml

from hack import seed_images
from test.e2e.realnode.seed.seedbed import (
    REPO,
    SEEDED_CHAT,
    CPUTarget,
    DatasetServer,
    EndpointLog,
    KeepAsking,
    SeedRegistry,
    conditions,
    events_for,
    http_json,
    kget,
    report,
    sample,
    service_ip,
)
from test.e2e.realnode.seed.test_seed_inference import wait_ready
from test.e2e.workspace.conftest import Operator
from test.waiting import eventually

# The module's first test also waits for its cluster, its real node and the images (built once per
# machine, ~10 min; then cached by content).
pytestmark = pytest.mark.timeout(1800)

TUNING_NAME = "workspace-phi-3-mini"  # the seed's names, kept
ADAPTER_WS = "workspace-phi-3-mini-adapter"
ADAPTER_NAME = "phi-3-adapter"
SECRET = "seed-registry-secret"
ARTIFACT_TYPE = "application/vnd.kaito.adapter.v1"
TRAINING_CONFIG = "seed-lora-config"
LORA_TEMPLATE_FILE = REPO / "presets" / "tuning" / "templates" / "lora-params.yaml"


@dataclass(frozen=True)
class TuningRun:
    """What one run of the seed's tuning workspace produced and how long it took."""

    image: str
    digest: str  # the manifest digest the push reported
    job_seconds: float
    apply_to_succeeded: float
    status: dict[str, Any]
    node: str


_RUNS: dict[str, TuningRun] = {}  # registry storage -> its tuning run, made by whichever test asks first


def training_config() -> dict[str, Any]:
    """The default LoRA ConfigMap (presets/tuning/templates) with a learning rate of 0.01.

    The default's (transformers' 5e-5) moves a tiny random model so little in 96 steps that its greedy
    answer stays the same with the adapter merged; a user tunes it with ``tuning.config`` like this.
    """
    doc = yaml.safe_load(LORA_TEMPLATE_FILE.read_text())
    config = yaml.safe_load(doc["data"]["training_config.yaml"])
    config["training_config"]["TrainingArguments"]["learning_rate"] = 0.01
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": TRAINING_CONFIG},
        "data": {"training_config.yaml": yaml.safe_dump(config, sort_keys=False)},
    }


def registry_manifest(registry: SeedRegistry, repository: str, tag: str) -> tuple[str, dict[str, Any]]:
    """(digest, manifest) of ``repository:tag`` as the registry serves it (basic auth, TLS via the CA)."""
    ctx = ssl.create_default_context(cafile=str(seed_images.test_ca().cert))
    auth = base64.b64encode(f"{registry.user}:{registry.password}".encode()).decode()
    req = urllib.request.Request(
        f"https://{registry.host}/v2/{repository}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json", "Authorization": f"Basic {auth}"},
    )
    with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
        return str(resp.headers["Docker-Content-Digest"]), json.loads(resp.read())


def apply(op: Operator, doc: dict[str, Any]) -> None:
    op.cluster.kubectl("apply", "-n", op.namespace, "-f", "-", input=json.dumps(doc))


async def run_seed_tuning(
    op: Operator, target: CPUTarget, registry: SeedRegistry, datasets: DatasetServer
) -> TuningRun:
    """Apply the seed's tuning manifest pointed at the local peers and wait for WorkspaceSucceeded=True."""
    apply(op, registry.push_secret(SECRET))
    apply(op, training_config())
    repository = f"seed/{op.namespace}/adapter"
    image = f"{registry.host}/{repository}:0.0.1"

    def shape(doc: dict[str, Any]) -> None:
        target.place(doc)
        doc["tuning"]["method"] = "lora"  # the seed's qlora needs a GPU (refused on CPU: test_seed_bad_input)
        doc["tuning"]["input"]["urls"] = [datasets.url("train.parquet")]
        doc["tuning"]["output"] = {"image": image, "imagePushSecret": SECRET}
        doc["tuning"]["config"] = TRAINING_CONFIG

    started = time.monotonic()
    apply(op, sample("kaito_workspace_tuning_phi_3.yaml", shape))

    async def succeeded() -> Any:
        ws = kget(op.cluster, "workspace", TUNING_NAME, "-n", op.namespace)
        assert all(p.healthy() for p in op.procs), op.dump()
        status = (ws or {}).get("status") or {}
        assert status.get("state") != "Failed", f"tuning failed: {json.dumps(status)}"
        return ws if conditions(ws).get("WorkspaceSucceeded") == "True" else None

    ws = await eventually(succeeded, 900, f"{TUNING_NAME} WorkspaceSucceeded=True", interval=1.0)
    apply_to_succeeded = time.monotonic() - started
    job = kget(op.cluster, "job", TUNING_NAME, "-n", op.namespace)
    (pod,) = kget(op.cluster, "pods", "-n", op.namespace, "-l", f"job-name={TUNING_NAME}")["items"]
    logs = op.cluster.kubectl("logs", pod["metadata"]["name"], "-n", op.namespace, "-c", TUNING_NAME).stdout
    pushed = [line for line in logs.splitlines() if line.startswith(f"pushed {image}@")]
    assert pushed, f"no push line in the trainer's log:\n{logs[-3000:]}"
    t0 = datetime.fromisoformat(job["status"]["startTime"].replace("Z", "+00:00"))
    t1 = datetime.fromisoformat(job["status"]["completionTime"].replace("Z", "+00:00"))
    return TuningRun(
        image=image,
        digest=pushed[-1].rsplit("@", 1)[1],
        job_seconds=(t1 - t0).total_seconds(),
        apply_to_succeeded=apply_to_succeeded,
        status=ws["status"],
        node=pod["spec"]["nodeName"],
    )


@pytest.fixture
async def tuned(
    seed_operator: Operator, cpu_target: CPUTarget, seed_registry: SeedRegistry, dataset_server: DatasetServer
) -> TuningRun:
    """The seed's tuning run: made once per registry (the module's), in the namespace of the first test
    that asks; the adapter it pushed stays in the registry for the others."""
    key = str(seed_registry.registry.storage)
    if key not in _RUNS:
        _RUNS[key] = await run_seed_tuning(seed_operator, cpu_target, seed_registry, dataset_server)
        report("tuning.job_duration", _RUNS[key].job_seconds)
        report("tuning.apply_to_succeeded", _RUNS[key].apply_to_succeeded)
    return _RUNS[key]


async def test_seed_tuning_pushes_adapter_to_authenticated_registry(
    tuned: TuningRun, seed_registry: SeedRegistry, dataset_server: DatasetServer, cpu_target: CPUTarget
) -> None:
    assert tuned.node == cpu_target.node  # a real pod on the CPU node, no GPU asked for
    assert tuned.status["state"] == "Succeeded"
    assert {"JobStarted", "WorkspaceSucceeded", "ResourceReady"} <= {
        k for k, v in conditions({"status": tuned.status}).items() if v == "True"
    }
    assert ("train.parquet", 200) in dataset_server.hits  # the init step fetched the dataset over HTTP
    repository, tag = tuned.image.split("/", 1)[1].rsplit(":", 1)
    digest, manifest = registry_manifest(seed_registry, repository, tag)
    assert digest == tuned.digest  # what the Job pushed is what the registry holds under the tag
    assert manifest.get("artifactType") == ARTIFACT_TYPE, manifest
    assert manifest["annotations"]["sh.kaito.model.name"] == cpu_target.preset


async def test_seed_adapter_served_with_strength_and_rolls_without_failures(
    seed_operator: Operator, cpu_target: CPUTarget, seed_registry: SeedRegistry, tuned: TuningRun
) -> None:
    op = seed_operator
    apply(op, seed_registry.push_secret(SECRET))  # this test's namespace may not be the tuning one

    def shape(doc: dict[str, Any]) -> None:
        target_adapter = doc["inference"]["adapters"][0]
        target_adapter["source"]["image"] = tuned.image
        target_adapter["source"]["imagePullSecrets"] = [SECRET]  # our registry authenticates pulls too
        assert target_adapter["strength"] == "1.0"
        cpu_target.place(doc)

    started = time.monotonic()
    apply(op, sample("kaito_workspace_phi_3_with_adapters.yaml", shape))
    ws = await wait_ready(op, ADAPTER_WS)
    report("adapter.apply_to_workspaceready", time.monotonic() - started)
    assert ws["status"]["workerNodes"] == [cpu_target.node]
    (pod,) = kget(op.cluster, "pods", "-n", op.namespace, "-l", f"kaito.sh/workspace={ADAPTER_WS}")["items"]
    (init,) = pod["status"]["initContainerStatuses"]
    assert init["name"] == ADAPTER_NAME and init["state"]["terminated"]["exitCode"] == 0
    pulled = op.cluster.kubectl(
        "logs", pod["metadata"]["name"], "-n", op.namespace, "-c", ADAPTER_NAME
    ).stdout
    assert f"pulled {tuned.image} into /mnt/adapter/{ADAPTER_NAME}" in pulled, pulled

    url = f"http://{service_ip(op.cluster, op.namespace, ADAPTER_WS)}/chat"
    status, with_adapter = await http_json("POST", url, SEEDED_CHAT)
    assert status == 200, with_adapter

    client = KeepAsking(url, SEEDED_CHAT)
    endpoints = EndpointLog(op.cluster, op.namespace, ADAPTER_WS)
    client.start()
    endpoints.start()
    try:
        await roll(op, {"inference": {"adapters": [adapter_entry(tuned, "0.5")]}})  # the strength
        await roll(op, {"inference": {"adapters": None}})  # the adapter list

        async def enough() -> bool:
            return client.total >= 100

        await eventually(enough, 120, "at least 100 requests during the rolls", interval=0.5)
    finally:
        await client.stop()
        await endpoints.stop()
    report("adapter.roll_requests", client.total, unit="requests")
    report("adapter.roll_failed_requests", len(client.failures), unit="requests")
    assert client.failures == [], (
        f"{len(client.failures)}/{client.total} failed: {client.failures[:3]} ... {client.failures[-3:]}\n"
        "endpoints: " + "\n  ".join(endpoints.lines)
    )

    status, base = await http_json("POST", url, SEEDED_CHAT)
    assert status == 200, base
    assert base["Result"] != with_adapter["Result"], "the adapter did not change the greedy answer"
    assert any(
        "WorkspaceReady=True" in (e.get("message") or "")
        for e in events_for(op.cluster, op.namespace, ADAPTER_WS)
    )


def adapter_entry(tuned: TuningRun, strength: str) -> dict[str, Any]:
    """The seed's adapter list entry for the pushed adapter."""
    return {
        "source": {"name": ADAPTER_NAME, "image": tuned.image, "imagePullSecrets": [SECRET]},
        "strength": strength,
    }


async def roll(op: Operator, patch: dict[str, Any]) -> int:
    """Merge-patch the workspace and wait until its Deployment rolled: one updated, ready replica, the
    old pod gone, the workspace ready throughout. Returns the Deployment's generation."""
    before = kget(op.cluster, "deployment", ADAPTER_WS, "-n", op.namespace)
    op.cluster.kubectl(
        "patch", "workspace", ADAPTER_WS, "-n", op.namespace, "--type=merge", "-p", json.dumps(patch)
    )

    async def rolled() -> int | None:
        d = kget(op.cluster, "deployment", ADAPTER_WS, "-n", op.namespace)
        ws = kget(op.cluster, "workspace", ADAPTER_WS, "-n", op.namespace)
        assert conditions(ws).get("InferenceReady") == "True", json.dumps(ws.get("status"))
        st = d.get("status") or {}
        pods = kget(op.cluster, "pods", "-n", op.namespace, "-l", f"kaito.sh/workspace={ADAPTER_WS}")["items"]
        done = (
            d["metadata"]["generation"] > before["metadata"]["generation"]
            and st.get("observedGeneration") == d["metadata"]["generation"]
            and st.get("updatedReplicas") == 1
            and st.get("readyReplicas") == 1
            and st.get("replicas") == 1
            and len(pods) == 1
        )
        return int(d["metadata"]["generation"]) if done else None

    return int(await eventually(rolled, 300, f"{ADAPTER_WS} to roll after {patch}", interval=0.5))
