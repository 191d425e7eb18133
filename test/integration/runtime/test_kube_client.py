"""KubeClient (the reconcilers' REST helper) against the real apiserver: verbs, patch types, typed errors."""

from __future__ import annotations

import pytest
from kubernetes_asyncio.client import ApiClient

from kaito.runtime.events import EventRecorder
from kaito.runtime.kube import CONFIGMAPS, DEPLOYMENTS, EVENTS, NAMESPACES, ApiError, KubeClient
from kaito.runtime.metrics import REGISTRY


async def test_crud_patch_types_and_errors(api_client: ApiClient, namespace: str) -> None:
    kube = KubeClient(api_client)
    body = {"metadata": {"name": "c", "namespace": namespace, "labels": {"a": "1"}}, "data": {"k": "v"}}
    created = await kube.create(CONFIGMAPS, body)
    assert created["metadata"]["uid"] and created["data"] == {"k": "v"}

    with pytest.raises(ApiError) as exists:
        await kube.create(CONFIGMAPS, body)
    assert exists.value.already_exists and exists.value.status == 409 and not exists.value.conflict

    merged = await kube.patch(CONFIGMAPS, "c", {"data": {"k2": "v2"}}, namespace)
    assert merged["data"] == {"k": "v", "k2": "v2"}
    jsonp = await kube.patch(
        CONFIGMAPS, "c", [{"op": "remove", "path": "/data/k"}], namespace, patch_type="json"
    )
    assert jsonp["data"] == {"k2": "v2"}
    applied = await kube.patch(
        CONFIGMAPS,
        "c",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"owned": "yes"}},
        namespace,
        patch_type="apply",
        field_manager="kaito-test",
        force=True,
    )
    assert applied["data"]["owned"] == "yes"

    # Optimistic concurrency: a PUT with a stale resourceVersion is a Conflict, not AlreadyExists.
    stale = dict(created)
    stale["data"] = {"x": "y"}
    with pytest.raises(ApiError) as conflict:
        await kube.replace(CONFIGMAPS, stale)
    assert conflict.value.conflict and conflict.value.status == 409

    fresh = await kube.get(CONFIGMAPS, "c", namespace)
    fresh["data"] = {"replaced": "1"}
    replaced = await kube.replace(CONFIGMAPS, fresh)
    assert replaced["data"] == {"replaced": "1"}

    assert await kube.get_or_none(CONFIGMAPS, "missing", namespace) is None
    with pytest.raises(ApiError) as missing:
        await kube.get(CONFIGMAPS, "missing", namespace)
    assert missing.value.not_found and missing.value.reason == "NotFound"

    with pytest.raises(ApiError) as invalid:
        await kube.create(CONFIGMAPS, {"metadata": {"name": "Bad_Name", "namespace": namespace}})
    assert invalid.value.status == 422 and invalid.value.reason == "Invalid"

    items = await kube.list_all(CONFIGMAPS, namespace, label_selector="a=1", page_size=1)
    assert [i["metadata"]["name"] for i in items] == ["c"]

    with pytest.raises(ApiError) as precondition:
        await kube.delete(CONFIGMAPS, "c", namespace, preconditions={"uid": "not-the-uid"})
    assert precondition.value.status == 409
    assert await kube.delete(CONFIGMAPS, "c", namespace) is not None
    assert await kube.delete(CONFIGMAPS, "c", namespace) is None, "already gone"

    ns = await kube.get(NAMESPACES, namespace)
    assert ns["metadata"]["name"] == namespace
    assert (
        REGISTRY.get_sample_value(
            "rest_client_requests_total", {"code": "404", "method": "GET", "host": kube.host}
        )
        or 0
    ) >= 1


async def test_status_subresource_merge_patch(api_client: ApiClient, namespace: str) -> None:
    kube = KubeClient(api_client)
    dep = {
        "metadata": {"name": "d", "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "d"}},
            "template": {
                "metadata": {"labels": {"app": "d"}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            },
        },
    }
    await kube.create(DEPLOYMENTS, dep)
    patched = await kube.merge_patch_status(DEPLOYMENTS, "d", {"observedGeneration": 7}, namespace)
    assert patched["status"]["observedGeneration"] == 7
    # A status write cannot change the spec.
    again = await kube.patch(DEPLOYMENTS, "d", {"spec": {"replicas": 5}}, namespace, subresource="status")
    assert again["spec"]["replicas"] == 1


async def test_event_messages_are_redacted(api_client: ApiClient, namespace: str) -> None:
    """An Event quoting a credential (a container's message, a cloud error) is stored redacted: anyone
    who may list Events in the namespace reads them."""
    kube = KubeClient(api_client)
    cm = await kube.create(CONFIGMAPS, {"metadata": {"name": "ev", "namespace": namespace}})
    recorder = EventRecorder(kube, "kaito-test", api_version="v1", kind="ConfigMap")
    await recorder.event(
        cm, "Warning", "PullFailed", "pull https://robot:hunter2@registry.example/x failed: Bearer abc123def"
    )
    events = (await kube.list(EVENTS, namespace, field_selector="involvedObject.name=ev"))["items"]
    assert [e["message"] for e in events] == [
        "pull https://[redacted]@registry.example/x failed: Bearer [redacted]"
    ]
