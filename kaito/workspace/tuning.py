"""Pure builders for tuning workspaces: the training ConfigMap and the Job (``presets/tuning/README.md``).

The Job is named after the workspace and owned by it: an init container puts the dataset into
``/mnt/data`` (``kaito_tuning.download`` for ``input.urls``, ``kaito_oci pull`` for ``input.image``),
the main container trains and, only when training succeeded, pushes the adapter with ``kaito_oci push``.
``backoffLimit`` is 0 unless the annotation :data:`ANNOTATION_BACKOFF_LIMIT` raises it: a failed
training run is rarely fixed by running it again, and every retry costs GPU hours.

:func:`job_outcome` reads a Job (and its pods) back into a :class:`~kaito.workspace.status.StepOutcome`.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kaito.api.workspace import Workspace
from kaito.presets.registry import Preset
from kaito.presets.skus import GPUSku
from kaito.workspace import manifests as mf
from kaito.workspace import status as st

Obj = dict[str, Any]

ANNOTATION_BACKOFF_LIMIT = "kaito.sh/tuning-backoff-limit"
TRAINING_CONFIG_KEY = "training_config.yaml"
LORA_CONFIG_NAME = "lora-params-template"
QLORA_CONFIG_NAME = "qlora-params-template"
DATA_DIR = "/mnt/data"
RESULTS_DIR = "/mnt/results"
DOCKER_CONFIG_DIR = "/tmp/.docker/config"
WORKDIR = "/workspace/tfs"
PHI3_TARGET_MODULES = "k_proj,q_proj,v_proj,o_proj,gate_proj,down_proj,up_proj"

# Upstream chart's default templates (v0.4.0, reference §4.3); identical except QuantizationConfig.
_TEMPLATE_HEAD = """\
training_config:
  ModelConfig:
    torch_dtype: "bfloat16"
    local_files_only: true
    device_map: "auto"

  QuantizationConfig:
"""
_TEMPLATE_TAIL = """
  LoraConfig:
    r: 8
    lora_alpha: 8
    lora_dropout: 0.0

  TrainingArguments:
    output_dir: "/mnt/results"
    ddp_find_unused_parameters: false
    save_strategy: "epoch"
    per_device_train_batch_size: 1

  DataCollator:
    mlm: true

  DatasetConfig:
    shuffle_dataset: true
    train_test_split: 1
"""
LORA_TEMPLATE = _TEMPLATE_HEAD + "    load_in_4bit: false\n" + _TEMPLATE_TAIL
QLORA_TEMPLATE = (
    _TEMPLATE_HEAD
    + '    load_in_4bit: true\n    bnb_4bit_quant_type: "nf4"\n'
    + '    bnb_4bit_compute_dtype: "bfloat16"\n    bnb_4bit_use_double_quant: true\n'
    + _TEMPLATE_TAIL
)
DEFAULT_TEMPLATES = {"lora": (LORA_CONFIG_NAME, LORA_TEMPLATE), "qlora": (QLORA_CONFIG_NAME, QLORA_TEMPLATE)}


def method_of(ws: Workspace) -> str:
    """``tuning.method`` lower-cased (the CRD accepts any case)."""
    assert ws.tuning is not None
    return ws.tuning.method.strip().lower()


def config_name(ws: Workspace) -> str:
    """The ConfigMap mounted at ``/mnt/config``: ``tuning.config``, else the method's default template."""
    assert ws.tuning is not None
    if ws.tuning.config:
        return ws.tuning.config
    return DEFAULT_TEMPLATES.get(method_of(ws), DEFAULT_TEMPLATES["lora"])[0]


def build_default_config(ws: Workspace) -> Obj | None:
    """The default template ConfigMap in the workspace's namespace, or None when ``tuning.config`` is set.

    It is owned by the workspace that created it (a later workspace using the same default finds it and
    leaves it as it is).
    """
    assert ws.tuning is not None
    if ws.tuning.config:
        return None
    name, text = DEFAULT_TEMPLATES.get(method_of(ws), DEFAULT_TEMPLATES["lora"])
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": mf._meta(ws, name),
        "data": {TRAINING_CONFIG_KEY: text},
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


def _docker_config_volume(name: str, secret: str) -> Obj:
    # Only the dockerconfigjson key is projected, as the file name the OCI client reads.
    return {
        "name": name,
        "secret": {"secretName": secret, "items": [{"key": ".dockerconfigjson", "path": "config.json"}]},
    }


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
    sku: GPUSku | None = None,
    nodes: Sequence[str] = (),
    node_gpus: Sequence[int] = (),
) -> Obj:
    """The tuning Job (README "Rendered example"); raises :class:`ManifestError` for unusable specs."""
    assert ws.tuning is not None
    out = ws.tuning.output
    if not out.image or not out.image_push_secret:
        raise mf.ManifestError("InvalidOutput", "tuning.output needs image and imagePushSecret")
    image, pull_secrets = tuning_image(ws, preset, options)
    if out.image_push_secret not in pull_secrets:
        # Upstream lists the push secret as a pull secret too: registries often hold both images.
        pull_secrets.append(out.image_push_secret)
    gpus = mf.gpus_per_node(None, sku, node_gpus)
    if sku is None and not any(n > 0 for n in node_gpus) and preset.tuning is not None:
        gpus = preset.tuning.gpu_count
    init, init_volumes = _data_init(ws, image)
    env: list[Obj] = [{"name": "PYTORCH_CUDA_ALLOC_CONF", "value": "expandable_segments:True"}]
    if preset.name.startswith("phi-3"):
        env.append({"name": "DEFAULT_TARGET_MODULES", "value": PHI3_TARGET_MODULES})
    gpu_res = {mf.GPU_RESOURCE: str(gpus)}
    trainer: Obj = {
        "name": str(ws.metadata.name),
        "image": image,
        "workingDir": WORKDIR,
        "command": trainer_command(ws, preset.name, gpus),
        "env": env,
        "resources": {"requests": dict(gpu_res), "limits": dict(gpu_res)},
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
        "initContainers": [init],
        "containers": [trainer],
        "volumes": [
            {"name": "config-volume", "configMap": {"name": config_name(ws)}},
            {"name": "data-volume", "emptyDir": {}},
            {"name": "results-volume", "emptyDir": {}},
            _docker_config_volume("docker-config", out.image_push_secret),
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


def termination_message(pods: Iterable[Mapping[str, Any]]) -> str:
    """The first failed container's termination message (what the programs write), or ''."""
    for pod in sorted(pods, key=lambda p: str((p.get("metadata") or {}).get("name", ""))):
        status = pod.get("status") or {}
        for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            term = (cs.get("state") or {}).get("terminated") or {}
            if term and int(term.get("exitCode") or 0) != 0:
                msg = str(term.get("message") or term.get("reason") or "").strip()
                return f"container {cs.get('name', '?')} exited {term.get('exitCode')}" + (
                    f": {msg}" if msg else ""
                )
    return ""


def job_outcome(job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]] = ()) -> st.StepOutcome:
    """READY when the Job completed, FAILED (reason = the Job's) when it failed, else PENDING (running)."""
    name = (job.get("metadata") or {}).get("name", "")
    if _job_condition(job, "Complete") is not None:
        return st.StepOutcome(st.Phase.READY, "Succeeded", f"tuning job {name} completed")
    failed = _job_condition(job, "Failed")
    if failed is not None:
        reason = str(failed.get("reason") or "JobFailed")
        msg = f"tuning job {name} failed: {reason}"
        if failed.get("message"):
            msg += f": {failed['message']}"
        detail = termination_message(pods)
        if detail:
            msg += f"; {detail}"
        return st.StepOutcome(st.Phase.FAILED, reason, msg)
    active = int((job.get("status") or {}).get("active") or 0)
    return st.StepOutcome(
        st.Phase.PENDING, "Running", f"tuning job {name} is running ({active} active pod(s))"
    )
