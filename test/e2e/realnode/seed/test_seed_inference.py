"""The seed's inference quick start answered for real: a Workspace in the seed's shape on the real node
(a CPU VM by its instance-type label, chosen by labelSelector + preferredNodes, no Machine), ready by the
runtime's own probe, then the seed's ``kubectl run ... curl -X POST http://$CLUSTERIP/chat`` from a pod,
and the OpenAI endpoints through the same Service.

Real: kube-apiserver, scheduler, kubelet + containerd running the preset image built by
``presets/Dockerfile`` (tiny random model), kube-proxy's Service rules, the operator's processes.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from test.e2e.realnode.seed.conftest import SeedImages
from test.e2e.realnode.seed.seedbed import (
    SEEDED_CHAT,
    CPUTarget,
    conditions,
    events_for,
    first_json,
    http_json,
    kget,
    report,
    sample,
    seed_curl_answer,
    service_ip,
)
from test.e2e.workspace.conftest import Operator
from test.waiting import eventually

# The module's first test also waits for its cluster, its real node and the images (built once per
# machine, ~10 min; then cached by content).
pytestmark = pytest.mark.timeout(1800)

NAME = "workspace-phi-3-mini"  # the seed's name, kept


async def wait_ready(op: Operator, name: str, timeout: float = 300) -> Any:
    """The workspace once WORKSPACEREADY is True; fails early if a process died or it failed."""

    async def check() -> Any:
        ws = kget(op.cluster, "workspace", name, "-n", op.namespace)
        assert all(p.healthy() for p in op.procs), op.dump()
        state = ((ws or {}).get("status") or {}).get("state")
        assert state not in ("Failed",), f"workspace failed: {json.dumps((ws or {}).get('status'))}"
        return ws if conditions(ws).get("WorkspaceReady") == "True" else None

    return await eventually(check, timeout, f"{name} WorkspaceReady=True", interval=0.5)


async def test_seed_inference_answers_through_the_service(
    seed_operator: Operator, cpu_target: CPUTarget, seed_images_loaded: SeedImages
) -> None:
    op = seed_operator
    doc = sample("kaito_workspace_phi_3.yaml", cpu_target.place)
    started = time.monotonic()
    op.cluster.kubectl("apply", "-n", op.namespace, "-f", "-", input=json.dumps(doc))
    ws = await wait_ready(op, NAME)
    ready_s = time.monotonic() - started
    report("inference.apply_to_workspaceready", ready_s)

    # BYO: the real node was enough, nothing was provisioned.
    assert ws["status"]["workerNodes"] == [cpu_target.node]
    assert kget(op.cluster, "machines", "-A", "-l", f"kaito.sh/workspace={NAME}")["items"] == []
    (pod,) = kget(op.cluster, "pods", "-n", op.namespace, "-l", f"kaito.sh/workspace={NAME}")["items"]
    assert pod["spec"]["nodeName"] == cpu_target.node
    container = pod["spec"]["containers"][0]
    assert container["image"] == seed_images_loaded.tiny_preset
    assert "nvidia.com/gpu" not in json.dumps(container.get("resources") or {})  # a CPU node
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"  # the real probe decided
    (status,) = pod["status"]["containerStatuses"]
    assert status["ready"] and status["restartCount"] == 0

    # What the seed shows: kubectl get workspace / svc.
    table = op.cluster.kubectl("get", "workspace", NAME, "-n", op.namespace).stdout.splitlines()
    assert table[1].split()[:5] == [NAME, cpu_target.instance_type, "True", "True", "True"]
    cluster_ip = service_ip(op.cluster, op.namespace, NAME)

    # The seed's own command, from a pod, through the Service.
    body = seed_curl_answer(
        op.cluster, op.namespace, seed_images_loaded.curl, cluster_ip, {"prompt": "YOUR QUESTION HERE"}
    )
    report("inference.apply_to_first_answer", time.monotonic() - started)
    assert isinstance(body.get("Result"), str) and body["Result"], body
    assert first_json(json.dumps(body)) == body

    # Same question, greedy: the same answer every time (the model, not luck, answered); through the
    # Service from the host too (kube-proxy serves the ClusterIP to the node's own processes).
    url = f"http://{cluster_ip}"
    answers = [await http_json("POST", f"{url}/chat", SEEDED_CHAT) for _ in range(2)]
    assert answers[0] == answers[1] and answers[0][0] == 200, answers

    # The OpenAI endpoints through the same Service.
    status_code, models = await http_json("GET", f"{url}/v1/models")
    assert status_code == 200 and [m["id"] for m in models["data"]] == [cpu_target.preset], models
    status_code, chat = await http_json(
        "POST",
        f"{url}/v1/chat/completions",
        {
            "model": cpu_target.preset,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    assert status_code == 200, chat
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"], chat
    assert chat["usage"]["completion_tokens"] >= 1
    status_code, completion = await http_json(
        "POST",
        f"{url}/v1/completions",
        {"model": cpu_target.preset, "prompt": "Kubernetes", "max_tokens": 8, "temperature": 0},
    )
    assert status_code == 200 and completion["choices"][0]["text"], completion
    # Bad input through the Service: a 4xx JSON answer, never a 500.
    status_code, bad = await http_json("POST", f"{url}/chat", {"prompt": 42})
    assert 400 <= status_code < 500 and isinstance(bad, dict), (status_code, bad)

    async def announced() -> bool:
        return any(
            "WorkspaceReady=True" in (e.get("message") or "")
            for e in events_for(op.cluster, op.namespace, NAME)
        )

    await eventually(announced, 30, "an Event announcing WorkspaceReady=True", interval=0.5)
