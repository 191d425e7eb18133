"""Admission webhook for Workspaces: HTTPS server, validation and defaulting rules, certificates.

What is admitted, and where it differs from upstream on purpose: ``kaito/webhook/README.md``.

Wiring in the controller entry point (every replica, leader or not)::

    validator = kaito.cmd.webhook_validator(args, client)   # build_validator + AdmissionPolicy(flags)
    certs = CertManager(api_client, namespace, cert_dir, service="kaito-workspace-webhook",
                        validating_webhooks=[...], mutating_webhooks=[...])
    await certs.ensure()
    server = WebhookServer(validator, host="0.0.0.0", port=9443, cert_dir=cert_dir)
    certs.on_change = server.reload_certificates            # a coroutine: reloads off the loop
    await server.start()
    cert_task = asyncio.create_task(certs.run())
    ...
    cert_task.cancel(); await asyncio.gather(cert_task, return_exceptions=True); await server.stop()
"""

from kaito.webhook.certs import CertBundle, CertManager, CertPolicy
from kaito.webhook.server import HEALTH_PATH, MUTATE_PATH, VALIDATE_PATH, WebhookServer
from kaito.webhook.validation import (
    AdmissionPolicy,
    Result,
    WorkspaceValidator,
    build_validator,
    kube_configmap_reader,
)

__all__ = [
    "HEALTH_PATH",
    "MUTATE_PATH",
    "VALIDATE_PATH",
    "AdmissionPolicy",
    "CertBundle",
    "CertManager",
    "CertPolicy",
    "Result",
    "WebhookServer",
    "WorkspaceValidator",
    "build_validator",
    "kube_configmap_reader",
]
