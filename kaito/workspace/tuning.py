"""Pure builders for tuning workspaces: the training ConfigMap and the Job (``presets/tuning/README.md``).

The Job is named after the workspace and owned by it: an init container puts the dataset into
``/mnt/data`` (``kaito_tuning.download`` for ``input.urls``, ``kaito_oci pull`` for ``input.image``),
the main container trains and, only when training succeeded, pushes the adapter with ``kaito_oci push``.
``backoffLimit`` is 0 unless the annotation :data:`ANNOTATION_BACKOFF_LIMIT` raises it: a failed
training run is rarely fixed by running it again, and every retry costs GPU hours.

:func:`job_outcome` reads a Job (and its pods) back into a :class:`~kaito.workspace.status.StepOutcome`.
"""

from __future__ import annotations

import functools
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kaito.api.workspace import Workspace
from kaito.presets.catalog import CatalogError, catalog_dir
from kaito.presets.cpu import GPU_ONLY_TUNING_METHODS, CPUResources, cpu_resources
from kaito.presets.registry import Preset
from kaito.presets.skus import Sku
from kaito.workspace import manifests as mf
from kaito.workspace import status as st

Obj = dict[str, Any]

ANNOTATION_BACKOFF_LIMIT = "kaito.sh/tuning-backoff-limit"
TRAINING_CONFIG_KEY = "training_config.yaml"
# Marks the shared default template ConfigMaps the operator creates (value: the method).
LABEL_DEFAULT_TEMPLATE = "kaito.sh/default-template"
DATA_DIR = "/mnt/data"
RESULTS_DIR = "/mnt/results"
DOCKER_CONFIG_DIR = "/tmp/.docker/config"
WORKDIR = "/workspace/tfs"
PHI3_TARGET_MODULES = "k_proj,q_proj,v_proj,o_proj,gate_proj,down_proj,up_proj"
PUSH_CHECK_CONTAINER = "push-check"
OCI_EXIT_USAGE, OCI_EXIT_AUTH = 2, 3  # kaito_oci's exit codes (presets/oci/cli.py)
DATA_CONTAINERS = ("data-downloader", "data-extractor")

# Upstream's default ConfigMaps (chart charts/kaito/workspace/templates/{lora,qlora}-params.yaml), one
# file each under presets/tuning/templates, the one copy the controller and the runtime tests read. The
# container image ships them in the catalog (Dockerfile.controller: $KAITO_CATALOG_DIR/tuning/templates).
TEMPLATES_SUBDIR = Path("tuning") / "templates"
TEMPLATE_FILES = {"lora": "lora-params.yaml", "qlora": "qlora-params.yaml"}


@functools.cache
def default_templates() -> dict[str, tuple[str, str]]:
    """Method -> (ConfigMap name, ``training_config.yaml`` text) of the default templates.

    Read once from the catalog (:func:`kaito.presets.catalog.catalog_dir`); the controller calls it at
    start-up so that a missing or malformed file stops it there, not at the first tuning workspace.
    """
    directory = catalog_dir() / TEMPLATES_SUBDIR
    out: dict[str, tuple[str, str]] = {}
    for method, file in TEMPLATE_FILES.items():
        path = directory / file
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise CatalogError(f"default tuning template {path}: {e}") from e
        meta = doc.get("metadata") if isinstance(doc, dict) else None
        data = doc.get("data") if isinstance(doc, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        text = data.get(TRAINING_CONFIG_KEY) if isinstance(data, dict) else None
        if not isinstance(name, str) or not name or not isinstance(text, str):
            raise CatalogError(
                f"default tuning template {path}: expected a ConfigMap with metadata.name and "
                f"data.{TRAINING_CONFIG_KEY}"
            )
        out[method] = (name, text)
    return out


def _default_template(ws: Workspace) -> tuple[str, str]:
    # Any method the webhook let through that is not qlora trains without quantization (lora).
    templates = default_templates()
    return templates.get(method_of(ws), templates["lora"])


def method_of(ws: Workspace) -> str:
    """``tuning.method`` lower-cased (the CRD accepts any case)."""
    assert ws.tuning is not None
    return ws.tuning.method.strip().lower()


def config_name(ws: Workspace) -> str:
    """The ConfigMap mounted at ``/mnt/config``: ``tuning.config``, else the method's default template."""
    assert ws.tuning is not None
    if ws.tuning.config:
        return ws.tuning.config
    return _default_template(ws)[0]


def build_default_config(ws: Workspace) -> Obj | None:
    """The default template ConfigMap in the workspace's namespace, or None when ``tuning.config`` is set.

    One ConfigMap serves every tuning workspace of the namespace using the same method, so no single
    workspace controls it: each user adds itself as a (non-controller) owner, see :func:`owner_patch`,
    and garbage collection removes it with the last of them.
    """
    assert ws.tuning is not None
    if ws.tuning.config:
        return None
    name, text = _default_template(ws)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": ws.metadata.namespace,
            "labels": {LABEL_DEFAULT_TEMPLATE: method_of(ws)},
            "ownerReferences": [_shared_owner(ws)],
        },
        "data": {TRAINING_CONFIG_KEY: text},
    }


def _shared_owner(ws: Workspace) -> Obj:
    ref = mf.owner_reference(ws)
    return {**ref, "controller": False, "blockOwnerDeletion": False}


def owner_patch(ws: Workspace, cm: Mapping[str, Any]) -> Obj | None:
    """The merge patch adding ``ws`` to the owners of an existing default template ConfigMap.

    None when ``ws`` already owns it, or when the ConfigMap is not one the operator made (a user's
    ConfigMap of that name is used as it is and never touched). The patch carries the
    resourceVersion, so two workspaces adding themselves at once cannot drop each other.
    """
    meta = cm.get("metadata") or {}
    refs = list(meta.get("ownerReferences") or [])
    ours = LABEL_DEFAULT_TEMPLATE in (meta.get("labels") or {}) or any(
        r.get("kind") == "Workspace" and str(r.get("apiVersion", "")).startswith("kaito.sh/") for r in refs
    )
    if not ours or any(r.get("uid") == ws.metadata.uid for r in refs):
        return None
    return {
        "metadata": {
            "ownerReferences": [*refs, _shared_owner(ws)],
            "resourceVersion": meta.get("resourceVersion"),
        }
    }


def backoff_limit(ws: Workspace) -> int:
    """``backoffLimit``: 0, or the non-negative integer in :data:`ANNOTATION_BACKOFF_LIMIT`."""
    raw = ws.annotations().get(ANNOTATION_BACKOFF_LIMIT)
    if raw is None or raw.strip() == "":
        return 0
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise mf.ManifestError(
            "InvalidAnnotation", f"annotation {ANNOTATION_BACKOFF_LIMIT}={raw!r}: expected an integer >= 0"
        )
    return value


def tuning_image(ws: Workspace, preset: Preset, options: mf.ManifestOptions) -> tuple[str, list[str]]:
    """Preset image and its pull secrets: ``presetOptions.image`` when given, else the operator's registry."""
    assert ws.tuning is not None
    opts = ws.tuning.preset.preset_options
    secrets = list(opts.image_pull_secrets or []) if opts is not None else []
    if opts is not None and opts.image:
        return opts.image, secrets
    if preset.is_private:
        raise mf.ManifestError(
            "PrivateImageMissing",
            f"preset {preset.name} needs a private image: set tuning.preset.presetOptions.image",
        )
    return preset.image_ref(options.registry), secrets


def _docker_config_volume(name: str, secret: str, *, optional: bool = False) -> Obj:
    # Only the dockerconfigjson key is projected, as the file name the OCI client reads.
    source: Obj = {"secretName": secret, "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}
    if optional:
        source["optional"] = True
    return {"name": name, "secret": source}


def _push_check(ws: Workspace, image: str) -> Obj:
    """The init container after the dataset's: may the push secret push to ``output.image``?
    (``kaito_oci check-push``)

    It runs before the training, hours before the trainer would push, so a missing or refused push
    secret fails the Job in seconds with the registry's answer. The secret volume is
    optional for this reason: a Secret that does not exist would otherwise hold the pod in
    ContainerCreating for ever (the controller may not read Secrets to check), while here it is an empty
    directory and the check says so.
    """
    assert ws.tuning is not None
    return {
        "name": PUSH_CHECK_CONTAINER,
        "image": image,
        "workingDir": WORKDIR,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "command": [
            "python3", "-m", "kaito_oci", "check-push", "--docker-config", DOCKER_CONFIG_DIR,
            str(ws.tuning.output.image),
        ],
        "volumeMounts": [{"name": "docker-config", "mountPath": DOCKER_CONFIG_DIR, "readOnly": True}],
    }  # fmt: skip


def _data_init(ws: Workspace, image: str) -> tuple[Obj, list[Obj]]:
    """The init container filling ``/mnt/data`` and the extra volumes it needs."""
    assert ws.tuning is not None
    src = ws.tuning.input
    data_mount = {"name": "data-volume", "mountPath": DATA_DIR}
    base: Obj = {
        "image": image,
        "workingDir": WORKDIR,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if src.urls:
        return {
            "name": "data-downloader",
            **base,
            "command": ["python3", "-m", "kaito_tuning.download", "--dest", DATA_DIR],
            "env": [{"name": "DATA_URLS", "value": " ".join(src.urls)}],
            "volumeMounts": [data_mount],
        }, []
    if not src.image:
        raise mf.ManifestError("InvalidInput", "tuning.input needs urls or image")
    volumes: list[Obj] = []
    mounts: list[Obj] = [data_mount]
    args: list[str] = []
    for i, secret in enumerate(src.image_pull_secrets or []):
        vname, path = f"input-docker-config-{i}", f"/tmp/.docker/input-{i}"
        volumes.append(_docker_config_volume(vname, secret))
        mounts.append({"name": vname, "mountPath": path, "readOnly": True})
        args += ["--docker-config", path]
    return {
        "name": "data-extractor",
        **base,
        "command": ["python3", "-m", "kaito_oci", "pull", *args, src.image, DATA_DIR],
        "volumeMounts": mounts,
    }, volumes


def cpu_plan(
    ws: Workspace, preset: Preset, sku: Sku | None, node_gpus: Sequence[int] = ()
) -> CPUResources | None:
    """The tuning Job's CPU sizing on a CPU node, None on GPUs (same decision as inference,
    :func:`kaito.workspace.manifests.cpu_plan`); raises :class:`ManifestError` for ``qlora`` on CPU."""
    inference_plan = mf.cpu_plan(ws, preset, sku, node_gpus)
    if inference_plan is None:
        return None
    method = method_of(ws)
    if method in GPU_ONLY_TUNING_METHODS:
        raise mf.ManifestError(
            "MethodNeedsGPU",
            f"tuning.method {method}: bitsandbytes quantization needs an NVIDIA GPU and "
            f"{ws.resource.instance_type} is a CPU instance type; use method lora or a GPU instance type",
        )
    return cpu_resources(preset, sku if sku is not None and sku.is_cpu else None, method=method)


def trainer_command(ws: Workspace, preset_name: str, gpus: int) -> list[str]:
    """``/bin/sh -c 'train && push'``: the push runs only after training succeeded."""
    assert ws.tuning is not None
    train = (
        f"accelerate launch --num_processes={gpus} {WORKDIR}/fine_tuning.py"
        if gpus > 1
        else f"python3 {WORKDIR}/fine_tuning.py"
    )
    push = shlex.join(
        [
            "python3",
            "-m",
            "kaito_oci",
            "push",
            "--docker-config",
            DOCKER_CONFIG_DIR,
            "--file",
            "adapter_config.json",
            "--file",
            "adapter_model.safetensors",
            "--annotation",
            f"sh.kaito.model.name={preset_name}",
            RESULTS_DIR,
            str(ws.tuning.output.image),
        ]
    )
    return ["/bin/sh", "-c", f"{train} && {push}"]


def build_job(
    ws: Workspace,
    preset: Preset,
    options: mf.ManifestOptions,
    *,
    sku: Sku | None = None,
    nodes: Sequence[str] = (),
    node_gpus: Sequence[int] = (),
) -> Obj:
    """The tuning Job (README "Rendered example"); raises :class:`ManifestError` for unusable specs.

    On a CPU node (:func:`cpu_plan`) the trainer asks for no GPU: CPU/memory from the preset's ``cpu``
    section for tuning, ``OMP_NUM_THREADS`` from the CPU limit, and ``qlora`` is refused.
    """
    assert ws.tuning is not None
    out = ws.tuning.output
    if not out.image or not out.image_push_secret:
        raise mf.ManifestError("InvalidOutput", "tuning.output needs image and imagePushSecret")
    image, pull_secrets = tuning_image(ws, preset, options)
    if out.image_push_secret not in pull_secrets:
        # Upstream lists the push secret as a pull secret too: registries often hold both images.
        pull_secrets.append(out.image_push_secret)
    cpu = cpu_plan(ws, preset, sku, node_gpus)
    gpus = mf.gpus_per_node(None, sku, node_gpus)
    if sku is None and not any(n > 0 for n in node_gpus) and preset.tuning is not None:
        gpus = preset.tuning.gpu_count
    init, init_volumes = _data_init(ws, image)
    env: list[Obj] = [{"name": "PYTORCH_CUDA_ALLOC_CONF", "value": "expandable_segments:True"}]
    if preset.name.startswith("phi-3"):
        env.append({"name": "DEFAULT_TARGET_MODULES", "value": PHI3_TARGET_MODULES})
    if cpu is not None:
        gpus = 0
        # torch sizes its pool from the host's cores, not the cgroup quota: one thread per core allowed.
        env.append({"name": "OMP_NUM_THREADS", "value": str(cpu.threads)})
        resources = cpu.as_container_resources()
    else:
        gpu_res = {mf.GPU_RESOURCE: str(gpus)}
        resources = {"requests": dict(gpu_res), "limits": dict(gpu_res)}
    trainer: Obj = {
        "name": str(ws.metadata.name),
        "image": image,
        "workingDir": WORKDIR,
        "command": trainer_command(ws, preset.name, gpus),
        "env": env,
        "resources": resources,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "config-volume", "mountPath": mf.CONFIG_DIR},
            {"name": "data-volume", "mountPath": DATA_DIR},
            {"name": "results-volume", "mountPath": RESULTS_DIR},
            {"name": "docker-config", "mountPath": DOCKER_CONFIG_DIR, "readOnly": True},
        ],
    }
    labels = mf.selector_labels(ws)
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "imagePullSecrets": [{"name": s} for s in pull_secrets],
        "tolerations": mf.inference_tolerations(options),
        "affinity": mf.node_affinity(ws.resource.label_selector.as_map(), nodes),
        "initContainers": [init, _push_check(ws, image)],
        "containers": [trainer],
        "volumes": [
            {"name": "config-volume", "configMap": {"name": config_name(ws)}},
            {"name": "data-volume", "emptyDir": {}},
            {"name": "results-volume", "emptyDir": {}},
            _docker_config_volume("docker-config", out.image_push_secret, optional=True),
            *init_volumes,
        ],
    }
    job: Obj = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": mf._meta(ws),
        "spec": {
            "backoffLimit": backoff_limit(ws),
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    return mf.with_hash(job)


# ------------------------------------------------------------------------------------------ status


def _job_condition(job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return dict(c)
    return None


@dataclass(frozen=True)
class FailedContainer:
    """The first container of a tuning pod that exited non-zero."""

    name: str
    exit_code: int
    reason: str  # the kubelet's (Error, OOMKilled, ...)
    message: str  # what the program wrote to its termination log (or its last log lines)

    def describe(self) -> str:
        detail = self.message or self.reason
        return f"container {self.name} exited {self.exit_code}" + (f": {detail}" if detail else "")


def failed_container(pods: Iterable[Mapping[str, Any]]) -> FailedContainer | None:
    """The first failed container (init containers first, pods by name), or None."""
    for pod in sorted(pods, key=lambda p: str((p.get("metadata") or {}).get("name", ""))):
        status = pod.get("status") or {}
        for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            term = (cs.get("state") or {}).get("terminated") or {}
            if term and int(term.get("exitCode") or 0) != 0:
                return FailedContainer(
                    str(cs.get("name", "?")),
                    int(term.get("exitCode") or 0),
                    str(term.get("reason") or ""),
                    str(term.get("message") or "").strip(),
                )
    return None


def termination_message(pods: Iterable[Mapping[str, Any]]) -> str:
    """The first failed container's termination message (what the programs write), or ''."""
    failed = failed_container(pods)
    return failed.describe() if failed is not None else ""


def failure_reason(failed: FailedContainer) -> str | None:
    """A typed reason for the step that failed, or None to keep the Job's own.

    The push check exits with ``kaito_oci``'s codes (presets/oci/cli.py: 1 registry unreachable, 2 bad
    docker config, e.g. the Secret does not exist, 3 credentials refused).
    """
    if failed.reason == "OOMKilled":
        return "OOMKilled"
    if failed.name == PUSH_CHECK_CONTAINER:
        return {OCI_EXIT_USAGE: "PushSecretInvalid", OCI_EXIT_AUTH: "PushRefused"}.get(
            failed.exit_code, "RegistryUnreachable"
        )
    if failed.name in DATA_CONTAINERS:
        return "DatasetDownloadFailed"
    # The trainer's container runs training then the push, whose exit codes overlap (3 is a dataset
    # error to the trainer, refused credentials to the push): its message says which.
    return None


def _hint(ws_secret: str | None, reason: str) -> str:
    if reason in ("PushSecretInvalid", "PushRefused") and ws_secret:
        return (
            f"; check tuning.output.imagePushSecret {ws_secret}: a kubernetes.io/dockerconfigjson Secret "
            "in the workspace's namespace whose credentials may push to tuning.output.image"
        )
    if reason == "DatasetDownloadFailed":
        return "; check tuning.input"
    return ""


def job_outcome(
    job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]] = (), push_secret: str | None = None
) -> st.StepOutcome:
    """READY when the Job completed, FAILED when it failed, else PENDING (running).

    A failure's reason is the failed step's (:func:`failure_reason`: PushSecretInvalid, PushRefused,
    RegistryUnreachable, DatasetDownloadFailed, OOMKilled) or else the Job's; the message carries the
    program's own words and, for the push secret and the dataset, which field to check.
    """
    name = (job.get("metadata") or {}).get("name", "")
    if _job_condition(job, "Complete") is not None:
        return st.StepOutcome(st.Phase.READY, "Succeeded", f"tuning job {name} completed")
    failed = _job_condition(job, "Failed")
    if failed is not None:
        job_reason = str(failed.get("reason") or "JobFailed")
        msg = f"tuning job {name} failed: {job_reason}"
        if failed.get("message"):
            msg += f": {failed['message']}"
        container = failed_container(pods)
        reason = job_reason
        if container is not None:
            reason = failure_reason(container) or job_reason
            msg += f"; {container.describe()}{_hint(push_secret, reason)}"
        return st.StepOutcome(st.Phase.FAILED, reason, msg)
    active = int((job.get("status") or {}).get("active") or 0)
    return st.StepOutcome(
        st.Phase.PENDING, "Running", f"tuning job {name} is running ({active} active pod(s))"
    )
