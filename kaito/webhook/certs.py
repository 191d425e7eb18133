"""Self-managed webhook certificates: no cert-manager needed.

Every replica runs :class:`CertManager`. The key material lives in one Secret (default
``workspace-webhook-cert``): ``ca.crt`` (the trusted CA bundle, newest first), ``ca.key``, ``tls.crt``,
``tls.key``. The first replica to start creates it; the others read it (a create that hits
AlreadyExists re-reads); where an installer created it empty (the Helm chart and config/webhook do, so
that uninstalling removes it) the first replica fills it in, keeping the installer's labels and
annotations. Rotation is optimistic: whoever sees the serving certificate close to expiry
writes a new one with the Secret's resourceVersion, so two replicas cannot both win. When the CA itself
is close to expiry a new CA is made and the old one stays in ``ca.crt`` until it expires, so replicas
still presenting a certificate from the old CA stay trusted during the hand-over. Each pass also writes
the bundle into the validating and mutating webhook configurations (``clientConfig.caBundle``) when it
differs, and hands the key pair to the server through ``cert_dir`` + ``on_change``.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes_asyncio.client import AdmissionregistrationV1Api, ApiClient, CoreV1Api
from kubernetes_asyncio.client.exceptions import ApiException

log = structlog.get_logger("kaito.webhook.certs")

CA_CERT_KEY = "ca.crt"
CA_KEY_KEY = "ca.key"
TLS_CERT_KEY = "tls.crt"
TLS_KEY_KEY = "tls.key"


@dataclass(frozen=True)
class CertBundle:
    """PEM material. ``ca_bundle`` may hold several CA certificates (newest first)."""

    ca_bundle: bytes
    ca_key: bytes
    cert: bytes
    key: bytes

    def to_secret_data(self) -> dict[str, str]:
        """Base64 Secret ``data``."""
        return {
            CA_CERT_KEY: base64.b64encode(self.ca_bundle).decode(),
            CA_KEY_KEY: base64.b64encode(self.ca_key).decode(),
            TLS_CERT_KEY: base64.b64encode(self.cert).decode(),
            TLS_KEY_KEY: base64.b64encode(self.key).decode(),
        }

    @classmethod
    def from_secret_data(cls, data: dict[str, str] | None) -> CertBundle | None:
        """Parse Secret ``data``; None when a key is missing or not base64."""
        if not data or any(k not in data for k in (CA_CERT_KEY, CA_KEY_KEY, TLS_CERT_KEY, TLS_KEY_KEY)):
            return None
        try:
            return cls(
                base64.b64decode(data[CA_CERT_KEY]),
                base64.b64decode(data[CA_KEY_KEY]),
                base64.b64decode(data[TLS_CERT_KEY]),
                base64.b64decode(data[TLS_KEY_KEY]),
            )
        except ValueError:
            return None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate_ca(common_name: str, valid_for: timedelta, now: datetime | None = None) -> tuple[bytes, bytes]:
    """A self-signed CA: (certificate PEM, key PEM). ECDSA P-256 keys: fast to make, accepted by the apiserver."""
    now = now or datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def generate_serving_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str] = (),
    valid_for: timedelta = timedelta(days=365),
    now: datetime | None = None,
) -> tuple[bytes, bytes]:
    """A server certificate signed by the CA: (certificate PEM, key PEM)."""
    now = now or datetime.now(UTC)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("CA key must be an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    common_name = dns_names[0] if dns_names else (ip_addresses[0] if ip_addresses else "kaito-webhook")
    not_after = min(now + valid_for, ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _split_pems(bundle: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle)


def remaining(cert_pem: bytes, now: datetime | None = None) -> timedelta:
    """Time until the (first) certificate in ``cert_pem`` expires."""
    now = now or datetime.now(UTC)
    return _split_pems(cert_pem)[0].not_valid_after_utc - now


def _names_match(cert_pem: bytes, dns_names: Sequence[str], ip_addresses: Sequence[str]) -> bool:
    cert = _split_pems(cert_pem)[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have_dns = set(san.get_values_for_type(x509.DNSName))
    have_ip = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return set(dns_names) <= have_dns and {str(ipaddress.ip_address(i)) for i in ip_addresses} <= have_ip


def _signed_by(cert_pem: bytes, ca_pem: bytes) -> bool:
    cert = _split_pems(cert_pem)[0]
    ca = _split_pems(ca_pem)[0]
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception):
        return False
    return True


@dataclass(frozen=True)
class CertPolicy:
    """Lifetimes and when to renew."""

    ca_valid_for: timedelta = timedelta(days=3650)
    ca_renew_before: timedelta = timedelta(days=365)
    cert_valid_for: timedelta = timedelta(days=365)
    cert_renew_before: timedelta = timedelta(days=90)


def plan_bundle(
    current: CertBundle | None,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    policy: CertPolicy,
    now: datetime | None = None,
) -> CertBundle | None:
    """The bundle to store, or None when ``current`` is still good (pure: no I/O, testable with a clock)."""
    now = now or datetime.now(UTC)
    try:
        ca_ok = current is not None and remaining(current.ca_bundle, now) > policy.ca_renew_before
    except ValueError:
        ca_ok = False
    if current is not None and ca_ok:
        try:
            cert_ok = (
                remaining(current.cert, now) > policy.cert_renew_before
                and _names_match(current.cert, dns_names, ip_addresses)
                and _signed_by(current.cert, current.ca_bundle)
            )
        except ValueError:
            cert_ok = False
        if cert_ok:
            return None
        cert, key = generate_serving_cert(
            current.ca_bundle, current.ca_key, dns_names, ip_addresses, policy.cert_valid_for, now
        )
        first_ca = _split_pems(current.ca_bundle)[0].public_bytes(serialization.Encoding.PEM)
        return CertBundle(first_ca + _still_valid_tail(current.ca_bundle, now), current.ca_key, cert, key)
    ca_cert, ca_key = generate_ca("kaito-webhook-ca", policy.ca_valid_for, now)
    cert, key = generate_serving_cert(ca_cert, ca_key, dns_names, ip_addresses, policy.cert_valid_for, now)
    old_cas = b""
    if current is not None:
        try:
            old_cas = b"".join(
                c.public_bytes(serialization.Encoding.PEM)
                for c in _split_pems(current.ca_bundle)
                if c.not_valid_after_utc > now
            )
        except ValueError:
            old_cas = b""
    return CertBundle(ca_cert + old_cas, ca_key, cert, key)


def _still_valid_tail(bundle: bytes, now: datetime) -> bytes:
    """CA certificates after the first that have not expired (kept while old serving certs may be in use)."""
    return b"".join(
        c.public_bytes(serialization.Encoding.PEM)
        for c in _split_pems(bundle)[1:]
        if c.not_valid_after_utc > now
    )


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names the apiserver may use for an in-cluster webhook Service."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def write_cert_dir(directory: Path, bundle: CertBundle) -> bool:
    """Write ``tls.crt``/``tls.key``/``ca.crt`` atomically; return whether anything changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = False
    for name, content, mode in (
        ("ca.crt", bundle.ca_bundle, 0o644),
        ("tls.crt", bundle.cert, 0o644),
        ("tls.key", bundle.key, 0o600),
    ):
        path = directory / name
        if path.exists() and path.read_bytes() == content:
            continue
        tmp = directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        tmp.replace(path)  # atomic: the server never reads a half-written key
        changed = True
    return changed


class CertManager:
    """Creates, rotates and distributes the webhook certificate (see the module docstring).

    Usage from the entry point::

        certs = CertManager(api, namespace="kaito-system", service="kaito-workspace-webhook",
                            cert_dir=Path("/tmp/kaito-webhook-certs"),
                            validating_webhooks=["validation.workspace.kaito.sh"],
                            mutating_webhooks=["mutation.workspace.kaito.sh"])
        await certs.ensure()                       # before WebhookServer.start()
        certs.on_change = server.reload_certificates
        task = asyncio.create_task(certs.run())    # owner cancels and awaits it on shutdown
    """

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        cert_dir: Path,
        secret_name: str = "workspace-webhook-cert",
        service: str | None = "kaito-workspace-webhook",
        extra_dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        validating_webhooks: Sequence[str] = (),
        mutating_webhooks: Sequence[str] = (),
        policy: CertPolicy | None = None,
        check_interval: float = 300.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._api_client = api_client
        self.core = CoreV1Api(api_client)
        self.admission = AdmissionregistrationV1Api(api_client)
        self.namespace = namespace
        self.secret_name = secret_name
        self.cert_dir = cert_dir
        self.dns_names = [*(service_dns_names(service, namespace) if service else []), *extra_dns_names]
        self.ip_addresses = list(ip_addresses)
        self.validating_webhooks = list(validating_webhooks)
        self.mutating_webhooks = list(mutating_webhooks)
        self.policy = policy or CertPolicy()
        self.check_interval = check_interval
        self.on_change = on_change
        self.bundle: CertBundle | None = None

    async def _read_secret(self) -> tuple[CertBundle | None, str | None, dict[str, Any] | None]:
        """(bundle, resourceVersion, the metadata to keep on a rewrite: None when there is no Secret)."""
        try:
            secret = await self.core.read_namespaced_secret(self.secret_name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None, None, None
            raise
        meta = secret.metadata
        kept: dict[str, Any] = {
            "labels": dict(meta.labels or {}),
            "annotations": dict(meta.annotations or {}),
        }
        if meta.owner_references:
            kept["ownerReferences"] = self._api_client.sanitize_for_serialization(meta.owner_references)
        return CertBundle.from_secret_data(secret.data), meta.resource_version, kept

    async def _store(
        self, bundle: CertBundle, resource_version: str | None, existing: dict[str, Any] | None
    ) -> bool:
        """Write the Secret; False when another replica won the race (then re-read).

        A rewrite keeps the existing labels, annotations and owners (an installer's bookkeeping: Helm
        finds its object unchanged), adding ours only where a label is unset."""
        ours = {"app.kubernetes.io/managed-by": "kaito", "app.kubernetes.io/component": "webhook"}
        kept = existing or {}
        metadata: dict[str, Any] = {
            "name": self.secret_name,
            "namespace": self.namespace,
            **kept,
            "labels": {**ours, **kept.get("labels", {})},
        }
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata,
            "type": "Opaque",
            "data": bundle.to_secret_data(),
        }
        try:
            if existing is not None:
                body["metadata"]["resourceVersion"] = resource_version
                await self.core.replace_namespaced_secret(self.secret_name, self.namespace, cast(Any, body))
            else:
                await self.core.create_namespaced_secret(self.namespace, cast(Any, body))
        except ApiException as e:
            if e.status in (409,):
                return False
            raise
        return True

    async def ensure(self) -> CertBundle:
        """One pass: make sure a valid bundle is stored, on disk and in the webhook configurations."""
        for _ in range(5):
            current, rv, existing = await self._read_secret()
            planned = await asyncio.to_thread(
                plan_bundle, current, self.dns_names, self.ip_addresses, self.policy
            )
            if planned is None:
                assert current is not None
                bundle = current
                break
            if await self._store(planned, rv, existing):
                log.info("webhook certificate issued", secret=self.secret_name, namespace=self.namespace)
                bundle = planned
                break
        else:
            raise RuntimeError(
                f"could not settle Secret {self.namespace}/{self.secret_name} after 5 conflicts"
            )
        changed = await asyncio.to_thread(write_cert_dir, self.cert_dir, bundle)
        self.bundle = bundle
        await self.patch_ca_bundles(bundle.ca_bundle)
        if changed and self.on_change is not None:
            self.on_change()
        return bundle

    async def patch_ca_bundles(self, ca_bundle: bytes) -> None:
        """Write ``caBundle`` into every webhook of the configured configurations (only where it differs)."""
        encoded = base64.b64encode(ca_bundle).decode()
        for name in self.validating_webhooks:
            try:
                cfg = await self.admission.read_validating_webhook_configuration(name)
            except ApiException as e:
                if e.status == 404:
                    log.warning("validating webhook configuration missing", name=name)
                    continue
                raise
            hooks = [w.name for w in cfg.webhooks or [] if (w.client_config.ca_bundle or "") != encoded]
            if hooks:
                patch = {"webhooks": [{"name": h, "clientConfig": {"caBundle": encoded}} for h in hooks]}
                await self.admission.patch_validating_webhook_configuration(name, patch)
                log.info("caBundle updated", configuration=name, kind="validating")
        for name in self.mutating_webhooks:
            try:
                mcfg = await self.admission.read_mutating_webhook_configuration(name)
            except ApiException as e:
                if e.status == 404:
                    log.warning("mutating webhook configuration missing", name=name)
                    continue
                raise
            hooks = [w.name for w in mcfg.webhooks or [] if (w.client_config.ca_bundle or "") != encoded]
            if hooks:
                patch = {"webhooks": [{"name": h, "clientConfig": {"caBundle": encoded}} for h in hooks]}
                await self.admission.patch_mutating_webhook_configuration(name, patch)
                log.info("caBundle updated", configuration=name, kind="mutating")

    async def run(self) -> None:
        """Re-check every ``check_interval`` seconds until cancelled; errors are logged and retried."""
        while True:
            try:
                await self.ensure()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook certificate check failed; retrying", secret=self.secret_name)
            await asyncio.sleep(self.check_interval)
