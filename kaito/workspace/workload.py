"""The inference-workload phase: Services, ConfigMap and the Deployment or StatefulSet, and how far
their pods have come.

Contract: ``await InferenceWorkload.ensure(key, ws, preset, workers, gpus) -> StepOutcome`` on the
selected ``workers`` (node names) and their GPU counts; raises
:class:`~kaito.workspace.manifests.ManifestError` for a spec the manifests cannot serve.
``forget(key)`` when the workspace is gone. Children are created, or updated when their
:data:`~kaito.workspace.manifests.ANNOTATION_SPEC_HASH` moved -- never written otherwise.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog

from kaito.api.conditions import StateReason
from kaito.api.workspace import Workspace
from kaito.presets.registry import Preset
from kaito.presets.skus import SkuCatalog
from kaito.runtime.informer import Informer
from kaito.runtime.kube import (
    CONFIGMAPS,
    DEPLOYMENTS,
    SERVICES,
    STATEFULSETS,
    ApiError,
    KubeClient,
    Obj,
    Resource,
    deepcopy,
)
from kaito.workspace import events as ev
from kaito.workspace import manifests as mf
from kaito.workspace import status as st
from kaito.workspace.adopt import ChildConflict, create_or_adopt, owned_by
from kaito.workspace.watches import POD_WS_INDEX

log = structlog.get_logger("kaito.workspace")


@dataclass(frozen=True)
class _Applied:
    """What the last successful apply of a workspace's children was built from and wrote.

    A reconcile whose inputs (``fingerprint``, ``preset``) are unchanged and whose children still carry
    the written spec hashes in the cache skips building the manifests: most reconciles are triggered by
    pod and Deployment status events, and building (YAML, hashing) was half of their CPU at scale.
    """

    fingerprint: tuple[Any, ...]
    preset: Preset | None
    children: tuple[tuple[str, str, str], ...]  # (kind, name, spec hash)
    kind: str


class InferenceWorkload:
    """Applies the inference children and reads their progress from the caches."""

    def __init__(
        self,
        client: KubeClient,
        *,
        deployments: Informer,
        statefulsets: Informer,
        services: Informer,
        configmaps: Informer,
        pods: Informer,
        skus: SkuCatalog,
        manifests: mf.ManifestOptions,
    ) -> None:
        self.client = client
        self.deployments = deployments
        self.statefulsets = statefulsets
        self.services = services
        self.configmaps = configmaps
        self.pods = pods
        self.skus = skus
        self.manifests = manifests
        self._applied: dict[str, _Applied] = {}

    def forget(self, key: str) -> None:
        """Drop what is remembered about ``key`` (the workspace is gone)."""
        self._applied.pop(key, None)

    async def ensure(
        self, key: str, ws: Workspace, preset: Preset | None, workers: list[str], worker_gpus: list[int]
    ) -> st.StepOutcome:
        """Apply the children on ``workers``; the outcome says whether enough inference pods serve."""
        assert ws.inference is not None
        ns = str(ws.metadata.namespace)
        if ws.inference.config:
            cm = await self.client.get_or_none(CONFIGMAPS, ws.inference.config, ns)
            if cm is None or mf.INFERENCE_CONFIG_KEY not in (cm.get("data") or {}):
                return st.StepOutcome(
                    st.Phase.FAILED,
                    "ConfigMapNotFound",
                    f"inference.config: ConfigMap {ws.inference.config} with key {mf.INFERENCE_CONFIG_KEY} "
                    f"not found in namespace {ns}",
                )
        fingerprint = (
            ws.metadata.uid,
            ws.metadata.generation,  # every field but metadata and status
            tuple(sorted(ws.annotations().items())),
            tuple(sorted((ws.metadata.labels or {}).items())),
            tuple(workers),
            tuple(worker_gpus),
        )
        memo = self._applied.get(key)
        if (
            memo is not None
            and memo.fingerprint == fingerprint
            and memo.preset is preset
            and self._current(memo, ns)
        ):
            kind = memo.kind
        else:
            sku = self.skus.get(ws.resource.instance_type)
            wl = mf.build_inference(ws, preset, self.manifests, sku=sku, nodes=workers, node_gpus=worker_gpus)
            # Independent objects (the pods wait for the ConfigMap by themselves): one round trip, not three.
            try:
                await asyncio.gather(*(self._apply(obj) for obj in wl.objects()))
            except ChildConflict as e:
                self._applied.pop(key, None)
                return st.StepOutcome(st.Phase.FAILED, "ChildConflict", str(e))
            kind = wl.kind
            self._applied[key] = _Applied(
                fingerprint,
                preset,
                tuple(
                    (
                        str(o["kind"]),
                        str(o["metadata"]["name"]),
                        str(o["metadata"]["annotations"][mf.ANNOTATION_SPEC_HASH]),
                    )
                    for o in wl.objects()
                ),
                kind,
            )
        return self._progress(ws, kind)

    def _progress(self, ws: Workspace, kind: str) -> st.StepOutcome:
        """How far the Deployment/StatefulSet of kind ``kind`` and its pods have come."""
        ns = str(ws.metadata.namespace)
        workload_cache = self.deployments if kind == "Deployment" else self.statefulsets
        current = workload_cache.store.get_by_name(str(ws.metadata.name), ns)
        replicas = ws.resource.count
        if current is None:
            return st.StepOutcome(
                st.Phase.PENDING, StateReason.DEPLOYING, f"{kind} {ws.metadata.name} is being created"
            )
        # Ready while enough pods serve, also during a rolling update (surge keeps the old pods serving).
        ready = int((current.get("status") or {}).get("readyReplicas") or 0)
        if ready >= replicas:
            return st.StepOutcome(st.Phase.READY)
        pods = self.pods.store.by_index(POD_WS_INDEX, f"{ns}/{ws.metadata.name}")
        problem = st.pod_problem(pods)
        if problem is not None:
            return st.StepOutcome(st.Phase.FAILED, problem[0], f"{problem[0]}: {problem[1]}")
        for cond in (current.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "Progressing" and cond.get("status") == "False":
                return st.StepOutcome(
                    st.Phase.FAILED,
                    str(cond.get("reason") or "ProgressDeadlineExceeded"),
                    f"{kind} {ws.metadata.name} is not progressing: {cond.get('message', '')}",
                )
        return st.StepOutcome(
            st.Phase.PENDING,
            StateReason.DEPLOYING,
            f"{ready}/{replicas} inference pods ready",
        )

    def _current(self, memo: _Applied, namespace: str) -> bool:
        """Whether every child ``memo`` wrote is in the cache with the spec hash it was written with."""
        for kind, name, want in memo.children:
            obj = self._cache_for(kind)[0].store.get_by_name(name, namespace)
            have = ((obj or {}).get("metadata") or {}).get("annotations") or {}
            if have.get(mf.ANNOTATION_SPEC_HASH) != want:
                return False
        return True

    def _cache_for(self, kind: str) -> tuple[Informer, Resource]:
        return {
            "Deployment": (self.deployments, DEPLOYMENTS),
            "StatefulSet": (self.statefulsets, STATEFULSETS),
            "Service": (self.services, SERVICES),
            "ConfigMap": (self.configmaps, CONFIGMAPS),
        }[kind]

    async def _apply(self, desired: Obj) -> bool:
        """Create ``desired`` or update it when its hash moved; True when something was written."""
        kind = str(desired["kind"])
        inf, res = self._cache_for(kind)
        meta = desired["metadata"]
        ns, name = meta["namespace"], meta["name"]
        current = inf.store.get_by_name(name, ns)
        want = meta["annotations"][mf.ANNOTATION_SPEC_HASH]
        if current is None:
            # Already there means the cache is behind our own earlier create (its event will follow),
            # or someone else's object has the name: never take that one over.
            got = await create_or_adopt(
                self.client,
                res,
                desired,
                ns,
                ours=owned_by(meta["ownerReferences"][0]["uid"]),
                conflict=f"{kind} {ns}/{name} already exists and does not belong to this workspace; "
                "delete or rename it",
            )
            if got.created:
                ev.CHILD_WRITES.labels(kind, "create").inc()
                log.info("child created", kind=kind, child=name)
            return got.created
        have = ((current.get("metadata") or {}).get("annotations") or {}).get(mf.ANNOTATION_SPEC_HASH)
        if have == want:
            return False
        try:
            if kind in ("Service", "ConfigMap"):
                # Merge patch keeps apiserver-assigned fields (clusterIP, nodePorts) intact.
                patch: Obj = {"metadata": {"annotations": meta["annotations"], "labels": meta["labels"]}}
                if kind == "Service":
                    patch["spec"] = desired["spec"]
                else:
                    patch["data"] = desired["data"]
                patch["metadata"]["resourceVersion"] = (current.get("metadata") or {}).get("resourceVersion")
                await self.client.patch(res, name, patch, ns)
            else:
                body = deepcopy(current)
                body.pop("status", None)
                body["metadata"].setdefault("annotations", {}).update(meta["annotations"])
                body["metadata"].setdefault("labels", {}).update(meta["labels"])
                body["spec"] = desired["spec"]
                await self.client.replace(res, body)
        except ApiError as e:
            if e.conflict:
                return True  # our cache is stale; the watch brings the new version and re-enqueues
            raise
        ev.CHILD_WRITES.labels(kind, "update").inc()
        log.info("child updated", kind=kind, child=name, old_hash=have, new_hash=want)
        return True
