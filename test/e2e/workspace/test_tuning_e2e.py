"""Tuning workspaces end to end: the seed's QLoRA manifest -> Machine -> kwok node -> Job -> Succeeded.

kwok plays the kubelet (a Job's pod runs, then succeeds: stage ``pod-complete``), the cluster's Job
controller marks the Job Complete, and the workspace controller reports it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from test.e2e.workspace.conftest import Operator
from test.e2e.workspace.test_inference_e2e import apply_sample, conditions, kget, wait_condition
from test.waiting import eventually

NAME = "workspace-phi-3-mini"
# The sample's placeholder is no valid object name; the test names a real Secret instead.
PUSH_SECRET = "acr-push-secret"


def create_push_secret(op: Operator) -> None:
    """The ``kubernetes.io/dockerconfigjson`` Secret the sample names (dummy credentials)."""
    config = json.dumps({"auths": {"example.azurecr.io": {"auth": base64.b64encode(b"u:p").decode()}}})
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

    apply_sample(op, "kaito_workspace_tuning_phi_3.yaml", use_secret)

    async def job() -> object:
        return kget(op, "job", NAME, "-n", op.namespace)

    j = await eventually(job, 90, "the tuning Job", interval=0.3)
    assert isinstance(j, dict)
    assert j["spec"]["backoffLimit"] == 0
    assert j["metadata"]["ownerReferences"][0]["kind"] == "Workspace"
    pod = j["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["data-downloader"]
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
    events = kget(op, "events", "-n", op.namespace, "--field-selector", f"involvedObject.name={NAME}")
    assert any("WorkspaceSucceeded=True" in (e.get("message") or "") for e in events["items"])
