"""The workspace controller and the real gpu-provisioner over the fake ARM, in one test bed.

Both run in this process against the real kube-apiserver: the workspace controller creates Machines,
the provisioner (the real Azure SDK client against ``test/fake_arm``, whose finished pools register
AKS-like Nodes) launches them and writes their status, and the workspace reports what the provisioner
wrote. No Machine status is written by hand, so the two sides' contract on condition reasons is what
is tested.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient

from hack.localcluster import LocalCluster
from kaito.machine import MACHINES, machine_name
from kaito.runtime.kube import EVENTS
from kaito.workspace.reconciler import WORKSPACES, ReconcilerOptions
from provisioner.lifecycle.reconciler import LifecycleOptions
from test.fake_arm.server import QUOTA_EXCEEDED
from test.integration.provisioner.lifecycle.helpers import (
    AzureEnv,
    fake_azure,
    mark_node_ready,
    nodes_of_pool,
    running_provisioner,
)
from test.integration.workspace.test_reconciler_integration import Env, phi3, run_operator
from test.waiting import eventually

pytestmark = pytest.mark.timeout(120)


@dataclass
class Bed:
    """The workspace controller (``ws``) and the provisioner over the fake ARM (``azure``)."""

    ws: Env
    azure: AzureEnv

    async def events(self, name: str) -> list[dict[str, Any]]:
        selector = f"involvedObject.name={name}"
        return list((await self.ws.client.list(EVENTS, self.ws.namespace, field_selector=selector))["items"])

    async def status(self, name: str) -> dict[str, Any]:
        return dict(((await self.ws.ws(name)) or {}).get("status") or {})


@contextlib.asynccontextmanager
async def both_controllers(
    cluster: LocalCluster, api_client: ApiClient, namespace: str, options: LifecycleOptions
) -> AsyncIterator[Bed]:
    async with fake_azure(cluster, api_client) as azure:
        ws_options = ReconcilerOptions(provisioning="machine", deletion_requeue=0.5)
        async with contextlib.aclosing(run_operator(api_client, namespace, ws_options)) as operator:
            async for env in operator:
                # The provisioner serves exactly the Machines of this test's workspaces.
                selector = f"kaito.sh/workspacenamespace={namespace}"
                async with running_provisioner(
                    cluster, azure.cloud, azure.run, options=options, machine_selector=selector
                ):
                    bed = Bed(env, azure)
                    try:
                        yield bed
                    finally:
                        await _delete_workspaces(bed)


async def _delete_workspaces(bed: Bed) -> None:
    """Delete what the test made while both controllers run (the provisioner removes the pools)."""
    items = (await bed.ws.client.list(WORKSPACES, bed.ws.namespace))["items"]
    for item in items:
        await bed.ws.client.delete(WORKSPACES, item["metadata"]["name"], bed.ws.namespace)

    async def gone() -> bool:
        left = await bed.ws.client.list(
            MACHINES, label_selector=f"kaito.sh/workspacenamespace={bed.ws.namespace}"
        )
        return not left["items"] and not (await bed.ws.client.list(WORKSPACES, bed.ws.namespace))["items"]

    await eventually(gone, 60, "the workspaces and their Machines to be deleted")


async def test_quota_exceeded_from_arm_reaches_the_workspace(
    crds: LocalCluster, api_client: ApiClient, namespace: str
) -> None:
    """ARM refuses the pool for quota: the provisioner's QuotaExceeded becomes the workspace's reason,
    with ARM's actionable message and one Warning -- and only one pool PUT (the quota backoff holds)."""
    async with both_controllers(crds, api_client, namespace, LifecycleOptions(termination_poll=0.2)) as bed:
        pool = machine_name(namespace, "quota", 0)
        bed.azure.arm.inject("put", QUOTA_EXCEEDED, pool=pool, times=1000)
        labels = {"apps": f"quota-{namespace[-6:]}"}
        await bed.ws.client.create(WORKSPACES, phi3("quota", labels), namespace)

        async def quota() -> dict[str, Any] | None:
            status = await bed.status("quota")
            return status if status.get("reason") == "QuotaExceeded" else None

        status = await eventually(quota, 30, "the workspace's state reason QuotaExceeded")
        assert status["state"] == "NotReady"
        resource = await bed.ws.condition("quota", "ResourceReady")
        assert resource is not None and resource["status"] == "False"
        assert "quota" in resource["message"].lower() and "Request a quota increase" in resource["message"]

        async def warned() -> list[dict[str, Any]]:
            return [e for e in await bed.events("quota") if e["type"] == "Warning"]

        warnings = await eventually(warned, 20, "a Warning Event on the workspace")
        assert any("QuotaExceeded" in e["message"] for e in warnings), warnings
        assert len(bed.azure.arm.requests_for("PUT", pool)) == 1


async def test_registration_timeout_is_a_recovery_not_a_failure(
    crds: LocalCluster, api_client: ApiClient, namespace: str
) -> None:
    """No Node registers in time: the provisioner deletes and relaunches the pool while its Machine says
    MachineLaunched=False/RegistrationTimeout. The workspace keeps Provisioning (saying why), shows no
    ProvisioningFailed and records no Warning; once the relaunched pool's Node registers it is ready.

    termination_poll=3 s keeps the Machine in RegistrationTimeout for seconds (the provisioner looks at
    the deleted pool again only then), so the workspace controller certainly sees that state.
    """
    options = LifecycleOptions(registration_timeout=2.0, termination_poll=3.0)
    async with both_controllers(crds, api_client, namespace, options) as bed:
        (simulator,) = bed.azure.arm.hooks
        unregistered: list[str] = []

        async def first_pool_never_registers(event: str, pool: dict[str, Any]) -> None:
            if event == "ready" and not unregistered:
                unregistered.append(str(pool["name"]))  # AKS never brings this pool's Node up
                return
            await simulator(event, pool)

        bed.azure.arm.hooks[:] = [first_pool_never_registers]
        pool = machine_name(namespace, "late", 0)
        labels = {"apps": f"late-{namespace[-6:]}"}
        await bed.ws.client.create(WORKSPACES, phi3("late", labels), namespace)

        async def relaunching() -> dict[str, Any] | None:
            c = await bed.ws.condition("late", "ResourceReady")
            return c if c is not None and "no node registered" in c["message"] else None

        seen = await eventually(relaunching, 90, "the workspace to report the provisioner's relaunch")
        status = await bed.status("late")
        assert (status.get("state"), status.get("reason")) == ("Pending", "Provisioning"), status
        assert seen["status"] == "Unknown", seen
        machine = await bed.ws.client.get(MACHINES, pool)
        launched = next(c for c in machine["status"]["conditions"] if c["type"] == "MachineLaunched")
        # On a loaded machine the relaunch can already have happened by now (Launched again); until
        # then the Machine says why it is not launched.
        if launched["status"] == "False":
            assert launched["reason"] == "RegistrationTimeout", launched

        async def node() -> str | None:
            nodes = await nodes_of_pool(api_client, pool)
            return nodes[0].metadata.name if nodes else None

        await mark_node_ready(api_client, await eventually(node, 30, "the relaunched pool's Node"))

        async def resource_ready() -> dict[str, Any] | None:
            c = await bed.ws.condition("late", "ResourceReady")
            return c if c is not None and c["status"] == "True" else None

        await eventually(resource_ready, 30, "ResourceReady=True after the relaunch")
        order = [r.method for r in bed.azure.arm.requests if r.method in ("PUT", "DELETE") and pool in r.path]
        assert order[:3] == ["PUT", "DELETE", "PUT"], order
        warnings = [e for e in await bed.events("late") if e["type"] == "Warning"]
        assert warnings == [], [(e["reason"], e["message"]) for e in warnings]
