"""The tuning-Job phase: the training ConfigMap and the Job, created once, and the outcome they report.

Contract: ``current(ns, name)`` is the workspace's Job in the cache (or None); ``await
TuningJobs.ensure(ws, preset, workers, gpus)`` creates the ConfigMap (the method's default template,
shared by the namespace's tuning workspaces) and the Job on ``workers`` and returns the Job (None when
an adopted one vanished meanwhile); raises :class:`~kaito.workspace.manifests.ManifestError`
(``ConfigMapNotFound``, ...) or :class:`~kaito.workspace.adopt.ChildConflict`. ``outcome(key, job)``
is the Job's progress; :func:`finished` says whether a workspace's status already holds a result.
A Job is never re-created or updated: a finished Job is the workspace's result.
"""

from __future__ import annotations

import structlog

from kaito.api.workspace import Workspace
from kaito.presets.registry import Preset
from kaito.presets.skus import SkuCatalog
from kaito.runtime.informer import Informer
from kaito.runtime.kube import CONFIGMAPS, JOBS, KubeClient, Obj
from kaito.workspace import events as ev
from kaito.workspace import manifests as mf
from kaito.workspace import status as st
from kaito.workspace import tuning as tn
from kaito.workspace.adopt import anyone, create_or_adopt, owned_by
from kaito.workspace.watches import POD_WS_INDEX

log = structlog.get_logger("kaito.workspace")


def finished(raw: Obj) -> bool:
    """Whether the status reports a tuning Job that started and ended (Succeeded or Failed)."""
    status = raw.get("status") or {}
    started = st.condition_status(status, "JobStarted") == "True"
    return started and status.get("state") in ("Succeeded", "Failed")


class TuningJobs:
    """Creates the training ConfigMap and Job of tuning workspaces; reads the Job's outcome."""

    def __init__(
        self,
        client: KubeClient,
        *,
        jobs: Informer,
        pods: Informer,
        skus: SkuCatalog,
        manifests: mf.ManifestOptions,
    ) -> None:
        self.client = client
        self.jobs = jobs
        self.pods = pods
        self.skus = skus
        self.manifests = manifests

    def current(self, namespace: str, name: str) -> Obj | None:
        """The workspace's Job as the cache has it."""
        return self.jobs.store.get_by_name(name, namespace)

    def outcome(self, key: str, job: Obj, push_secret: str | None = None) -> st.StepOutcome:
        """The Job's progress (with what its pods report; ``push_secret`` names the Secret a failed push
        check blames)."""
        return tn.job_outcome(job, self.pods.store.by_index(POD_WS_INDEX, key), push_secret)

    async def ensure(
        self, ws: Workspace, preset: Preset, workers: list[str], worker_gpus: list[int]
    ) -> Obj | None:
        """Training ConfigMap, then the Job (adopted when it already exists and is ours)."""
        assert ws.tuning is not None
        ns, name = str(ws.metadata.namespace), str(ws.metadata.name)
        sku = self.skus.get(ws.resource.instance_type)
        desired = tn.build_job(ws, preset, self.manifests, sku=sku, nodes=workers, node_gpus=worker_gpus)
        cm_name = tn.config_name(ws)
        cm = await self.client.get_or_none(CONFIGMAPS, cm_name, ns)
        default_cm = tn.build_default_config(ws)
        if cm is None and default_cm is not None:
            # Created by another workspace meanwhile: become an owner of that one below.
            got = await create_or_adopt(self.client, CONFIGMAPS, default_cm, ns, ours=anyone, conflict="")
            if got.created:
                ev.CHILD_WRITES.labels("ConfigMap", "create").inc()
                log.info("child created", kind="ConfigMap", child=cm_name)
            else:
                cm = got.obj
        if cm is not None and default_cm is not None:
            # Shared by the namespace's tuning workspaces: deleting the one that created it must not
            # take it from the others (a Job retrying its pod needs it mounted).
            patch = tn.owner_patch(ws, cm)
            if patch is not None:
                await self.client.patch(CONFIGMAPS, cm_name, patch, ns)
                ev.CHILD_WRITES.labels("ConfigMap", "update").inc()
                log.info("shared ConfigMap owner added", child=cm_name)
        missing = default_cm is None if cm is None else tn.TRAINING_CONFIG_KEY not in (cm.get("data") or {})
        if missing:
            raise mf.ManifestError(
                "ConfigMapNotFound",
                f"tuning.config: ConfigMap {cm_name} with key {tn.TRAINING_CONFIG_KEY} "
                f"not found in namespace {ns}",
            )
        # Already there: the cache is behind our own earlier create, or someone else's Job has the name.
        got = await create_or_adopt(
            self.client,
            JOBS,
            desired,
            ns,
            ours=owned_by(ws.metadata.uid),
            conflict=f"Job {ns}/{name} already exists and does not belong to this workspace; delete or rename it",
        )
        if got.created:
            ev.CHILD_WRITES.labels("Job", "create").inc()
            log.info("child created", kind="Job", child=name)
        return got.obj
