"""The HTTPS admission server: real TLS, real HTTP, malformed input, certificate rotation."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from kubernetes_asyncio.client import ApiClient, Configuration
from prometheus_client import REGISTRY

from hack.localcluster import free_port
from kaito.presets.registry import PresetRegistry
from kaito.presets.skus import SkuCatalog
from kaito.runtime.kube import KubeClient
from kaito.runtime.manager import Manager, ManagerOptions
from kaito.webhook.certs import CertBundle, CertPolicy, plan_bundle, write_cert_dir
from kaito.webhook.server import INLINE_PARSE_BYTES, MUTATE_PATH, VALIDATE_PATH, WebhookServer
from kaito.webhook.validation import WorkspaceValidator
from test.waiting import eventually

WS: dict[str, Any] = {
    "apiVersion": "kaito.sh/v1alpha1",
    "kind": "Workspace",
    "metadata": {"name": "ws"},
    "resource": {"instanceType": "Standard_NC6s_v3", "labelSelector": {"matchLabels": {"apps": "phi-3"}}},
    "inference": {"preset": {"name": "phi-3-mini-4k-instruct"}},
}
KIND = {"group": "kaito.sh", "version": "v1alpha1", "kind": "Workspace"}


def review(obj: Any = WS, operation: str = "CREATE", kind: Any = KIND, old: Any = None) -> dict[str, Any]:
    request: dict[str, Any] = {"uid": "u-1", "kind": kind, "operation": operation, "namespace": "ns"}
    if obj is not None:
        request["object"] = obj
    if old is not None:
        request["oldObject"] = old
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[WebhookServer, str, ssl.SSLContext, CertBundle]]:
    bundle = plan_bundle(None, ["localhost"], ["127.0.0.1"], CertPolicy())
    assert bundle is not None
    write_cert_dir(tmp_path, bundle)
    validator = WorkspaceValidator(PresetRegistry.load(), SkuCatalog.load())
    server = WebhookServer(validator, host="127.0.0.1", port=0, cert_dir=tmp_path)
    await server.start()
    ctx = ssl.create_default_context(cadata=bundle.ca_bundle.decode())
    try:
        yield server, f"https://127.0.0.1:{server.port}", ctx, bundle
    finally:
        await server.stop()


async def post(url: str, ctx: ssl.SSLContext, body: bytes | dict[str, Any]) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, data=data, ssl=ctx, headers={"Content-Type": "application/json"}) as r,
    ):
        return r.status, await r.json()


async def test_validate_allows_and_denies(
    served: tuple[WebhookServer, str, ssl.SSLContext, CertBundle],
) -> None:
    _, base, ctx, _ = served
    status, body = await post(base + VALIDATE_PATH, ctx, review())
    assert status == 200 and body["kind"] == "AdmissionReview"
    assert body["response"] == {"uid": "u-1", "allowed": True}
    bad = {**WS, "inference": {"preset": {"name": "falcon-40b"}}}
    status, body = await post(base + VALIDATE_PATH, ctx, review(bad))
    assert status == 200
    resp = body["response"]
    assert resp["allowed"] is False and resp["status"]["code"] == 422
    assert resp["status"]["message"].startswith("resource.instanceType: Standard_NC6s_v3")


async def test_large_reviews_are_decoded_off_the_loop_with_the_same_answers(
    served: tuple[WebhookServer, str, ssl.SSLContext, CertBundle],
) -> None:
    _, base, ctx, _ = served
    padding = {"kaito.test/padding": "x" * (INLINE_PARSE_BYTES + 1024)}
    big = {**WS, "metadata": {**WS["metadata"], "annotations": padding}}
    status, body = await post(base + VALIDATE_PATH, ctx, review(big))
    assert status == 200 and body["response"]["allowed"] is True
    denied = {**big, "inference": {"preset": {"name": "falcon-40b"}}}
    status, body = await post(base + VALIDATE_PATH, ctx, review(denied))
    assert body["response"]["allowed"] is False
    status, body = await post(base + VALIDATE_PATH, ctx, b"{" + b" " * (INLINE_PARSE_BYTES + 1))
    assert status == 400 and "not JSON" in body["error"]


async def test_malformed_requests_get_errors_and_server_keeps_serving(
    served: tuple[WebhookServer, str, ssl.SSLContext, CertBundle],
) -> None:
    _, base, ctx, _ = served
    url = base + VALIDATE_PATH
    status, body = await post(url, ctx, b"{not json")
    assert status == 400 and "not JSON" in body["error"]
    status, body = await post(url, ctx, b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]
    status, body = await post(url, ctx, {"apiVersion": "v1", "kind": "Pod"})
    assert status == 400 and "AdmissionReview" in body["error"]
    status, body = await post(url, ctx, {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"})
    assert status == 400 and "request with a uid" in body["error"]
    # Wrong kind of object: a proper denial in the review.
    status, body = await post(url, ctx, review(kind={"group": "", "version": "v1", "kind": "Pod"}))
    assert status == 200 and body["response"]["allowed"] is False
    assert (
        body["response"]["status"]["code"] == 400
        and "Workspace objects only" in body["response"]["status"]["message"]
    )
    # Missing object.
    status, body = await post(url, ctx, review(obj=None))
    assert (
        body["response"]["allowed"] is False
        and "request.object is required" in body["response"]["status"]["message"]
    )
    # Object that does not parse: the message names the field.
    status, body = await post(url, ctx, review({**WS, "resource": {"count": "many", "labelSelector": {}}}))
    assert body["response"]["allowed"] is False
    assert "resource.count" in body["response"]["status"]["message"]
    # A status the model would not accept is not the webhook's business (it is the controller's).
    status, body = await post(url, ctx, review({**WS, "status": {"conditions": [{"bogus": 1}]}}))
    assert body["response"]["allowed"] is True
    # UPDATE without oldObject.
    status, body = await post(url, ctx, review(operation="UPDATE"))
    assert "request.oldObject is required" in body["response"]["status"]["message"]
    # Mutating path too.
    status, body = await post(base + MUTATE_PATH, ctx, b"\xff\xfe")
    assert status == 400
    status, body = await post(base + MUTATE_PATH, ctx, review(obj=None))
    assert body["response"]["allowed"] is False
    # Still serving.
    status, body = await post(url, ctx, review())
    assert status == 200 and body["response"]["allowed"] is True


async def test_delete_and_connect_are_allowed(
    served: tuple[WebhookServer, str, ssl.SSLContext, CertBundle],
) -> None:
    _, base, ctx, _ = served
    _, body = await post(base + VALIDATE_PATH, ctx, review(obj=None, operation="DELETE", old=WS))
    assert body["response"]["allowed"] is True


async def test_mutate_returns_json_patch(
    served: tuple[WebhookServer, str, ssl.SSLContext, CertBundle],
) -> None:
    _, base, ctx, _ = served
    obj = {**WS, "resource": {"labelSelector": {"matchLabels": {"a": "b"}}}}
    _, body = await post(base + MUTATE_PATH, ctx, review(obj))
    resp = body["response"]
    assert resp["allowed"] is True and resp["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(resp["patch"]))
    assert {"op": "add", "path": "/resource/count", "value": 1} in ops
    _, body = await post(
        base + MUTATE_PATH,
        ctx,
        review(
            {
                **obj,
                "resource": {**obj["resource"], "count": 1},
                "inference": {"preset": {"name": "x", "accessMode": "public"}},
            }
        ),
    )
    assert "patch" not in body["response"]


async def test_certificate_reload(
    served: tuple[WebhookServer, str, ssl.SSLContext, CertBundle], tmp_path: Path
) -> None:
    server, base, ctx, bundle = served
    # A new serving certificate from the same CA: clients that trust the CA keep working, and see the new cert.
    always_renew = CertPolicy(cert_renew_before=timedelta(days=400))
    rotated = plan_bundle(bundle, ["localhost"], ["127.0.0.1"], always_renew)
    assert rotated is not None and rotated.cert != bundle.cert and rotated.ca_key == bundle.ca_key
    assert server.cert_dir is not None
    write_cert_dir(server.cert_dir, rotated)
    await server.reload_certificates()
    async with aiohttp.ClientSession() as s, s.get(base + "/healthz", ssl=ctx) as r:
        assert r.status == 200
    # With SNI (a DNS name) and without it (the apiserver calling https://127.0.0.1): both see the new pair.
    for hostname in ("localhost", "127.0.0.1"):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx, server_hostname=hostname)
        peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
        assert (
            x509.load_der_x509_certificate(peer).serial_number
            == x509.load_pem_x509_certificate(rotated.cert).serial_number
        ), hostname


def test_plan_bundle_rotation_policy() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    policy = CertPolicy(ca_valid_for=timedelta(days=100), ca_renew_before=timedelta(days=10),
                        cert_valid_for=timedelta(days=30), cert_renew_before=timedelta(days=10))  # fmt: skip
    first = plan_bundle(None, ["svc.ns.svc"], [], policy, now=now)
    assert first is not None
    assert plan_bundle(first, ["svc.ns.svc"], [], policy, now=now + timedelta(days=5)) is None
    # Serving cert near expiry: new cert, same CA.
    renewed = plan_bundle(first, ["svc.ns.svc"], [], policy, now=now + timedelta(days=25))
    assert renewed is not None and renewed.ca_key == first.ca_key and renewed.cert != first.cert
    # A new DNS name forces a new cert.
    renamed = plan_bundle(first, ["svc.ns.svc", "other"], [], policy, now=now)
    assert renamed is not None and renamed.ca_key == first.ca_key
    # CA near expiry: new CA; the old one stays in the bundle while it is still valid.
    rotated = plan_bundle(first, ["svc.ns.svc"], [], policy, now=now + timedelta(days=95))
    assert rotated is not None and rotated.ca_key != first.ca_key
    cas = x509.load_pem_x509_certificates(rotated.ca_bundle)
    assert (
        len(cas) == 2
        and cas[1].serial_number == x509.load_pem_x509_certificate(first.ca_bundle).serial_number
    )
    # Garbage in the Secret: start over.
    broken = CertBundle(b"junk", b"junk", b"junk", b"junk")
    assert plan_bundle(broken, ["a"], [], policy, now=now) is not None
    roundtrip = CertBundle.from_secret_data(first.to_secret_data())
    assert roundtrip == first
    assert CertBundle.from_secret_data({"tls.crt": "x"}) is None


async def test_rule_failure_denies_with_500_and_server_keeps_serving(tmp_path: Path) -> None:
    """A failing live lookup (here: the ConfigMap read raises) denies that request only."""

    async def broken_reader(namespace: str, name: str) -> dict[str, str] | None:
        raise ConnectionResetError("apiserver went away")

    bundle = plan_bundle(None, ["localhost"], ["127.0.0.1"], CertPolicy())
    assert bundle is not None
    write_cert_dir(tmp_path, bundle)
    validator = WorkspaceValidator(PresetRegistry.load(), SkuCatalog.load(), configmaps=broken_reader)
    ctx = ssl.create_default_context(cadata=bundle.ca_bundle.decode())
    async with WebhookServer(validator, host="127.0.0.1", port=0, cert_dir=tmp_path) as server:
        url = f"https://127.0.0.1:{server.port}{VALIDATE_PATH}"
        before = REGISTRY.get_sample_value(
            "controller_runtime_webhook_requests_total", {"code": "200", "webhook": VALIDATE_PATH}
        )
        with_config = {**WS, "inference": {**WS["inference"], "config": "my-config"}}
        status, body = await post(url, ctx, review(with_config))
        assert status == 200
        assert body["response"]["allowed"] is False and body["response"]["status"]["code"] == 500
        assert "apiserver went away" in body["response"]["status"]["message"]
        status, body = await post(url, ctx, review())
        assert status == 200 and body["response"]["allowed"] is True
        after = REGISTRY.get_sample_value(
            "controller_runtime_webhook_requests_total", {"code": "200", "webhook": VALIDATE_PATH}
        )
        assert (after or 0) - (before or 0) == 2
        allowed = REGISTRY.get_sample_value(
            "kaito_webhook_decisions_total",
            {"webhook": VALIDATE_PATH, "operation": "CREATE", "allowed": "true"},
        )
        assert allowed is not None and allowed >= 1


class HeldBackServer(WebhookServer):
    """A webhook whose start waits for :attr:`go` (a slow TLS load or bind): the informers win the race."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.go = asyncio.Event()

    async def start(self) -> None:
        await self.go.wait()
        await super().start()


async def test_readyz_is_not_ready_before_the_webhook_listens(tmp_path: Path) -> None:
    bundle = plan_bundle(None, ["localhost"], ["127.0.0.1"], CertPolicy())
    assert bundle is not None
    write_cert_dir(tmp_path, bundle)
    ctx = ssl.create_default_context(cadata=bundle.ca_bundle.decode())
    port = free_port()
    server = HeldBackServer(
        WorkspaceValidator(PresetRegistry.load(), SkuCatalog.load()),
        host="127.0.0.1",
        port=port,
        cert_dir=tmp_path,
    )
    # Never contacted: no informers (synced at once), no leader election.
    api = ApiClient(Configuration(host="http://127.0.0.1:9"))
    mgr = Manager(
        KubeClient(api),
        ManagerOptions(name="webhook-ready", metrics_port=None, probe_host="127.0.0.1", probe_port=0),
    )
    rotating = asyncio.Event()

    async def rotation() -> None:
        rotating.set()
        await asyncio.Event().wait()

    server.add_to_manager(mgr, alongside=rotation)
    task = asyncio.create_task(mgr.run())
    try:
        async with asyncio.timeout(5):
            await mgr.elected.wait()  # caches synced: without the webhook check /readyz said 200 from here
        assert mgr.probe_server is not None
        readyz = f"http://127.0.0.1:{mgr.probe_server.port}/readyz"
        async with aiohttp.ClientSession() as http:
            async with http.get(readyz + "?verbose") as r:
                text = await r.text()
                assert r.status == 500, text
                assert "[+]informers-synced ok" in text and "[-]webhook failed" in text
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)

            server.go.set()

            async def ready() -> bool:
                async with http.get(readyz) as r:
                    if r.status != 200:
                        return False
                # Reported ready: the webhook answers over TLS right now.
                async with http.get(f"https://127.0.0.1:{port}/healthz", ssl=ctx) as w:
                    assert w.status == 200
                return True

            await eventually(ready, 5, "/readyz 200 once the webhook listens")
            assert rotating.is_set() and server.listening
            # A stopping webhook takes the replica out of readiness before it refuses connections.
            await server.stop()
            async with http.get(readyz) as r:
                assert r.status == 500
        mgr.stop()
        async with asyncio.timeout(10):
            await task
        assert not server.listening
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await api.close()
