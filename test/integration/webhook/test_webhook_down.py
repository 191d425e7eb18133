"""With the webhook unreachable, the CRD's schema and CEL rules still protect the API."""

from __future__ import annotations

import secrets
from typing import Any

import yaml

from test.integration.webhook.helpers import (
    kubectl,
    label_namespace,
    register,
    unregister,
    webhook_configurations,
)
from test.waiting import eventually

BASE: dict[str, Any] = {
    "apiVersion": "kaito.sh/v1alpha1",
    "kind": "Workspace",
    "metadata": {"name": "ws"},
    "resource": {"instanceType": "Standard_NC6s_v3", "labelSelector": {"matchLabels": {"apps": "phi-3"}}},
    "inference": {"preset": {"name": "phi-3-mini-4k-instruct"}},
}
TUNING = {
    "preset": {"name": "phi-3-mini-4k-instruct"},
    "method": "qlora",
    "input": {"urls": ["https://example.com/data.parquet"]},
    "output": {"image": "myregistry.azurecr.io/adapter:0.0.1", "imagePushSecret": "push"},
}


async def test_cel_rules_hold_with_webhook_unreachable(crds: Any, api_client: Any, namespace: str) -> None:
    # A webhook that nothing listens on (port 1), failurePolicy Ignore: the apiserver calls it, fails, and
    # falls back to the CRD's own validation.
    token = secrets.token_hex(4)
    name = f"kaito-test-down-{token}"
    await label_namespace(api_client, namespace, token)
    validating, mutating = webhook_configurations(name, token, "https://127.0.0.1:1", failure_policy="Ignore")
    await register(api_client, validating, mutating)
    try:
        # Accepted (nothing to catch); it proves admission goes on without the webhook.
        created = await kubectl(crds, "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(BASE))
        assert created.returncode == 0, created.stderr

        changed = {**BASE, "resource": {**BASE["resource"], "instanceType": "Standard_NC24ads_A100_v4"}}

        async def instance_type_change_rejected() -> bool:
            proc = await kubectl(crds, "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(changed))
            assert proc.returncode != 0, "instanceType change was accepted"
            assert "resource.instanceType is immutable" in proc.stderr, proc.stderr
            return True

        await eventually(instance_type_change_rejected, timeout=10, what="the CEL immutability rule")

        both = {**BASE, "metadata": {"name": "both"}, "tuning": TUNING}
        proc = await kubectl(crds, "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(both))
        assert proc.returncode != 0
        assert "tuning: Forbidden: inference and tuning cannot both be set in one workspace" in proc.stderr

        # The same holds for a direct API write (no kubectl), e.g. a JSON merge patch.
        patched = await kubectl(
            crds,
            "patch",
            "workspace",
            "ws",
            "-n",
            namespace,
            "--type=merge",
            "-p",
            '{"resource":{"count":3}}',
        )
        assert patched.returncode != 0 and "resource.count is immutable" in patched.stderr

        stored = await kubectl(crds, "get", "workspace", "ws", "-n", namespace, "-o", "yaml")
        assert yaml.safe_load(stored.stdout)["resource"]["instanceType"] == "Standard_NC6s_v3"
    finally:
        await unregister(api_client, name)
