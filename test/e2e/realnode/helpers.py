"""Small kubectl-based helpers for the real-node e2e tests (the cluster is a module's own)."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

from hack.localcluster import LocalCluster
from hack.realnode import pod_placement


def get_json(cluster: LocalCluster, *args: str) -> Any:
    """``kubectl get ARGS -o json``, decoded."""
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


async def aget_json(cluster: LocalCluster, *args: str) -> Any:
    """``get_json`` off the event loop."""
    return await asyncio.to_thread(get_json, cluster, *args)


def new_namespace(cluster: LocalCluster, prefix: str) -> str:
    """A fresh namespace (names never repeat; the module's cluster goes away with it)."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", name)
    return name


def pod(
    name: str,
    image: str,
    command: list[str],
    *,
    on_real_node: bool = True,
    ready_port: int | None = None,
    restart: str = "Always",
    env: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A one-container Pod of a locally built image (never pulled), placed on the real node by default."""
    container: dict[str, Any] = {
        "name": "main",
        "image": image,
        "imagePullPolicy": "Never",
        "command": command,
        "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
    }
    if ready_port:
        container["ports"] = [{"containerPort": ready_port}]
        container["readinessProbe"] = {"httpGet": {"path": "/", "port": ready_port}, "periodSeconds": 1}
    spec: dict[str, Any] = {
        "containers": [container],
        "restartPolicy": restart,
        "terminationGracePeriodSeconds": 1,
    }
    if on_real_node:
        spec.update(pod_placement())
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"app": name}},
        "spec": spec,
    }


def pod_condition(p: dict[str, Any], kind: str) -> dict[str, Any]:
    """The pod's condition of type ``kind`` (empty if absent)."""
    return next((c for c in p.get("status", {}).get("conditions", []) if c["type"] == kind), {})
