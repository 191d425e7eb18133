"""kwok cloud provider: each Machine becomes a fake GPU Node that kwok keeps Ready.

For local clusters, demos and tests there is no cloud: "launching" a Machine creates a Node annotated
``kwok.x-k8s.io/node: fake`` (kwok's controller then maintains its status and heartbeats) that looks
like the node AKS would register for the Machine's agent pool: an AKS-style name
(``aks-<machine>-<8 digits>-vmss000000``), the ``agentpool`` / ``kubernetes.azure.com/agentpool``
labels, the instance-type label, ``kaito.sh/machine-type``, the Machine's labels and taints, and
``nvidia.com/gpu`` capacity from the SKU's GPU count. A CPU SKU (no GPUs) gets a node without
``nvidia.com/gpu``, labelled ``kaito.sh/machine-type: cpu``, whose CPU and memory capacity are the
SKU's (``node_capacity``), so CPU workloads schedule against the numbers the real VM would have.
Its providerID is ``kwok://<node-name>``.

The Node appears after a configurable delay, like a real VM that takes a while to join: ``create``
returns a PENDING Instance at once and a task owned by the provider creates the Node later. ``close``
cancels and awaits those tasks. A pending creation lives in this process only; after a restart ``get``
reports NotFound for it and the lifecycle launches again.
"""

from __future__ import annotations

import asyncio
import builtins
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import aiohttp
import structlog
from kubernetes_asyncio.client import ApiClient, CoreV1Api
from kubernetes_asyncio.client.exceptions import ApiException

from provisioner import machine_fields as mf
from provisioner.cloud.azure import AGENTPOOL_LABEL, AKS_AGENTPOOL_LABEL, is_managed_pool, validate_pool_name
from provisioner.cloud.base import (
    AuthFailed,
    CloudError,
    CloudProvider,
    Conflict,
    Instance,
    InstanceState,
    InvalidRequest,
    NotFound,
    SkuUnavailable,
)
from provisioner.machine_fields import MachineDict, MachineFieldError, Taint

log = structlog.get_logger(__name__)

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
PROVIDER_ID_PREFIX = "kwok://"
GPU_RESOURCE = "nvidia.com/gpu"

DEFAULT_CAPACITY: Mapping[str, str] = {"cpu": "32", "memory": "256Gi", "pods": "110"}
"""Non-GPU capacity of every fake node (the GPU count is what matters to Kaito)."""

_NODE_NAME_RE = re.compile(r"^aks-(?P<pool>.+)-\d{8}-vmss000000$")


def node_name_for(machine_name: str) -> str:
    """The AKS-style Node name for a Machine: ``aks-<machine>-<8 stable digits>-vmss000000``.

    Deliberately not the Machine name, so code that links Nodes to Machines has to go through the
    providerID or the agentpool labels, exactly as it must on AKS.
    """
    digits = zlib.crc32(machine_name.encode()) % 10**8
    return f"aks-{machine_name}-{digits:08d}-vmss000000"


def provider_id_for(node_name: str) -> str:
    """``kwok://<node-name>``."""
    return f"{PROVIDER_ID_PREFIX}{node_name}"


def machine_name_from_ref(ref: str) -> str:
    """The Machine name for a Machine name or a ``kwok://`` providerID."""
    if not ref.startswith(PROVIDER_ID_PREFIX):
        return ref
    match = _NODE_NAME_RE.match(ref[len(PROVIDER_ID_PREFIX) :])
    if not match:
        raise InvalidRequest(
            f"providerID {ref!r} does not name a node this provider creates", code="InvalidProviderID"
        )
    return match["pool"]


def node_manifest(
    machine: MachineDict,
    gpus: int,
    *,
    base_capacity: Mapping[str, str] = DEFAULT_CAPACITY,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The Node object kwok should run for a Machine (pure; raises InvalidRequest for a bad Machine)."""
    try:
        name = mf.machine_name(machine)
        sku = mf.require_instance_type(machine)
        taints = mf.taints(machine)
    except MachineFieldError as e:
        raise InvalidRequest(str(e), code="InvalidMachine") from e
    node = node_name_for(name)
    created = mf.creation_timestamp(machine) or now or datetime.now(UTC)
    # Same label layering as the Azure agent pool (defaults < Machine labels < provider facts), plus
    # what AKS itself puts on every node.
    labels = {mf.PROVISIONER_NAME_LABEL: "default"}
    labels.update(mf.machine_labels(machine))
    labels.update(
        {
            mf.MACHINE_TYPE_LABEL: "gpu" if gpus > 0 else "cpu",
            mf.CREATION_TIMESTAMP_LABEL: mf.format_creation_label(created),
            mf.INSTANCE_TYPE_LABEL: sku,
            AGENTPOOL_LABEL: name,
            AKS_AGENTPOOL_LABEL: name,
            "kubernetes.io/hostname": node,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
        }
    )
    if gpus > 0:
        labels["accelerator"] = "nvidia"  # AKS labels GPU nodes so; Kaito checks it for N-series SKUs
    capacity = dict(base_capacity)
    storage = mf.storage_request(machine)
    if storage:
        capacity["ephemeral-storage"] = storage
    if gpus > 0:
        capacity[GPU_RESOURCE] = str(gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node,
            "labels": labels,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"providerID": provider_id_for(node), "taints": [t.to_dict() for t in taints]},
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }


def instance_from_node(node: Mapping[str, Any]) -> Instance:
    """Convert a Node (JSON shape) created by this provider to an Instance."""
    meta = node.get("metadata") or {}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    spec = node.get("spec") or {}
    status = node.get("status") or {}
    name = labels.get(AGENTPOOL_LABEL, "")
    taints = tuple(
        Taint(key=str(t["key"]), effect=str(t["effect"]), value=str(t.get("value") or ""))
        for t in spec.get("taints") or []
        if t.get("key") and t.get("effect")
    )
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    state = InstanceState.DELETING if meta.get("deletionTimestamp") else InstanceState.RUNNING
    return Instance(
        name=name,
        provider_id=str(spec.get("providerID") or ""),
        instance_type=labels.get(mf.INSTANCE_TYPE_LABEL, ""),
        labels=labels,
        taints=taints,
        capacity={str(k): str(v) for k, v in (status.get("capacity") or {}).items()},
        state=state,
        node_selector={AGENTPOOL_LABEL: name, AKS_AGENTPOOL_LABEL: name},
        machine_name=name,
        created_at=mf.parse_creation_label(labels.get(mf.CREATION_TIMESTAMP_LABEL, "")),
        detail="Ready" if ready else "NotReady",
    )


def classify_kube_error(exc: BaseException, *, operation: str, node: str) -> CloudError:
    """Map a kubernetes_asyncio/aiohttp failure to a typed CloudError."""
    if isinstance(exc, CloudError):
        return exc
    what = f"{operation} kwok node {node}"
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        text = f"HTTP {status} {exc.reason or ''}".strip()
        if status == 404:
            return NotFound(f"{what}: not found", code="NotFound")
        if status == 409:
            return Conflict(f"{what}: conflict ({text})", code="Conflict", backoff=1.0)
        if status in (401, 403):
            return AuthFailed(
                f"{what}: the provisioner may not manage Nodes ({text}); check its RBAC", code=text
            )
        if status in (400, 422):
            return InvalidRequest(f"{what}: the API server rejected the Node ({text})", code="Invalid")
        if status == 429 or status >= 500:
            # The apiserver is busy or briefly failing: try again soon, not after the generic 30 s.
            return CloudError(f"{what}: {text}", code=str(status), backoff=2.0)
        return CloudError(f"{what}: {text}", code=str(status))
    if isinstance(exc, aiohttp.ClientError | TimeoutError | OSError):
        return CloudError(f"{what}: cannot reach the API server: {exc}", code="Transport", backoff=5.0)
    return CloudError(f"{what}: {type(exc).__name__}: {exc}", code=type(exc).__name__)


@dataclass
class _Pending:
    node: dict[str, Any]
    task: asyncio.Task[None]


class KwokCloudProvider(CloudProvider):
    """Machines as kwok-managed fake Nodes in the cluster ``api_client`` talks to."""

    name = "kwok"

    def __init__(
        self,
        api_client: ApiClient,
        gpu_count: Callable[[str], int],
        *,
        delay: float = 0.0,
        base_capacity: Mapping[str, str] = DEFAULT_CAPACITY,
        strict_names: bool = True,
        node_capacity: Callable[[str], Mapping[str, str]] | None = None,
    ) -> None:
        """``gpu_count(instance_type)`` gives the SKU's GPUs (raise KeyError/ValueError for an unknown SKU).

        ``node_capacity(instance_type)``: capacity entries (``cpu``, ``memory``) that replace
        ``base_capacity``'s for that SKU (the catalog's vCPUs and memory of a CPU SKU; empty: keep them).

        ``delay``: seconds between ``create`` and the Node appearing. ``strict_names``: apply AKS's
        agent-pool name rule to Machine names, so local runs fail the way AKS would.
        """
        self._api = api_client
        self._core = CoreV1Api(api_client)
        self._gpu_count = gpu_count
        self._delay = delay
        self._base_capacity = dict(base_capacity)
        self._strict_names = strict_names
        self._node_capacity = node_capacity
        self._pending: dict[str, _Pending] = {}
        self._failed: dict[str, CloudError] = {}
        self._closed = False

    async def _read_node(self, node: str, operation: str) -> dict[str, Any] | None:
        try:
            obj = await self._core.read_node(node)
        except ApiException as e:
            if e.status == 404:
                return None
            raise classify_kube_error(e, operation=operation, node=node) from e
        except Exception as e:
            raise classify_kube_error(e, operation=operation, node=node) from e
        return cast(dict[str, Any], self._api.sanitize_for_serialization(obj))

    def _pending_instance(self, pending: _Pending) -> Instance:
        base = instance_from_node(pending.node)
        return Instance(
            name=base.name,
            provider_id=base.provider_id,
            instance_type=base.instance_type,
            labels=base.labels,
            taints=base.taints,
            capacity=base.capacity,
            state=InstanceState.PENDING,
            node_selector=base.node_selector,
            machine_name=base.machine_name,
            created_at=base.created_at,
            detail="NodePending",
        )

    async def create(self, machine: MachineDict) -> Instance:
        """Schedule the Node's creation after ``delay`` and return a PENDING Instance (or the existing Node)."""
        if self._closed:
            raise CloudError("kwok provider is closed", code="Closed")
        name = mf.machine_name(machine)
        if self._strict_names:
            validate_pool_name(name)
        try:
            sku = mf.require_instance_type(machine)
        except MachineFieldError as e:
            raise InvalidRequest(str(e), code="InvalidMachine") from e
        try:
            gpus = int(self._gpu_count(sku))
        except (KeyError, ValueError) as e:
            raise SkuUnavailable(
                f"instance type {sku} is not in the SKU catalog; choose a known GPU instance type",
                code="UnknownSku",
            ) from e
        capacity = dict(self._base_capacity)
        if self._node_capacity is not None:
            capacity.update(self._node_capacity(sku))
        manifest = node_manifest(machine, gpus, base_capacity=capacity)
        node = manifest["metadata"]["name"]
        existing = await self._read_node(node, "create")
        if existing is not None:
            instance = instance_from_node(existing)
            if instance.instance_type != sku:
                raise InvalidRequest(
                    f"node {node} for machine {name} already exists with instance type "
                    f"{instance.instance_type}, but the machine asks for {sku}",
                    code="NodeInstanceTypeMismatch",
                )
            return instance
        if (failure := self._failed.pop(name, None)) is not None:
            raise failure
        pending = self._pending.get(name)
        if pending is None:
            task = asyncio.create_task(self._launch(name, manifest), name=f"kwok-launch-{name}")
            pending = self._pending[name] = _Pending(manifest, task)
            log.info("kwok node scheduled", machine=name, node=node, gpus=gpus, delay_s=self._delay)
        return self._pending_instance(pending)

    async def _launch(self, name: str, manifest: dict[str, Any]) -> None:
        """Create the Node after the simulated delay, retrying what a cloud would retry.

        A transient answer (429, 5xx, a lost connection) is retried here with a capped backoff, as a
        cloud keeps provisioning through its own API's hiccups: recording it instead left the Machine
        waiting out its 15-minute registration timeout after a single 500 (bench/chaos.py). Only a
        permanent rejection is recorded, for the next ``create``/``get`` to report.
        """
        node = manifest["metadata"]["name"]
        retry = 0.5
        try:
            if self._delay > 0:
                # The simulated provisioning time (not synchronisation): a real VM takes a while to join.
                await asyncio.sleep(self._delay)
            while True:
                try:
                    await self._core.create_node(cast(Any, manifest))  # the client serialises plain dicts
                    log.info("kwok node created", machine=name, node=node)
                    return
                except ApiException as e:
                    if e.status == 409:  # created by an earlier attempt (a lost answer): the one we want
                        return
                    error = classify_kube_error(e, operation="create", node=node)
                    transient = e.status == 429 or int(e.status or 0) >= 500
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    error = classify_kube_error(e, operation="create", node=node)
                    transient = error.code == "Transport"
                if not transient:
                    self._failed[name] = error
                    log.warning("kwok node creation failed", machine=name, node=node, error=str(error))
                    return
                log.info("kwok node creation failed; retrying", machine=name, error=str(error), delay_s=retry)
                await asyncio.sleep(retry)  # backoff between attempts, not synchronisation
                retry = min(retry * 2, 8.0)
        finally:
            current = self._pending.get(name)
            if current is not None and current.task is asyncio.current_task():
                del self._pending[name]

    async def get(self, ref: str) -> Instance:
        """The Node for a Machine name or ``kwok://`` providerID; PENDING while its creation is scheduled."""
        name = machine_name_from_ref(ref)
        node = node_name_for(name)
        found = await self._read_node(node, "get")
        if found is not None:
            return instance_from_node(found)
        pending = self._pending.get(name)
        if pending is not None:
            return self._pending_instance(pending)
        if (failure := self._failed.get(name)) is not None:
            raise failure
        raise NotFound(f"kwok node {node} for machine {name} does not exist", code="NotFound")

    async def list(self) -> list[Instance]:
        """Nodes this provider created (kwok-annotated, with our agentpool/machine-type/owner labels) + pending ones."""
        selector = f"{AKS_AGENTPOOL_LABEL},{mf.MACHINE_TYPE_LABEL},{mf.PROVISIONER_NAME_LABEL}"
        try:
            result = await self._core.list_node(label_selector=selector)
        except Exception as e:
            raise classify_kube_error(e, operation="list", node="*") from e
        raw = cast(dict[str, Any], self._api.sanitize_for_serialization(result))
        out: dict[str, Instance] = {}
        for node in raw.get("items") or []:
            meta = node.get("metadata") or {}
            if (meta.get("annotations") or {}).get(KWOK_ANNOTATION) != "fake":
                continue
            if not is_managed_pool(meta.get("labels") or {}):
                continue
            instance = instance_from_node(node)
            out[instance.name] = instance
        for name, pending in list(self._pending.items()):
            out.setdefault(name, self._pending_instance(pending))
        return list(out.values())

    async def delete(self, ref: str) -> None:
        """Cancel a scheduled creation and/or delete the Node; NotFound when there was neither."""
        name = machine_name_from_ref(ref)
        node = node_name_for(name)
        cancelled = await self._cancel(name)
        self._failed.pop(name, None)
        try:
            await self._core.delete_node(node)
            log.info("kwok node deleted", machine=name, node=node)
        except ApiException as e:
            if e.status == 404 and cancelled:
                return  # deleted before it ever appeared
            raise classify_kube_error(e, operation="delete", node=node) from e
        except Exception as e:
            raise classify_kube_error(e, operation="delete", node=node) from e

    async def _cancel(self, name: str) -> bool:
        pending = self._pending.pop(name, None)
        if pending is None:
            return False
        pending.task.cancel()
        # Wait for the task to end so its POST cannot land after the caller's DELETE. (A POST the
        # apiserver had already received when we cancelled may still create the Node; the caller's
        # delete then finds and removes it, and the GC sweep catches any remaining leak.)
        await asyncio.gather(pending.task, return_exceptions=True)
        return True

    async def close(self) -> None:
        """Cancel every scheduled creation and wait for those tasks to end."""
        self._closed = True
        for name in list(self._pending):
            await self._cancel(name)

    def pending(self) -> builtins.list[str]:
        """Machine names whose Node creation is scheduled but not done (for tests and diagnostics)."""
        return sorted(self._pending)
