"""The local control plane is a real kube-apiserver on real etcd: CRDs, status subresource, watches, 410."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio.client import ApiClient, ApiextensionsV1Api, CustomObjectsApi, VersionApi
from kubernetes_asyncio.client.exceptions import ApiException

from hack.localcluster import HACK_DIR, LocalCluster
from test.waiting import eventually

VERSIONS = HACK_DIR / "versions.env"
MERGE = "application/merge-patch+json"

GROUP = "foundation.kaito.test"


def _crd(plural: str, kind: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural[:-1], "kind": kind, "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                                "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                            },
                        }
                    },
                }
            ],
        },
    }


async def _wait_established(ext: ApiextensionsV1Api, name: str, timeout: float = 30) -> None:
    async def established() -> bool:
        crd = await ext.read_custom_resource_definition(name)
        return any(c.type == "Established" and c.status == "True" for c in (crd.status.conditions or []))

    await eventually(established, timeout, f"CRD {name} to be Established")


@pytest.fixture
async def widgets(api_client: ApiClient) -> tuple[str, str]:
    """A fresh CRD (unique kind per test) with a status subresource, Established."""
    suffix = secrets.token_hex(3)
    plural, kind = f"widgets{suffix}", f"Widget{suffix}"
    ext = ApiextensionsV1Api(api_client)
    await ext.create_custom_resource_definition(_crd(plural, kind))
    await _wait_established(ext, f"{plural}.{GROUP}")
    return plural, kind


async def test_version_is_stamped(api_client: ApiClient) -> None:
    """/version reports the pinned release, not the v0.0.0-master placeholder of an unstamped build."""
    info = await VersionApi(api_client).get_code()
    env = dict(line.split("=", 1) for line in VERSIONS.read_text().split() if "=" in line)
    assert info.git_version == env["K8S_VERSION"]
    assert info.major == "1"


async def test_rbac_is_enforced(control_plane: LocalCluster) -> None:
    """Authorization mode is RBAC: an unknown token is 401, an authenticated user without a binding is 403."""
    status, _ = control_plane.request("GET", "/api/v1/namespaces")
    assert status == 200
    saved = control_plane.token
    try:
        control_plane.token = "not-a-token"
        status, _ = control_plane.request("GET", "/api/v1/namespaces")
        assert status == 401
    finally:
        control_plane.token = saved
    status, body = control_plane.request(
        "POST",
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {"user": "nobody", "resourceAttributes": {"verb": "list", "resource": "secrets"}},
        },
    )
    assert status == 201, body
    assert body["status"]["allowed"] is False


async def test_crd_status_subresource_and_watch(
    api_client: ApiClient, namespace: str, widgets: tuple[str, str]
) -> None:
    """Custom objects: the main endpoint ignores status, /status ignores spec; a watch sees both changes."""
    plural, kind = widgets
    co = CustomObjectsApi(api_client)
    created = await co.create_namespaced_custom_object(
        GROUP, "v1", namespace, plural,
        {"apiVersion": f"{GROUP}/v1", "kind": kind, "metadata": {"name": "w1"}, "spec": {"size": 1},
         "status": {"phase": "ignored"}},
    )  # fmt: skip
    assert "status" not in created or created["status"].get("phase") != "ignored"
    rv = created["metadata"]["resourceVersion"]

    events: list[tuple[str, dict[str, Any]]] = []

    async def watch() -> None:
        path = f"/apis/{GROUP}/v1/namespaces/{namespace}/{plural}"
        async for ev in _raw_watch(api_client, path, rv):
            events.append((ev["type"], ev["object"]))
            if len(events) == 2:
                return

    task = asyncio.create_task(watch())
    try:
        obj = await co.patch_namespaced_custom_object_status(
            GROUP,
            "v1",
            namespace,
            plural,
            "w1",
            {"status": {"phase": "Ready"}, "spec": {"size": 9}},
            _content_type=MERGE,
        )
        assert obj["status"]["phase"] == "Ready"
        assert obj["spec"]["size"] == 1  # the status endpoint does not write spec
        await co.patch_namespaced_custom_object(
            GROUP, "v1", namespace, plural, "w1", {"spec": {"size": 2}}, _content_type=MERGE
        )
        await asyncio.wait_for(task, 20)
    finally:
        task.cancel()
    assert [t for t, _ in events] == ["MODIFIED", "MODIFIED"]
    assert events[0][1]["status"]["phase"] == "Ready"
    assert events[1][1]["spec"]["size"] == 2


async def test_stale_watch_after_compaction_gets_410(
    control_plane: LocalCluster, api_client: ApiClient, namespace: str, widgets: tuple[str, str]
) -> None:
    """After etcd compaction (and an apiserver restart, which empties its watch cache), a watch from an old
    resourceVersion gets the apiserver's real 410 Gone "too old resource version"."""
    plural, kind = widgets
    co = CustomObjectsApi(api_client)
    first = await co.create_namespaced_custom_object(
        GROUP, "v1", namespace, plural,
        {"apiVersion": f"{GROUP}/v1", "kind": kind, "metadata": {"name": "old"}, "spec": {"size": 1}},
    )  # fmt: skip
    stale_rv = first["metadata"]["resourceVersion"]
    for i in range(5):
        await co.patch_namespaced_custom_object(
            GROUP, "v1", namespace, plural, "old", {"spec": {"size": i}}, _content_type=MERGE
        )
    revision = control_plane.compact_etcd()
    assert revision > int(stale_rv)
    assert control_plane.etcd_revision_compacted(int(stale_rv))

    # The watch cache keeps recent events in memory and would still serve the old RV; a restart makes
    # the apiserver re-list from etcd, as it does in production after a restart or a long partition.
    control_plane.restart_apiserver()

    async def stale_watch_answer() -> dict[str, Any] | None:
        path = f"/apis/{GROUP}/v1/namespaces/{namespace}/{plural}"
        try:
            async for ev in _raw_watch(api_client, path, stale_rv, timeout_seconds=5):
                if ev.get("kind") == "Status":  # refused before the stream started
                    # 429 "storage is (re)initializing": the restarted watch cache is not ready yet.
                    return None if ev.get("code") == 429 else ev
                assert ev["type"] == "ERROR", f"stale RV still served: {ev['type']}"
                status: dict[str, Any] = ev["object"]
                return status
        except ApiException as e:
            body: dict[str, Any] = json.loads(e.body)
            return body
        except aiohttp.ClientError as e:  # a pooled connection to the old process
            raise AssertionError(str(e)) from e
        raise AssertionError("watch ended without an answer")

    status = await eventually(stale_watch_answer, 30, "the stale watch to be answered")
    assert status["code"] == 410, status
    assert status["reason"] == "Expired"
    assert "too old resource version" in status["message"]


async def _raw_watch(
    api_client: ApiClient, path: str, resource_version: str, timeout_seconds: int = 30
) -> Any:
    """Yield decoded watch events from a raw GET ?watch=1 (what the informer will build on)."""
    query = [
        ("watch", "1"),
        ("resourceVersion", resource_version),
        ("timeoutSeconds", str(timeout_seconds)),
        ("allowWatchBookmarks", "false"),
    ]
    resp = await api_client.call_api(
        path, "GET", query_params=query, auth_settings=["BearerToken"], _preload_content=False,
        response_types_map={},
    )  # fmt: skip
    try:
        while True:
            line = await resp.content.readline()
            if not line:
                return
            yield json.loads(line)
    finally:
        resp.release()
