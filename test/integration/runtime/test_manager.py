"""Manager end to end on the real apiserver: a custom resource owning ConfigMaps, child events mapped
to the owner, status through the subresource, probes, /metrics with controller-runtime's names."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from kubernetes_asyncio.client import ApiClient
from prometheus_client.parser import text_string_to_metric_families

from kaito.runtime.controller import DONE, Result
from kaito.runtime.kube import (
    CONFIGMAPS,
    CUSTOM_RESOURCE_DEFINITIONS,
    ApiError,
    KubeClient,
    Resource,
    owner_reference,
    split_key,
)
from kaito.runtime.manager import Manager, ManagerOptions
from kaito.runtime.store import owner_indexer
from test.waiting import eventually

GROUP = "runtime.kaito.test"
WIDGETS = Resource(GROUP, "v1", "widgets", True, "Widget")

SPEC_NAMES = [
    "controller_runtime_reconcile_total",
    "controller_runtime_reconcile_errors_total",
    "controller_runtime_reconcile_time_seconds",
    "controller_runtime_max_concurrent_reconciles",
    "controller_runtime_active_workers",
    "workqueue_depth",
    "workqueue_adds_total",
    "workqueue_queue_duration_seconds",
    "workqueue_work_duration_seconds",
    "workqueue_retries_total",
    "workqueue_unfinished_work_seconds",
    "workqueue_longest_running_processor_seconds",
    "leader_election_master_status",
    "rest_client_requests_total",
]


async def ensure_crd(kube: KubeClient) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
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
                                "spec": {"type": "object", "properties": {"value": {"type": "string"}}},
                                "status": {
                                    "type": "object",
                                    "properties": {"childValue": {"type": "string"}},
                                },
                            },
                        }
                    },
                }
            ],
        },
    }
    try:
        await kube.create(CUSTOM_RESOURCE_DEFINITIONS, crd)
    except ApiError as e:
        if not e.already_exists:
            raise

    async def established() -> bool:
        got = await kube.get(CUSTOM_RESOURCE_DEFINITIONS, f"widgets.{GROUP}")
        conds = (got.get("status") or {}).get("conditions") or []
        if not any(c["type"] == "Established" and c["status"] == "True" for c in conds):
            return False
        try:
            await kube.list(WIDGETS, "default", limit=1)
        except ApiError:
            return False
        return True

    await eventually(established, 30, "the Widget CRD to be served")


@contextlib.asynccontextmanager
async def running(mgr: Manager) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(mgr.run())
    try:
        yield task
    finally:
        mgr.stop()
        async with asyncio.timeout(30):
            await task


async def test_manager_reconciles_custom_resource_and_maps_child_events_to_owner(
    api_client: ApiClient, namespace: str
) -> None:
    kube = KubeClient(api_client)
    await ensure_crd(kube)
    mgr = Manager(
        kube,
        ManagerOptions(
            name="widgets", metrics_host="127.0.0.1", metrics_port=0, probe_host="127.0.0.1", probe_port=0
        ),
    )
    widgets = mgr.informer(WIDGETS, namespace=namespace)
    children = mgr.informer(
        CONFIGMAPS, namespace=namespace, indexers={"owner": owner_indexer("Widget", GROUP)}
    )
    reconciled: list[str] = []

    async def reconcile(key: str) -> Result:
        reconciled.append(key)
        ns, name = split_key(key)
        widget = widgets.store.get(key)
        if widget is None:
            return DONE  # deleted: children go with the garbage collector
        want = widget.get("spec", {}).get("value", "")
        owned = children.store.by_index("owner", key)
        if not owned:
            child = {
                "metadata": {
                    "name": f"{name}-child",
                    "namespace": ns,
                    "ownerReferences": [owner_reference(widget)],
                },
                "data": {"v": want},
            }
            try:
                await kube.create(CONFIGMAPS, child)
            except ApiError as e:
                if not e.already_exists:
                    raise
            return DONE
        child_value = (owned[0].get("data") or {}).get("v", "")
        if (widget.get("status") or {}).get("childValue") != child_value:
            await kube.merge_patch_status(WIDGETS, name, {"childValue": child_value}, ns)
        return DONE

    mgr.add_controller("widget", reconcile, workers=2, for_=WIDGETS, owns=[CONFIGMAPS], namespace=namespace)
    assert len(mgr.informers) == 2, "the controller reuses the registered informers"

    async with running(mgr), aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

        async def ready() -> bool:
            if mgr.probe_server is None or not mgr.probe_server.port:
                return False
            async with http.get(f"http://127.0.0.1:{mgr.probe_server.port}/readyz") as r:
                return r.status == 200

        await eventually(ready, 30, "/readyz to pass once the caches synced")
        assert mgr.synced and mgr.is_leader  # no election configured: always leading

        await kube.create(
            WIDGETS,
            {
                "apiVersion": f"{GROUP}/v1",
                "kind": "Widget",
                "metadata": {"name": "w1", "namespace": namespace},
                "spec": {"value": "one"},
            },
        )

        async def status_is(value: str) -> bool:
            w = await kube.get(WIDGETS, "w1", namespace)
            return (w.get("status") or {}).get("childValue") == value

        await eventually(lambda: status_is("one"), 20, "the child to be created and mirrored in status")
        child = await kube.get(CONFIGMAPS, "w1-child", namespace)
        assert child["metadata"]["ownerReferences"][0]["kind"] == "Widget"

        # A change to the child alone must wake its owner (event mapped through the ownerReference).
        before = reconciled.count(f"{namespace}/w1")
        await kube.patch(CONFIGMAPS, "w1-child", {"data": {"v": "edited"}}, namespace)
        await eventually(lambda: status_is("edited"), 20, "the owner to be reconciled after a child change")
        assert reconciled.count(f"{namespace}/w1") > before

        # /metrics parses and carries controller-runtime's names with real values.
        assert mgr.metrics_server is not None
        async with http.get(f"http://127.0.0.1:{mgr.metrics_server.port}/metrics") as r:
            assert r.status == 200
            text = await r.text()
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                samples.setdefault(s.name, []).append((s.labels, s.value))
        present = set(samples)
        missing = [
            n
            for n in SPEC_NAMES
            if n not in present and f"{n}_count" not in present and f"{n}_bucket" not in present
        ]
        # leader_election_master_status only exists once an elector is configured in this process;
        # the two-process test checks it over HTTP.
        missing = [n for n in missing if n != "leader_election_master_status"]
        assert not missing, missing
        success = [
            v
            for lab, v in samples["controller_runtime_reconcile_total"]
            if lab == {"controller": "widget", "result": "success"}
        ]
        assert success and success[0] >= 3
        assert any(lab.get("name") == "widget" for lab, _ in samples["workqueue_adds_total"])
        assert any(
            lab.get("method") == "PATCH" and lab.get("code") == "200"
            for lab, _ in samples["rest_client_requests_total"]
        )

    # run() returned after stop(): the controller's queue is shut down and every informer stopped.
    assert all(c.queue.shutting_down for c in mgr.controllers)
    assert not mgr.is_leader
