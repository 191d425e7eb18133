"""Helpers for the webhook integration tests: webhook configurations, registration, kubectl in a thread.

The webhook configurations only select namespaces labelled ``kaito.test/webhook=<token>`` so they never
touch other tests' workspaces, and they are deleted afterwards.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes_asyncio.client import AdmissionregistrationV1Api, CoreV1Api, CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException

from kaito.webhook.certs import CertManager
from kaito.webhook.server import MUTATE_PATH, VALIDATE_PATH, WebhookServer
from test.waiting import eventually

CRD_DIR = Path(__file__).resolve().parents[3] / "config" / "crd"
WEBHOOK_LABEL = "kaito.test/webhook"
VALIDATING_WEBHOOK = "validation.workspace.kaito.sh"
MUTATING_WEBHOOK = "mutation.workspace.kaito.sh"


def webhook_rules() -> list[dict[str, Any]]:
    return [
        {
            "apiGroups": ["kaito.sh"],
            "apiVersions": ["v1alpha1", "v1beta1"],
            "operations": ["CREATE", "UPDATE"],
            "resources": ["workspaces"],
            "scope": "Namespaced",
        }
    ]


def webhook_configurations(
    name: str, token: str, url_base: str, failure_policy: str = "Fail", ca_bundle: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(validating, mutating) configurations calling ``url_base`` for namespaces labelled with ``token``."""

    def hook(webhook_name: str, path: str) -> dict[str, Any]:
        client: dict[str, Any] = {"url": f"{url_base}{path}"}
        if ca_bundle:
            client["caBundle"] = ca_bundle
        return {
            "name": webhook_name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": failure_policy,
            "timeoutSeconds": 10,
            "clientConfig": client,
            "rules": webhook_rules(),
            "namespaceSelector": {"matchLabels": {WEBHOOK_LABEL: token}},
        }

    validating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [hook(VALIDATING_WEBHOOK, VALIDATE_PATH)],
    }
    mutating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{**hook(MUTATING_WEBHOOK, MUTATE_PATH), "reinvocationPolicy": "Never"}],
    }
    return validating, mutating


@dataclass
class WebhookEnv:
    """A registered, running webhook for one test namespace."""

    server: WebhookServer
    certs: CertManager
    namespace: str
    token: str
    configuration: str
    cert_dir: Path


async def label_namespace(api_client: Any, namespace: str, token: str) -> None:
    await CoreV1Api(api_client).patch_namespace(namespace, {"metadata": {"labels": {WEBHOOK_LABEL: token}}})


async def register(api_client: Any, validating: dict[str, Any], mutating: dict[str, Any]) -> None:
    admission = AdmissionregistrationV1Api(api_client)
    await admission.create_validating_webhook_configuration(validating)
    await admission.create_mutating_webhook_configuration(mutating)


async def unregister(api_client: Any, name: str) -> None:
    admission = AdmissionregistrationV1Api(api_client)
    for delete in (
        admission.delete_validating_webhook_configuration,
        admission.delete_mutating_webhook_configuration,
    ):
        try:
            await delete(name)
        except ApiException as e:
            if e.status != 404:
                raise


async def wait_until_webhook_active(api_client: Any, namespace: str) -> None:
    """The apiserver picks up new webhook configurations asynchronously: probe with a dry-run create."""
    objects = CustomObjectsApi(api_client)
    probe = {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": "webhook-probe"},
        "resource": {"instanceType": "Standard_NC6s_v3", "labelSelector": {"matchLabels": {"a": "b"}}},
        "inference": {"preset": {"name": "webhook-probe-preset"}},
    }

    async def denied_by_webhook() -> bool:
        try:
            await objects.create_namespaced_custom_object(
                "kaito.sh", "v1alpha1", namespace, "workspaces", probe, dry_run="All"
            )
        except ApiException as e:
            return "unknown preset 'webhook-probe-preset'" in (e.body or "")
        return False

    await eventually(denied_by_webhook, timeout=30, what="the webhook to be called by the apiserver")


async def kubectl(cluster: Any, *args: str, input: str | None = None) -> Any:
    """kubectl in a thread: the webhook server shares this event loop and must keep answering."""
    return await asyncio.to_thread(cluster.kubectl, *args, input=input, check=False)
