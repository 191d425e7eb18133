"""CRDs installed once per session; a real webhook (HTTPS, self-issued certs) registered per test.

The webhook configurations only select namespaces labelled ``kaito.test/webhook=<token>`` so they never
touch other tests' workspaces, and they are deleted afterwards.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kaito.cmd import parse_args, webhook_validator
from kaito.webhook.certs import CertManager
from kaito.webhook.server import WebhookServer
from test.integration.webhook.helpers import (
    CRD_DIR,
    WebhookEnv,
    label_namespace,
    register,
    unregister,
    wait_until_webhook_active,
    webhook_configurations,
)


@pytest.fixture(scope="session")
def crds(control_plane: Any) -> Any:
    """Install (or update) the generated CRDs; idempotent, safe if another package installs them too."""
    control_plane.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=kaito-crds", "-f", str(CRD_DIR)
    )
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/workspaces.kaito.sh",
        "crd/machines.karpenter.sh",
    )
    return control_plane


@pytest.fixture
async def webhook(crds: Any, api_client: Any, namespace: str, tmp_path: Path) -> AsyncIterator[WebhookEnv]:
    """Cert manager + HTTPS webhook server on 127.0.0.1, registered with the generated caBundle."""
    token = secrets.token_hex(4)
    name = f"kaito-test-{token}"
    await label_namespace(api_client, namespace, token)
    cert_dir = tmp_path / "certs"
    certs = CertManager(
        api_client,
        namespace=namespace,
        cert_dir=cert_dir,
        service=None,
        extra_dns_names=["localhost"],
        ip_addresses=["127.0.0.1"],
        validating_webhooks=[name],
        mutating_webhooks=[name],
    )
    await certs.ensure()
    # The validator the controller serves, from its flags (as deployed: tuning on, default runtime).
    validator = webhook_validator(parse_args(["--enable-tuning"]), api_client)
    server = WebhookServer(validator, host="127.0.0.1", port=0, cert_dir=cert_dir)
    certs.on_change = server.reload_certificates
    await server.start()
    try:
        # Registered without a caBundle: the cert manager must patch it in, as in a real deployment.
        validating, mutating = webhook_configurations(name, token, f"https://127.0.0.1:{server.port}")
        await register(api_client, validating, mutating)
        await certs.ensure()
        await wait_until_webhook_active(api_client, namespace)
        yield WebhookEnv(server, certs, namespace, token, name, cert_dir)
    finally:
        await unregister(api_client, name)
        await server.stop()
