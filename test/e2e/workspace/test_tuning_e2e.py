"""Tuning workspaces end to end: the seed's QLoRA manifest -> Machine -> kwok node -> Job -> Succeeded.

kwok plays the kubelet (a Job's pod runs, then succeeds: stage ``pod-complete``), the cluster's Job
controller marks the Job Complete, and the workspace controller reports it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from test.e2e.credentials import FAILING_DATA_URL, docker_config_json, secret_values
from test.e2e.workspace.conftest import Operator
from test.e2e.workspace.test_inference_e2e import apply_sample, conditions, kget, wait_condition
from test.waiting import eventually

NAME = "workspace-phi-3-mini"
# The sample's placeholder is no valid object name; the test names a real Secret instead.
PUSH_SECRET = "acr-push-secret"
OUTPUT_IMAGE = "myregistry.azurecr.io/phi-3-adapter:0.0.1"


def create_push_secret(op: Operator) -> None:
    """The ``kubernetes.io/dockerconfigjson`` Secret the sample names (dummy credentials)."""
    config = docker_config_json("example.azurecr.io")
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": PUSH_SECRET},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(config.encode()).decode()},
    }
    op.cluster.kubectl("apply", "-n", op.namespace, "-f", "-", input=json.dumps(secret))


async def test_tuning_sample_job_succeeds(operator: Operator) -> None:
    """The seed's tuning manifest yields a Job of the README's shape; its success is the workspace's."""
    op = operator
    create_push_secret(op)

    def use_secret(doc: dict[str, Any]) -> None:
        doc["tuning"]["output"]["imagePushSecret"] = PUSH_SECRET
        # The placeholder is not a valid image reference (upper case): the webhook refuses it, as upstream.
        doc["tuning"]["output"]["image"] = OUTPUT_IMAGE

    apply_sample(op, "kaito_workspace_tuning_phi_3.yaml", use_secret)

    async def job() -> object:
        return kget(op, "job", NAME, "-n", op.namespace)

    j = await eventually(job, 90, "the tuning Job", interval=0.3)
    assert isinstance(j, dict)
    assert j["spec"]["backoffLimit"] == 0
    assert j["metadata"]["ownerReferences"][0]["kind"] == "Workspace"
    pod = j["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["data-downloader", "push-check"]
    assert pod["imagePullSecrets"] == [{"name": PUSH_SECRET}]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {v["name"]: v for v in pod["volumes"]}["config-volume"]["configMap"]["name"] == (
        "qlora-params-template"
    )
    assert kget(op, "configmap", "qlora-params-template", "-n", op.namespace) is not None

    ws = await wait_condition(op, NAME, "WorkspaceSucceeded", "True", timeout=120)
    assert ws["status"]["state"] == "Succeeded"
    conds = conditions(ws)
    assert conds["JobStarted"] == "True" and conds["WorkspaceReady"] == "True"
    assert conds["ResourceReady"] == "True"
    done = kget(op, "job", NAME, "-n", op.namespace)
    assert done["metadata"]["uid"] == j["metadata"]["uid"]  # the same Job, never re-created

    async def announced() -> bool:
        out = kget(op, "events", "-n", op.namespace, "--field-selector", f"involvedObject.name={NAME}")
        return any(
            "WorkspaceSucceeded=True" in (e.get("message") or "") for e in (out or {}).get("items") or []
        )

    # The Event is sent beside the status write, so it may land a moment after the status.
    await eventually(announced, 30, "an Event announcing WorkspaceSucceeded=True", interval=0.3)


async def test_tuning_job_failure_is_reported(operator: Operator) -> None:
    """A dataset URL kwok fails (stage pod-simulate-job-failure): Job Failed -> state Failed, reason and
    the downloader's termination message on WorkspaceSucceeded."""
    op = operator
    create_push_secret(op)

    def failing(doc: dict[str, Any]) -> None:
        doc["tuning"]["output"]["imagePushSecret"] = PUSH_SECRET
        doc["tuning"]["output"]["image"] = OUTPUT_IMAGE
        doc["tuning"]["input"]["urls"] = [FAILING_DATA_URL]

    apply_sample(op, "kaito_workspace_tuning_phi_3.yaml", failing)
    ws = await wait_condition_reason(op, "workspaceFailed")
    assert ws["status"]["state"] == "Failed"
    assert ws["status"]["reason"] == "DatasetDownloadFailed"  # the failed step's, not the Job's
    msg = next(c["message"] for c in ws["status"]["conditions"] if c["type"] == "WorkspaceSucceeded")
    assert "BackoffLimitExceeded" in msg
    assert "container data-downloader exited 1: error: download failed: https://[redacted]@kwok" in msg
    for secret in secret_values().values():
        assert secret not in json.dumps(ws["status"])
    assert conditions(ws)["WorkspaceReady"] == "False"

    async def warning() -> Any:
        out = kget(op, "events", "-n", op.namespace, "--field-selector", f"involvedObject.name={NAME}")
        return [
            e
            for e in (out or {}).get("items") or []
            if e["type"] == "Warning" and "BackoffLimitExceeded" in (e.get("message") or "")
        ]

    events = await eventually(warning, 30, "a Warning Event naming BackoffLimitExceeded", interval=0.3)
    for secret in secret_values().values():
        assert secret not in json.dumps(events)


async def wait_condition_reason(op: Operator, reason: str, timeout: float = 120) -> Any:
    """The workspace once its WorkspaceSucceeded condition carries ``reason``."""

    async def check() -> Any:
        ws = kget(op, "workspace", NAME, "-n", op.namespace)
        assert all(p.healthy() for p in op.procs), op.dump()
        for c in ((ws or {}).get("status") or {}).get("conditions") or []:
            if c["type"] == "WorkspaceSucceeded" and c["reason"] == reason:
                return ws
        return None

    return await eventually(check, timeout, f"{NAME} WorkspaceSucceeded reason {reason}", interval=0.3)
