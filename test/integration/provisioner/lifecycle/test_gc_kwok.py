"""The orphan sweep with the kwok cloud: a provisioner-made Node whose Machine is gone is deleted; one
whose Machine exists, and a Node the provisioner did not make, are kept."""

from __future__ import annotations

from kubernetes_asyncio.client import ApiClient, CoreV1Api
from kubernetes_asyncio.client.exceptions import ApiException

from hack.localcluster import LocalCluster
from kaito.runtime.kube import KubeClient
from provisioner.cloud.kwok import KwokCloudProvider, node_name_for
from provisioner.gc import InstanceGarbageCollector
from test.integration.provisioner.lifecycle.helpers import Machines, fresh_name, gpu_count, machine_manifest
from test.waiting import eventually


async def node_exists(core: CoreV1Api, name: str) -> bool:
    try:
        await core.read_node(name)
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


async def test_kwok_orphan_node_is_swept(machine_crd: LocalCluster, api_client: ApiClient) -> None:
    core, machines = CoreV1Api(api_client), Machines(api_client)
    cloud = KwokCloudProvider(api_client, gpu_count)
    orphan, kept = fresh_name("go"), fresh_name("gk")
    user_node = f"user-{fresh_name()}"
    try:
        await machines.create(machine_manifest(kept, "gc-kwok"))
        for name in (orphan, kept):
            await cloud.create(machine_manifest(name, "gc-kwok"))
        for name in (orphan, kept):
            await eventually(lambda n=name: node_exists(core, node_name_for(n)), 15, f"kwok node of {name}")
        # A node someone else made, with a Kaito label but not the provisioner's own labels.
        await core.create_node({"metadata": {"name": user_node, "labels": {"kaito.sh/workspace": "x"}}})

        gc = InstanceGarbageCollector(KubeClient(api_client), cloud, grace=0)
        deleted = await gc.sweep()

        assert orphan in deleted and kept not in deleted
        assert not await node_exists(core, node_name_for(orphan))
        assert await node_exists(core, node_name_for(kept))
        assert await node_exists(core, user_node)
        assert orphan not in await gc.sweep()  # idempotent: nothing left to do for it
    finally:
        await cloud.close()
        for node in (node_name_for(kept), node_name_for(orphan), user_node):
            try:
                await core.delete_node(node)
            except ApiException as e:
                if e.status != 404:
                    raise
        await machines.delete(kept)
