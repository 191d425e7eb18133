"""The certificate manager against a real apiserver: one Secret shared by replicas, caBundle patched."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from kubernetes_asyncio.client import AdmissionregistrationV1Api, CoreV1Api

from kaito.webhook.certs import CertManager, CertPolicy
from test.integration.webhook.helpers import register, unregister, webhook_configurations
from test.waiting import eventually


async def test_replicas_share_one_secret_and_rotation_patches_ca_bundle(
    crds: Any, api_client: Any, namespace: str, tmp_path: Path
) -> None:
    name = f"kaito-test-certs-{secrets.token_hex(4)}"
    validating, mutating = webhook_configurations(name, "none", "https://127.0.0.1:9443")
    await register(api_client, validating, mutating)
    try:

        def manager(replica: str, policy: CertPolicy | None = None) -> CertManager:
            return CertManager(
                api_client,
                namespace=namespace,
                cert_dir=tmp_path / replica,
                service="kaito-workspace-webhook",
                validating_webhooks=[name],
                mutating_webhooks=[name],
                policy=policy,
            )

        changes: list[str] = []
        first = manager("a")
        first.on_change = lambda: changes.append("a")
        bundle_a = await first.ensure()
        bundle_b = await manager("b").ensure()
        assert bundle_b == bundle_a, "the second replica must reuse the stored certificate"
        assert changes == ["a"]
        assert (tmp_path / "b" / "tls.crt").read_bytes() == bundle_a.cert
        assert (tmp_path / "b" / "tls.key").stat().st_mode & 0o077 == 0

        cert = x509.load_pem_x509_certificate(bundle_a.cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert f"kaito-workspace-webhook.{namespace}.svc" in sans.get_values_for_type(x509.DNSName)

        admission = AdmissionregistrationV1Api(api_client)
        vcfg = await admission.read_validating_webhook_configuration(name)
        mcfg = await admission.read_mutating_webhook_configuration(name)
        for cfg in (vcfg, mcfg):
            assert base64.b64decode(cfg.webhooks[0].client_config.ca_bundle) == bundle_a.ca_bundle

        # A replica whose policy says the CA is about to expire rotates it; the old CA stays trusted.
        rotate_ca = CertPolicy(ca_renew_before=timedelta(days=3651))
        bundle_c = await manager("c", rotate_ca).ensure()
        assert bundle_c.ca_key != bundle_a.ca_key
        cas = x509.load_pem_x509_certificates(bundle_c.ca_bundle)
        old_ca = x509.load_pem_x509_certificate(bundle_a.ca_bundle)
        assert len(cas) == 2 and cas[1].serial_number == old_ca.serial_number
        vcfg = await admission.read_validating_webhook_configuration(name)
        assert base64.b64decode(vcfg.webhooks[0].client_config.ca_bundle) == bundle_c.ca_bundle

        # The first replica picks the rotation up from the Secret on its next pass and reloads.
        assert await first.ensure() == bundle_c
        assert changes == ["a", "a"]
        core = CoreV1Api(api_client)
        secret = await core.read_namespaced_secret("workspace-webhook-cert", namespace)
        assert set(secret.data) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}

        # The background loop heals a deleted Secret (new CA, caBundle re-patched); its owner cancels it.
        first.check_interval = 0.2
        task = asyncio.create_task(first.run())
        try:
            await core.delete_namespaced_secret("workspace-webhook-cert", namespace)

            async def healed() -> bool:
                current = await admission.read_validating_webhook_configuration(name)
                bundle = base64.b64decode(current.webhooks[0].client_config.ca_bundle)
                return (
                    bundle != bundle_c.ca_bundle
                    and first.bundle is not None
                    and first.bundle.ca_bundle == bundle
                )

            await eventually(healed, timeout=20, what="the cert manager to re-issue the deleted Secret")
            assert (tmp_path / "a" / "tls.crt").read_bytes() == first.bundle.cert  # type: ignore[union-attr]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert task.cancelled()
    finally:
        await unregister(api_client, name)


async def test_an_installer_created_empty_secret_is_filled_in_and_keeps_its_metadata(
    api_client: Any, namespace: str, tmp_path: Path
) -> None:
    """The chart (and config/webhook) create the Secret empty so that uninstalling removes it: the
    controller fills it in without dropping Helm's ownership labels and annotations."""
    core = CoreV1Api(api_client)
    helm_meta = {
        "labels": {"app.kubernetes.io/managed-by": "Helm", "app.kubernetes.io/part-of": "kaito"},
        "annotations": {"meta.helm.sh/release-name": "kaito", "meta.helm.sh/release-namespace": namespace},
    }
    await core.create_namespaced_secret(
        namespace, {"metadata": {"name": "workspace-webhook-cert", **helm_meta}, "type": "Opaque"}
    )
    bundle = await CertManager(api_client, namespace=namespace, cert_dir=tmp_path / "a").ensure()
    secret = await core.read_namespaced_secret("workspace-webhook-cert", namespace)
    assert set(secret.data) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    assert base64.b64decode(secret.data["tls.crt"]) == bundle.cert
    assert helm_meta["labels"].items() <= secret.metadata.labels.items()
    assert secret.metadata.labels["app.kubernetes.io/component"] == "webhook"
    assert helm_meta["annotations"].items() <= secret.metadata.annotations.items()
    # A rotation rewrites it again and still keeps them.
    rotated = await CertManager(
        api_client,
        namespace=namespace,
        cert_dir=tmp_path / "b",
        policy=CertPolicy(ca_renew_before=timedelta(days=3651)),
    ).ensure()
    secret = await core.read_namespaced_secret("workspace-webhook-cert", namespace)
    assert base64.b64decode(secret.data["ca.key"]) == rotated.ca_key != bundle.ca_key
    assert helm_meta["annotations"].items() <= secret.metadata.annotations.items()
    assert secret.metadata.labels["app.kubernetes.io/managed-by"] == "Helm"
