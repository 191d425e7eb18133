"""The lifecycle reconciler on the real apiserver, driving the real Azure SDK against the fake ARM.

The create/ready, delete and orphan-sweep tests run for Machines and for NodeClaims (``KINDS``), and
NodeClaims and Machines are shown to coexist without either kind touching the other's agent pools.
"""

from __future__ import annotations

import asyncio

import pytest
from kubernetes_asyncio.client import ApiClient, CoreV1Api
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import REGISTRY

from provisioner.cloud.azure import AzureProviderID
from provisioner.lifecycle.kinds import MACHINE, NODECLAIM, RequestKind
from provisioner.lifecycle.reconciler import LifecycleOptions
from test.fake_arm import ALLOCATION_FAILED, QUOTA_EXCEEDED, SKU_NOT_AVAILABLE, ArmError
from test.integration.provisioner.lifecycle.conftest import RG, SUB, AzureEnv
from test.integration.provisioner.lifecycle.helpers import (
    KINDS,
    SKU,
    Machines,
    condition,
    fresh_name,
    machine_manifest,
    mark_node_ready,
    nodes_of_pool,
    running_provisioner,
)
from test.waiting import eventually


def reconcile_count() -> float:
    """Reconciles of the lifecycle controller so far, whatever their result."""
    return sum(
        REGISTRY.get_sample_value(
            "controller_runtime_reconcile_total", {"controller": "machine-lifecycle", "result": r}
        )
        or 0
        for r in ("success", "error", "requeue", "requeue_after")
    )


async def events_of(api_client: ApiClient, name: str) -> list[tuple[str, str]]:
    """(type, reason) of the Events about Machine ``name`` (cluster-scoped objects' Events live in default)."""
    found = await CoreV1Api(api_client).list_namespaced_event(
        "default", field_selector=f"involvedObject.name={name}"
    )
    return sorted((e.type, e.reason) for e in found.items)


async def wait_node(api_client: ApiClient, pool: str) -> str:
    async def found() -> str | None:
        nodes = await nodes_of_pool(api_client, pool)
        return nodes[0].metadata.name if len(nodes) == 1 else None

    return await eventually(found, 30, f"the node of pool {pool}")


@KINDS
async def test_machine_becomes_ready_with_expected_pool(
    azure: AzureEnv, api_client: ApiClient, kind: RequestKind
) -> None:
    """PUT body as AKS expects it; registration by the node's providerID; Ready only once the node is.
    NodeClaims: the pool carries karpenter.sh/nodepool (not provisioner-name) and every condition is
    metav1-shaped (reason, message, observedGeneration), as upstream's v1 CRD requires."""
    machines = Machines(api_client, kind)
    name = fresh_name()
    async with running_provisioner(azure.cluster, azure.cloud, azure.run, kinds=(kind,)):
        created = await machines.create(machine_manifest(name, azure.run, kind=kind))
        node = await wait_node(api_client, name)

        puts = azure.arm.requests_for("PUT", name)
        assert len(puts) == 1
        props = puts[0].body["properties"]
        labels = props.pop("nodeLabels")
        assert props == {
            "type": "VirtualMachineScaleSets",
            "osType": "Linux",
            "osSKU": "Ubuntu",
            "count": 1,
            "vmSize": SKU,
            "osDiskSizeGB": 120,
            "nodeTaints": ["sku=gpu:NoSchedule"],
        }
        assert labels.pop("kaito.sh/creation-timestamp").endswith("Z")
        pool_label = (
            {"karpenter.sh/nodepool": "kaito"}
            if kind is NODECLAIM
            else {"karpenter.sh/provisioner-name": "default"}
        )
        assert labels == {
            **pool_label,
            "kaito.sh/workspace": "falcon",
            "kaito.sh/workspacenamespace": "demo",
            "kaito.test/run": azure.run,
            "kaito.sh/machine-type": "gpu",
        }

        # Registered, but not initialized while the node is not Ready.
        m = await machines.wait_condition(name, kind.registered, "True")
        await machines.wait_condition(name, kind.initialized, "Unknown", reason="NodeNotReady")
        assert condition(m, "Ready")["status"] != "True"

        await mark_node_ready(api_client, node)
        m = await machines.wait_condition(name, "Ready", "True")
        status = m["status"]
        core_node = await CoreV1Api(api_client).read_node(node)
        assert status["nodeName"] == node
        assert status["providerID"] == core_node.spec.provider_id
        parsed = AzureProviderID.parse(status["providerID"])
        assert (parsed.subscription_id, parsed.pool_name) == (SUB, name)
        assert status["allocatable"]["nvidia.com/gpu"] == "2"
        assert {c["type"] for c in status["conditions"]} >= {*kind.living, "Ready"}
        if kind is NODECLAIM:
            assert status["imageID"].startswith("AKSUbuntu-")  # the pool's nodeImageVersion
            for c in status["conditions"]:
                assert (
                    c["reason"] and "message" in c and c["observedGeneration"] == m["metadata"]["generation"]
                )
        assert core_node.metadata.labels["karpenter.sh/initialized"] == "true"
        assert any(r.uid == created["metadata"]["uid"] for r in core_node.metadata.owner_references)
        assert await events_of(api_client, name) == [
            ("Normal", "Initialized"),
            ("Normal", "Launched"),
            ("Normal", "Registered"),
        ]
        assert len(azure.arm.requests_for("PUT", name)) == 1  # never a second create


async def test_quota_error_is_reported_without_hot_loop(azure: AzureEnv, api_client: ApiClient) -> None:
    """QuotaExceeded -> a Machine condition the user can act on; events do not re-trigger the create."""
    machines = Machines(api_client)
    name = fresh_name()
    azure.arm.inject("put", QUOTA_EXCEEDED, pool=name, times=1000)
    failures = (
        REGISTRY.get_sample_value("kaito_machine_launch_failures_total", {"reason": "QuotaExceeded"}) or 0
    )
    async with running_provisioner(azure.cluster, azure.cloud, azure.run) as prov:
        await machines.create(machine_manifest(name, azure.run))
        m = await machines.wait_condition(name, "MachineLaunched", "False", reason="QuotaExceeded")
        launched = condition(m, "MachineLaunched")
        assert "quota" in launched["message"].lower()
        assert "Request a quota increase" in launched["message"]
        assert "retrying every 5 minutes" in launched["message"]
        ready = condition(m, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "QuotaExceeded")
        assert (
            REGISTRY.get_sample_value("kaito_machine_launch_failures_total", {"reason": "QuotaExceeded"})
            == failures + 1
        )

        # Poke the Machine repeatedly (metadata-only changes, as other controllers make) and let the
        # reconciler run on each: the quota backoff (5 minutes) must hold.
        before = prov.controller.queue.num_requeues(name)
        reconciles = reconcile_count()
        for i in range(5):
            await machines.patch(name, {"metadata": {"annotations": {"test/poke": str(i)}}})

        async def reconciled() -> bool:
            return reconcile_count() >= reconciles + 1

        await eventually(reconciled, 15, "the pokes to be reconciled")
        # Measure over a window (this sleep is the measurement, not synchronisation).
        await asyncio.sleep(3)
        assert len(azure.arm.requests_for("PUT", name)) == 1
        assert prov.controller.queue.num_requeues(name) == before  # no rate-limited error retries either
        assert name not in {p[3] for p in azure.arm.pools}
        # One Warning for the failure, not one per reconcile.
        assert ("Warning", "QuotaExceeded") in await events_of(api_client, name)
        assert [e for e in await events_of(api_client, name) if e[1] == "QuotaExceeded"] == [
            ("Warning", "QuotaExceeded")
        ]


@KINDS
async def test_delete_removes_pool_node_and_finalizer(
    azure: AzureEnv, api_client: ApiClient, kind: RequestKind
) -> None:
    """Deleting the Machine deletes its Node and agent pool, then releases the Machine."""
    machines = Machines(api_client, kind)
    name = fresh_name()
    async with running_provisioner(azure.cluster, azure.cloud, azure.run, kinds=(kind,)):
        await machines.create(machine_manifest(name, azure.run, kind=kind))
        node = await wait_node(api_client, name)
        m = await machines.wait_condition(name, kind.registered, "True")
        assert "karpenter.sh/termination" in m["metadata"]["finalizers"]
        terminated = REGISTRY.get_sample_value("kaito_machine_terminations_total", {"reason": "deleted"}) or 0

        await machines.delete(name)

        async def all_gone() -> bool:
            return await machines.get(name) is None

        await eventually(all_gone, 30, f"machine {name} to be released and deleted")
        assert name not in {p[3] for p in azure.arm.pools}
        assert len(azure.arm.requests_for("DELETE", name)) == 1
        try:
            await CoreV1Api(api_client).read_node(node)
            raise AssertionError(f"node {node} still exists")
        except ApiException as e:
            assert e.status == 404
        assert (
            REGISTRY.get_sample_value("kaito_machine_terminations_total", {"reason": "deleted"})
            == terminated + 1
        )


@KINDS
async def test_orphan_pool_is_swept(azure: AzureEnv, api_client: ApiClient, kind: RequestKind) -> None:
    """A Kaito pool without a Machine is deleted; a user's pool and a pool whose Machine exists are kept."""
    machines = Machines(api_client, kind)
    orphan, kept, users = fresh_name("or"), fresh_name("kp"), fresh_name("us")
    kaito_labels = {
        **(
            {"karpenter.sh/nodepool": "kaito"}
            if kind is NODECLAIM
            else {"karpenter.sh/provisioner-name": "default"}
        ),
        "kaito.sh/machine-type": "gpu",
        "kaito.sh/workspace": "gone",
        "kaito.sh/creation-timestamp": "2026-01-01T00-00-00Z",
    }
    aks = azure.config.cluster_name
    for pool in (orphan, kept):
        azure.arm.add_pool(SUB, RG, aks, pool, {"vmSize": SKU, "count": 1, "nodeLabels": kaito_labels})
    azure.arm.add_pool(SUB, RG, aks, users, {"vmSize": SKU, "count": 1, "nodeLabels": {"team": "ml"}})
    # A Machine another provisioner serves (not this one's run label): its pool is not an orphan.
    await machines.create(machine_manifest(kept, "someone-else", kind=kind))
    try:
        async with running_provisioner(
            azure.cluster, azure.cloud, azure.run, gc_interval=0.5, gc_grace=30, kinds=(kind,)
        ) as prov:
            assert prov.gc is not None

            async def swept() -> bool:
                return orphan not in {p[3] for p in azure.arm.pools}

            await eventually(swept, 30, f"orphan pool {orphan} to be deleted")
            sweeps = prov.gc.sweeps
            await eventually(
                lambda: _at_least(prov.gc.sweeps if prov.gc else 0, sweeps + 1), 10, "another sweep"
            )
            pools = {p[3] for p in azure.arm.pools}
            assert {kept, users} <= pools
            assert azure.arm.requests_for("DELETE", kept) == []
            assert azure.arm.requests_for("DELETE", users) == []
    finally:
        await machines.delete(kept)


async def _at_least(value: int, target: int) -> bool:
    return value >= target


async def test_machines_and_nodeclaims_coexist_and_never_touch_each_others_pools(
    azure: AzureEnv, api_client: ApiClient
) -> None:
    """A migration: one provisioner serves both kinds. A Machine and a NodeClaim each get their pool; a
    NodeClaim that names the Machine's pool is refused (NameConflict) and its deletion leaves the
    Machine's pool alone; the orphan sweep of a NodeClaim-only provisioner keeps the Machine's pool
    (its Machine exists) and removes a NodeClaim pool whose NodeClaim is gone."""
    machines, claims = Machines(api_client, MACHINE), Machines(api_client, NODECLAIM)
    m_name, nc_name, orphan = fresh_name("mc"), fresh_name("nc"), fresh_name("or")
    async with running_provisioner(azure.cluster, azure.cloud, azure.run, kinds=(MACHINE, NODECLAIM)):
        await machines.create(machine_manifest(m_name, azure.run, kind=MACHINE))
        await claims.create(machine_manifest(nc_name, azure.run, kind=NODECLAIM))
        await machines.wait_condition(m_name, MACHINE.registered, "True")
        await claims.wait_condition(nc_name, NODECLAIM.registered, "True")
        pools = {p[3]: p for p in azure.arm.pools}
        assert {m_name, nc_name} <= set(pools)

        # A NodeClaim of the Machine's name: refused, never adopted, its deletion deletes nothing.
        await claims.create(machine_manifest(m_name, azure.run, kind=NODECLAIM))
        nc = await claims.wait_condition(m_name, NODECLAIM.launched, "False", reason="InvalidRequest")
        assert "already exists for a Machine" in condition(nc, NODECLAIM.launched)["message"]
        await claims.delete(m_name)
        await eventually(lambda: _gone(claims, m_name), 30, f"nodeclaim {m_name} released")
        assert azure.arm.requests_for("DELETE", m_name) == []
        assert m_name in {p[3] for p in azure.arm.pools}
        machine = await machines.get(m_name)
        assert machine is not None and condition(machine, MACHINE.registered)["status"] == "True"

    # The sweep of a provisioner serving only NodeClaims: the Machine's pool is not an orphan.
    aks = azure.config.cluster_name
    labels = {
        "karpenter.sh/nodepool": "kaito",
        "kaito.sh/machine-type": "gpu",
        "kaito.sh/workspace": "gone",
        "kaito.sh/creation-timestamp": "2026-01-01T00-00-00Z",
    }
    azure.arm.add_pool(SUB, RG, aks, orphan, {"vmSize": SKU, "count": 1, "nodeLabels": labels})
    try:
        async with running_provisioner(
            azure.cluster, azure.cloud, azure.run, gc_interval=0.5, gc_grace=30, kinds=(NODECLAIM,)
        ) as prov:
            assert prov.gc is not None

            async def swept() -> bool:
                return orphan not in {p[3] for p in azure.arm.pools}

            await eventually(swept, 30, f"orphan pool {orphan} to be deleted")
            sweeps = prov.gc.sweeps
            await eventually(
                lambda: _at_least(prov.gc.sweeps if prov.gc else 0, sweeps + 1), 10, "another sweep"
            )
            assert {m_name, nc_name} <= {p[3] for p in azure.arm.pools}
            assert azure.arm.requests_for("DELETE", m_name) == []
    finally:
        async with running_provisioner(azure.cluster, azure.cloud, azure.run, kinds=(MACHINE, NODECLAIM)):
            await machines.delete(m_name)
            await claims.delete(nc_name)
            await eventually(lambda: _gone(machines, m_name), 30, f"machine {m_name} deleted")
            await eventually(lambda: _gone(claims, nc_name), 30, f"nodeclaim {nc_name} deleted")


async def _gone(objs: Machines, name: str) -> bool:
    return await objs.get(name) is None


async def test_registration_timeout_deletes_and_relaunches(azure: AzureEnv, api_client: ApiClient) -> None:
    """No Node within the registration timeout -> the pool is deleted and created again."""
    azure.arm.hooks.clear()  # AKS never registers a node this time
    machines = Machines(api_client)
    name = fresh_name()
    options = LifecycleOptions(registration_timeout=2.0, termination_poll=0.2)
    async with running_provisioner(azure.cluster, azure.cloud, azure.run, options=options):
        await machines.create(machine_manifest(name, azure.run))
        await machines.wait_condition(name, "MachineLaunched", "True")

        async def relaunched() -> bool:
            return len(azure.arm.requests_for("PUT", name)) >= 2

        await eventually(relaunched, 30, "a second PUT after the registration timeout")
        deletes = azure.arm.requests_for("DELETE", name)
        assert len(deletes) >= 1
        order = [r.method for r in azure.arm.requests if r.method in ("PUT", "DELETE") and name in r.path]
        assert order[:3] == ["PUT", "DELETE", "PUT"]


@pytest.mark.parametrize(
    ("op", "error", "reason", "hint"),
    [
        ("put", SKU_NOT_AVAILABLE, "SkuUnavailable", "Choose another instance type"),
        ("operation", ALLOCATION_FAILED, "InsufficientCapacity", "no capacity for this VM size"),
        ("put", None, "InvalidRequest", "must be 1-12 lowercase letters or digits"),
    ],
)
async def test_cloud_errors_become_condition_reasons(
    azure: AzureEnv, api_client: ApiClient, op: str, error: ArmError | None, reason: str, hint: str
) -> None:
    """Each classified ARM failure surfaces as its own MachineLaunched reason with an actionable message."""
    machines = Machines(api_client)
    # An invalid pool name (too long) is rejected before any ARM call.
    name = fresh_name() if error is not None else fresh_name("toolongname")
    if error is not None:
        azure.arm.inject(op, error, pool=name, times=1000)
    async with running_provisioner(azure.cluster, azure.cloud, azure.run):
        await machines.create(machine_manifest(name, azure.run))
        m = await machines.wait_condition(name, "MachineLaunched", "False", reason=reason)
        assert hint in condition(m, "MachineLaunched")["message"]
        assert condition(m, "Ready")["reason"] == reason
        assert len(azure.arm.requests_for("PUT", name)) == (0 if error is None else 1)


async def test_spec_change_retries_a_failed_launch_at_once(azure: AzureEnv, api_client: ApiClient) -> None:
    """The quota backoff holds for the same spec, but a changed spec (new generation) is tried at once."""
    machines = Machines(api_client)
    name = fresh_name()
    azure.arm.inject("put", QUOTA_EXCEEDED, pool=name, times=1000)
    async with running_provisioner(azure.cluster, azure.cloud, azure.run):
        await machines.create(machine_manifest(name, azure.run))
        await machines.wait_condition(name, "MachineLaunched", "False", reason="QuotaExceeded")
        assert len(azure.arm.requests_for("PUT", name)) == 1
        # A smaller VM size, as a user would pick to fit the quota.
        spec = machine_manifest(name, azure.run, sku="Standard_NC6s_v3")["spec"]
        await machines.patch(name, {"spec": {"requirements": spec["requirements"]}})

        async def second_put() -> bool:
            return len(azure.arm.requests_for("PUT", name)) == 2

        await eventually(second_put, 15, "a new PUT for the changed spec")
        assert azure.arm.requests_for("PUT", name)[1].body["properties"]["vmSize"] == "Standard_NC6s_v3"


async def test_node_lost_after_ready_relaunches_the_pool(azure: AzureEnv, api_client: ApiClient) -> None:
    """The Node vanishes after the Machine was Ready: Ready drops, and once the registration timeout has
    passed since launch the pool is deleted and created again, and the new Node is linked."""
    machines = Machines(api_client)
    name = fresh_name()
    options = LifecycleOptions(registration_timeout=3.0, termination_poll=0.2)
    async with running_provisioner(azure.cluster, azure.cloud, azure.run, options=options):
        await machines.create(machine_manifest(name, azure.run))
        node = await wait_node(api_client, name)
        await mark_node_ready(api_client, node)
        await machines.wait_condition(name, "Ready", "True")

        await CoreV1Api(api_client).delete_node(node)

        async def relaunched() -> bool:
            return len(azure.arm.requests_for("PUT", name)) == 2

        await eventually(relaunched, 30, "the pool to be created again")
        assert len(azure.arm.requests_for("DELETE", name)) == 1
        new_node = await wait_node(api_client, name)
        m = await machines.wait_condition(name, "MachineRegistered", "True")
        assert m["status"]["nodeName"] == new_node
        await mark_node_ready(api_client, new_node)
        await machines.wait_condition(name, "Ready", "True")
