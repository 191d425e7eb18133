"""Pure builders for an inference Workspace's child objects.

Every function here maps ``(workspace, preset, nodes, options)`` to plain Kubernetes dicts and does no
I/O, so the whole workload shape is unit-tested without a cluster. The reconciler creates what these
return and compares :func:`spec_hash` annotations to decide whether an existing child needs an update.

Shapes follow upstream KAITO v0.3/v0.4 (reference §5) with these deliberate differences:

* launch parameters are rendered in sorted order (upstream iterated Go maps: random order, spurious
  rollouts);
* the Deployment rolls with ``maxSurge: 1, maxUnavailable: 0`` (SPEC §4: no downtime when adapters or
  preferred nodes change) instead of upstream's ``0/1``;
* pods are pinned to the selected worker nodes (``kubernetes.io/hostname In status.workerNodes``) on top
  of the ``matchLabels`` affinity, so a change of ``preferredNodes`` actually moves the workload;
* adapters are pulled as OCI artifacts with ``kaito_oci pull`` (what the tuning Job pushes) instead of
  copying ``/data`` out of a container image; StatefulSets get adapters too;
* the inference config is a ConfigMap owned by the workspace (``<ws>-inference-params``) when the user
  names none, instead of an unowned copy of a template from the release namespace;
* a CPU-capable preset on a CPU instance type (upstream has none) runs without ``nvidia.com/gpu``, with
  CPU/memory requests and limits from :func:`kaito.presets.cpu.cpu_resources`, launched as ``python3
  <main file> --device_map=cpu --torch_dtype=<cpu dtype> --torch_threads=<N>``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from kaito.api.workspace import (
    ANNOTATION_ENABLE_LB,
    ANNOTATION_RUNTIME,
    API_VERSION,
    DEFAULT_ADAPTER_STRENGTH,
    KIND,
    LABEL_WORKSPACE_NAME,
    AdapterSpec,
    ModelImageAccessMode,
    RuntimeName,
    Workspace,
)
from kaito.presets.cpu import CPUResources, cpu_resources
from kaito.presets.registry import DEFAULT_REGISTRY, Preset
from kaito.presets.skus import Sku

Obj = dict[str, Any]

ANNOTATION_SPEC_HASH = "kaito.sh/spec-hash"
"""Hash of what the controller wants a child to be; a differing value triggers an update."""

GPU_RESOURCE = "nvidia.com/gpu"
RUNTIME_PORT = 5000
TORCH_PORT = 29500
ADAPTER_DIR = "/mnt/adapter"
# Seconds a terminating inference pod keeps serving (preStop sleep), within the default 30 s grace period.
PRESTOP_SLEEP_SECONDS = 5
CONFIG_DIR = "/mnt/config"
INFERENCE_CONFIG_KEY = "inference_config.yaml"
HOSTNAME_LABEL = "kubernetes.io/hostname"
STATEFULSET_POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"

RUNTIME_WORKDIR = "/workspace/tfs"  # where the preset image keeps the runtime and kaito_oci
KAITO_RUNTIME_MAIN = f"{RUNTIME_WORKDIR}/inference_api.py"  # presets/inference, KAITO's transformers server

# upstream chart's inference-params.yaml (v0.4.1), the defaults the vLLM runtime reads.
DEFAULT_INFERENCE_CONFIG: dict[str, Any] = {
    "max_probe_steps": 6,
    "vllm": {"cpu-offload-gb": 0, "gpu-memory-utilization": 0.95, "swap-space": 4},
}


@dataclass(frozen=True)
class ManifestOptions:
    """Operator-wide settings the builders need (from command-line flags)."""

    registry: str = DEFAULT_REGISTRY
    default_runtime: RuntimeName = RuntimeName.TRANSFORMERS
    # Probes: the model can take many minutes to load; liveness must not kill it meanwhile.
    liveness_initial_delay: int = 600
    readiness_initial_delay: int = 30
    extra_tolerations: tuple[Obj, ...] = field(default_factory=tuple)


class ManifestError(ValueError):
    """The workspace cannot be turned into a workload (e.g. a runtime the preset does not support)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# ------------------------------------------------------------------------------------------ basics


def spec_hash(obj: Mapping[str, Any]) -> str:
    """sha256 (hex, 16 chars) of a manifest's canonical JSON, ignoring its own hash annotation."""
    clean = json.loads(json.dumps(obj, sort_keys=True, default=str))
    meta = clean.get("metadata") or {}
    annotations = meta.get("annotations")
    if isinstance(annotations, dict):
        annotations.pop(ANNOTATION_SPEC_HASH, None)
        if not annotations:
            del meta["annotations"]
    return hashlib.sha256(json.dumps(clean, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def with_hash(obj: Obj) -> Obj:
    """Stamp :data:`ANNOTATION_SPEC_HASH` on ``obj`` (in place) and return it."""
    digest = spec_hash(obj)
    obj.setdefault("metadata", {}).setdefault("annotations", {})[ANNOTATION_SPEC_HASH] = digest
    return obj


def owner_reference(ws: Workspace) -> Obj:
    """Controller ownerReference to the workspace (children are garbage-collected with it)."""
    return {
        "apiVersion": ws.api_version or API_VERSION,
        "kind": KIND,
        "name": ws.metadata.name,
        "uid": ws.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def selector_labels(ws: Workspace) -> dict[str, str]:
    """Pod labels and workload selectors: ``kaito.sh/workspace=<name>`` (upstream)."""
    return {LABEL_WORKSPACE_NAME: str(ws.metadata.name)}


def _meta(ws: Workspace, name: str | None = None) -> Obj:
    return {
        "name": name or ws.metadata.name,
        "namespace": ws.metadata.namespace,
        "labels": selector_labels(ws),
        "ownerReferences": [owner_reference(ws)],
    }


def runtime_of(
    ws: Workspace, preset: Preset | None, options: ManifestOptions, *, on_cpu: bool = False
) -> RuntimeName:
    """The runtime serving the preset: annotation ``kaito.sh/runtime``, else the operator default.

    A default the preset cannot run (no vLLM parameters, a distributed preset, which only
    transformers/torchrun serves, or a CPU node: our vLLM build needs a GPU) falls back to
    transformers; an explicit annotation never does.
    """
    raw = ws.annotations().get(ANNOTATION_RUNTIME)
    if raw:
        try:
            runtime = RuntimeName(raw.strip().lower())
        except ValueError:
            raise ManifestError(
                "UnsupportedRuntime",
                f"annotation {ANNOTATION_RUNTIME}={raw!r}: expected transformers or vllm",
            ) from None
        if on_cpu and runtime == RuntimeName.VLLM:
            raise ManifestError(
                "UnsupportedRuntime",
                f"annotation {ANNOTATION_RUNTIME}=vllm: the vllm runtime needs a GPU and "
                f"{ws.resource.instance_type} is a CPU instance type; remove the annotation or set it to "
                "transformers",
            )
        return runtime
    runtime = options.default_runtime
    if (
        runtime == RuntimeName.VLLM
        and preset is not None
        and (preset.runtime.vllm is None or preset.distributed_inference or on_cpu)
    ):
        return RuntimeName.TRANSFORMERS
    return runtime


# Instance-type names of GPU/accelerator families (Azure N-series; AWS p, g, inf, trn, dl).
_GPU_FAMILY = re.compile(r"^(standard_n|p\d|g\d|inf\d|trn\d|dl\d)", re.IGNORECASE)


def cpu_plan(
    ws: Workspace, preset: Preset | None, sku: Sku | None, node_gpus: Sequence[int] = ()
) -> CPUResources | None:
    """The CPU sizing when the workload runs on CPU nodes, None when it runs on GPUs.

    A catalog SKU decides by itself (``gpuCount: 0`` is a CPU SKU). An instance type the catalog does
    not know (a bring-your-own node admitted with a warning) runs on CPU when the preset can, the
    selected nodes report no ``nvidia.com/gpu`` and its name is not a GPU family's (a GPU node whose
    device plugin has not registered yet must not get a CPU workload). A preset without a ``cpu:``
    section on a CPU SKU is a :class:`ManifestError` (admission refuses it unless bypassed).
    """
    if preset is None:
        return None
    if sku is not None:
        if not sku.is_cpu:
            return None
        if preset.cpu is None:
            raise ManifestError(
                "PresetNotCPUCapable",
                f"preset {preset.name} cannot run on CPU and {sku.name} has no GPU; pick a GPU instance type",
            )
        return cpu_resources(preset, sku)
    if (
        preset.cpu is None
        or not node_gpus
        or any(n > 0 for n in node_gpus)
        or _GPU_FAMILY.match(ws.resource.instance_type)
    ):
        return None
    return cpu_resources(preset, None)


def gpus_per_node(preset: Preset | None, sku: Sku | None, node_gpus: Sequence[int] = ()) -> int:
    """GPUs each pod requests: the SKU's GPU count, else a worker node's capacity, else the preset's."""
    if sku is not None:
        return sku.gpu_count
    for n in node_gpus:
        if n > 0:
            return n
    if preset is not None:
        return preset.gpu_count
    return 1


def is_distributed(ws: Workspace, preset: Preset | None) -> bool:
    """Whether the workload is a StatefulSet spanning ``count`` nodes (distributed presets)."""
    return preset is not None and preset.distributed_inference


def node_affinity(match_labels: Mapping[str, str], nodes: Sequence[str] = ()) -> Obj:
    """Required node affinity: every ``matchLabels`` pair (sorted) and, if given, the selected nodes."""
    exprs: list[Obj] = [
        {"key": k, "operator": "In", "values": [match_labels[k]]} for k in sorted(match_labels)
    ]
    if nodes:
        exprs.append({"key": HOSTNAME_LABEL, "operator": "In", "values": sorted(nodes)})
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": exprs}]
            }
        }
    }


def inference_tolerations(options: ManifestOptions) -> list[Obj]:
    """Tolerate GPU nodes' taints: ``nvidia.com/gpu`` (any) and ``sku=gpu`` (upstream)."""
    return [
        {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
        {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"},
        *options.extra_tolerations,
    ]


def image_of(ws: Workspace, preset: Preset, options: ManifestOptions) -> tuple[str, list[str]]:
    """Model image and pull secrets: the operator's registry, or ``presetOptions.image`` when private."""
    spec = ws.inference.preset if ws.inference is not None else None
    secrets: list[str] = []
    opts = spec.preset_options if spec is not None else None
    if opts is not None and opts.image_pull_secrets:
        secrets.extend(opts.image_pull_secrets)
    if spec is not None and (spec.access_mode == ModelImageAccessMode.PRIVATE or preset.is_private):
        if opts is None or not opts.image:
            raise ManifestError(
                "PrivateImageMissing",
                f"preset {preset.name} needs a private image: set inference.preset.accessMode: private "
                "and inference.preset.presetOptions.image",
            )
        return opts.image, secrets
    return preset.image_ref(options.registry), secrets


# ---------------------------------------------------------------------------------- command line


def _render(params: Mapping[str, str]) -> list[str]:
    """``--key=value`` (``--key`` for an empty value), sorted by key so the command is stable."""
    return [f"--{k}" if v == "" else f"--{k}={v}" for k, v in sorted(params.items())]


def launch_command(
    ws: Workspace,
    preset: Preset,
    runtime: RuntimeName,
    gpus: int,
    *,
    has_adapters: bool = False,
    cpu_threads: int | None = None,
) -> list[str]:
    """The inference container's command, ``["/bin/sh", "-c", "<one line>"]`` (upstream §5.2).

    Transformers: ``<baseCommand> <accelerate|torchrun params> <main file> <model params>``; the main
    file is ``presets/inference/inference_api.py`` in the image. vLLM: ``python3
    /workspace/vllm/inference_api.py <model params> --served-model-name --tensor-parallel-size
    --kaito-config-file``. On a CPU node (``cpu_threads`` given): ``python3 <main file> <model params>
    --device_map=cpu --torch_dtype=<cpu.dtype> --torch_threads=<cpu_threads>`` (no accelerate: there
    is nothing to place). All launch flags are decided here only.
    """
    name = str(ws.metadata.name)
    count = ws.resource.count
    if runtime == RuntimeName.VLLM:
        vllm = preset.runtime.vllm
        if vllm is None:
            raise ManifestError("UnsupportedRuntime", f"preset {preset.name} cannot run on vllm")
        if is_distributed(ws, preset):
            raise ManifestError(
                "UnsupportedRuntime", f"distributed inference of {preset.name} is not supported on vllm"
            )
        params = dict(vllm.model_run_params)
        params["served-model-name"] = preset.vllm_model_name
        params["kaito-config-file"] = f"{CONFIG_DIR}/{INFERENCE_CONFIG_KEY}"
        if not vllm.disable_tensor_parallelism:
            params["tensor-parallel-size"] = str(gpus)
        if has_adapters and not vllm.disallow_lora:
            params["kaito-adapters-dir"] = ADAPTER_DIR
        line = " ".join([vllm.base_command, *_render(params)])
        return ["/bin/sh", "-c", line]

    tf = preset.runtime.transformers
    if tf is None:
        raise ManifestError("UnsupportedRuntime", f"preset {preset.name} cannot run on transformers")
    if cpu_threads is not None:
        return _cpu_launch_command(preset, cpu_threads)
    launcher: dict[str, str]
    if tf.torch_run_params:
        launcher = dict(tf.torch_run_params)
        if is_distributed(ws, preset):
            world = max(preset.world_size, 1)
            if count < 1 or world % count:
                # The checkpoint is split into exactly `world` shards, one per torch rank: any other
                # world size fails to load on every node (upstream rendered it anyway).
                fits = ", ".join(str(n) for n in range(1, world + 1) if world % n == 0)
                raise ManifestError(
                    "UnsupportedNodeCount",
                    f"preset {preset.name} runs as {world} torch ranks, which {count} nodes cannot share "
                    f"evenly: set resource.count to one of {fits}",
                )
            ns = ws.metadata.namespace
            launcher["nnodes"] = str(count)
            launcher["nproc_per_node"] = str(world // count)
            if count > 1:
                # The pod ordinal is the node rank; rank 0's stable DNS name is the rendezvous point.
                launcher["node_rank"] = "$(echo $HOSTNAME | grep -o '[^-]*$')"
                launcher["master_addr"] = f"{name}-0.{name}-headless.{ns}.svc.cluster.local"
                launcher["master_port"] = str(TORCH_PORT)
                launcher.update(tf.torch_run_rdzv_params)
                launcher["rdzv_endpoint"] = f"{name}-0.{name}-headless.{ns}.svc.cluster.local:{TORCH_PORT}"
    else:
        launcher = dict(tf.accelerate_params)
    model = dict(tf.model_run_params)
    if tf.inference_main_file == KAITO_RUNTIME_MAIN:
        # Only KAITO's own server takes --served_model_name (its OpenAI model id). The llama-2 images'
        # torchrun server parses its flags strictly and would exit on an unknown one.
        model["served_model_name"] = preset.name
    line = " ".join([tf.base_command, *_render(launcher), tf.inference_main_file, *_render(model)])
    return ["/bin/sh", "-c", line]


def _cpu_launch_command(preset: Preset, threads: int) -> list[str]:
    tf = preset.runtime.transformers
    assert tf is not None
    if preset.cpu is None or tf.inference_main_file != KAITO_RUNTIME_MAIN:
        # Only KAITO's own server takes --device_map/--torch_threads; other images (llama-2's torchrun
        # server) are GPU-only.
        raise ManifestError("PresetNotCPUCapable", f"preset {preset.name} cannot run on CPU")
    model = dict(tf.model_run_params)
    model["served_model_name"] = preset.name
    model["torch_dtype"] = preset.cpu.dtype
    model["device_map"] = "cpu"
    model["torch_threads"] = str(threads)
    return ["/bin/sh", "-c", " ".join(["python3", tf.inference_main_file, *_render(model)])]


# ---------------------------------------------------------------------------------------- adapters


def adapter_strength(adapter: AdapterSpec) -> str:
    """The adapter's strength, ``"1.0"`` when omitted (upstream dereferenced nil here: hazard §2.8)."""
    return adapter.strength if adapter.strength not in (None, "") else DEFAULT_ADAPTER_STRENGTH


def adapters_of(ws: Workspace) -> list[AdapterSpec]:
    """Adapters that have a source with a name and an image (others are rejected at admission)."""
    if ws.inference is None:
        return []
    return [
        a for a in ws.inference.adapters or [] if a.source is not None and a.source.name and a.source.image
    ]


def adapter_init_containers(ws: Workspace, image: str) -> tuple[list[Obj], list[Obj]]:
    """One init container per adapter pulling its OCI artifact into ``/mnt/adapter/<name>``, plus volumes.

    The pull runs ``kaito_oci`` from the preset image (``image``): it reads the artifact our tuning Job
    pushes (one tar+gzip layer without a file title, which the oras CLI would skip) and upstream's shapes.
    An adapter's pull secret is projected as the docker ``config.json`` the client reads.
    """
    containers: list[Obj] = []
    volumes: list[Obj] = []
    for adapter in adapters_of(ws):
        src = adapter.source
        assert src is not None and src.name and src.image
        args: list[str] = []
        mounts: list[Obj] = [{"name": "adapter-volume", "mountPath": ADAPTER_DIR}]
        if src.image_pull_secrets:
            vol = f"adapter-auth-{src.name}"[:63].rstrip("-.")
            path = f"/tmp/.docker/adapter-{src.name}"
            volumes.append(
                {
                    "name": vol,
                    "secret": {
                        "secretName": src.image_pull_secrets[0],
                        "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
                    },
                }
            )
            mounts.append({"name": vol, "mountPath": path, "readOnly": True})
            args += ["--docker-config", path]
        containers.append(
            {
                "name": src.name,
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "workingDir": RUNTIME_WORKDIR,
                "command": [
                    "python3",
                    "-m",
                    "kaito_oci",
                    "pull",
                    *args,
                    src.image,
                    f"{ADAPTER_DIR}/{src.name}",
                ],
                "volumeMounts": mounts,
            }
        )
    return containers, volumes


def adapter_env(ws: Workspace) -> list[Obj]:
    """One env var per adapter, named like it, holding its strength (what the runtime reads)."""
    return [{"name": str(a.source.name), "value": adapter_strength(a)} for a in adapters_of(ws) if a.source]


# --------------------------------------------------------------------------------------- services


def build_service(ws: Workspace, *, distributed: bool = False) -> Obj:
    """Service ``<ws>``: 80 -> 5000 (``http``) and 29500 (``torch``); LoadBalancer with ``kaito.sh/enablelb``."""
    lb = ws.annotations().get(ANNOTATION_ENABLE_LB) == "True"
    selector = selector_labels(ws)
    if distributed:
        selector[STATEFULSET_POD_NAME_LABEL] = f"{ws.metadata.name}-0"  # traffic to rank 0 only
    svc: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ws),
        "spec": {
            "type": "LoadBalancer" if lb else "ClusterIP",
            "selector": selector,
            "ports": [
                {"name": "http", "port": 80, "targetPort": RUNTIME_PORT, "protocol": "TCP"},
                {"name": "torch", "port": TORCH_PORT, "targetPort": TORCH_PORT, "protocol": "TCP"},
            ],
            # Only ready pods get requests: upstream published not-ready ones too, which sends clients
            # to a pod still loading its model, and to one that is shutting down, during every roll
            # (measured on a real node: 29 of 712 requests refused). torchrun's ranks find each other
            # through the headless Service, which keeps publishing them.
            "publishNotReadyAddresses": False,
        },
    }
    return with_hash(svc)


def build_headless_service(ws: Workspace) -> Obj:
    """Headless Service ``<ws>-headless`` giving StatefulSet pods stable DNS names for torchrun."""
    svc: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ws, f"{ws.metadata.name}-headless"),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(ws),
            "ports": [{"name": "torchrun", "port": TORCH_PORT, "targetPort": TORCH_PORT, "protocol": "TCP"}],
            "publishNotReadyAddresses": True,
        },
    }
    return with_hash(svc)


def inference_config_name(ws: Workspace) -> str:
    """The ConfigMap mounted at ``/mnt/config``: the user's ``inference.config`` or ``<ws>-inference-params``."""
    if ws.inference is not None and ws.inference.config:
        return ws.inference.config
    return f"{ws.metadata.name}-inference-params"


def build_inference_config(ws: Workspace) -> Obj | None:
    """The default inference ConfigMap when the user names none (``None`` when they do)."""
    if ws.inference is not None and ws.inference.config:
        return None
    cm: Obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(ws, inference_config_name(ws)),
        "data": {INFERENCE_CONFIG_KEY: _default_inference_config_yaml()},
    }
    return with_hash(cm)


@functools.cache
def _default_inference_config_yaml() -> str:
    # Rendered once: PyYAML's dumper was a fifth of a workspace's manifest-building time.
    return yaml.safe_dump(DEFAULT_INFERENCE_CONFIG, sort_keys=True)


# -------------------------------------------------------------------------------------- workloads


def _probe(path: str, delay: int) -> Obj:
    return {
        "httpGet": {"path": path, "port": RUNTIME_PORT, "scheme": "HTTP"},
        "initialDelaySeconds": delay,
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    }


def _pod_spec(
    ws: Workspace,
    preset: Preset,
    options: ManifestOptions,
    *,
    gpus: int,
    nodes: Sequence[str],
    with_adapters: bool,
    one_per_node: bool = False,
    cpu: CPUResources | None = None,
) -> Obj:
    runtime = runtime_of(ws, preset, options, on_cpu=cpu is not None)
    image, pull_secrets = image_of(ws, preset, options)
    adapters = adapters_of(ws) if with_adapters else []
    init_containers, adapter_volumes = adapter_init_containers(ws, image) if adapters else ([], [])
    mounts: list[Obj] = [{"name": "config-volume", "mountPath": CONFIG_DIR, "readOnly": True}]
    volumes: list[Obj] = [{"name": "config-volume", "configMap": {"name": inference_config_name(ws)}}]
    if gpus > 1 or ws.resource.count > 1:
        # NCCL and torch share tensors through /dev/shm; the container default of 64 MiB is too small.
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    if adapters:
        mounts.append({"name": "adapter-volume", "mountPath": ADAPTER_DIR})
        volumes.append({"name": "adapter-volume", "emptyDir": {}})
        volumes.extend(adapter_volumes)
        for a in adapters:
            if a.source is not None:
                for s in a.source.image_pull_secrets or []:
                    if s not in pull_secrets:
                        pull_secrets.append(s)
    threads = cpu.threads if cpu is not None else None
    resources = (
        cpu.as_container_resources()
        if cpu is not None
        else {"requests": {GPU_RESOURCE: str(gpus)}, "limits": {GPU_RESOURCE: str(gpus)}}
    )
    container: Obj = {
        "name": str(ws.metadata.name),
        "image": image,
        "command": launch_command(
            ws, preset, runtime, gpus, has_adapters=bool(adapters), cpu_threads=threads
        ),
        "ports": [{"name": "http", "containerPort": RUNTIME_PORT, "protocol": "TCP"}],
        "resources": resources,
        "livenessProbe": _probe("/health", options.liveness_initial_delay),
        "readinessProbe": _probe("/health", options.readiness_initial_delay),
        # A pod leaving a roll keeps serving until the Service has stopped sending it new connections:
        # the endpoint update reaches every node's proxy a moment after the pod is marked terminating,
        # and the server stops accepting at SIGTERM. Without this pause that moment fails requests.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "volumeMounts": mounts,
    }
    env = adapter_env(ws) if adapters else []
    if env:
        container["env"] = env
    affinity = node_affinity(ws.resource.label_selector.as_map(), nodes)
    if one_per_node:
        # Each rank is one of status.workerNodes: a preferred node with spare GPUs must not take two
        # ranks and leave another selected node idle.
        affinity["podAntiAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": selector_labels(ws)}, "topologyKey": HOSTNAME_LABEL}
            ]
        }
    spec: Obj = {
        "affinity": affinity,
        "tolerations": inference_tolerations(options),
        "containers": [container],
        "volumes": volumes,
    }
    if init_containers:
        spec["initContainers"] = init_containers
    if pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in pull_secrets]
    return spec


def build_deployment(
    ws: Workspace,
    preset: Preset,
    options: ManifestOptions,
    *,
    gpus: int,
    nodes: Sequence[str] = (),
    cpu: CPUResources | None = None,
) -> Obj:
    """Deployment ``<ws>`` for a preset that fits one node: ``replicas = count``, surge rollout.

    ``cpu``: the sizing on a CPU node (no GPU request; see :func:`cpu_plan`)."""
    dep: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(ws),
        "spec": {
            "replicas": ws.resource.count,
            "selector": {"matchLabels": selector_labels(ws)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": selector_labels(ws)},
                "spec": _pod_spec(ws, preset, options, gpus=gpus, nodes=nodes, with_adapters=True, cpu=cpu),
            },
        },
    }
    return with_hash(dep)


def build_statefulset(
    ws: Workspace,
    preset: Preset,
    options: ManifestOptions,
    *,
    gpus: int,
    nodes: Sequence[str] = (),
) -> Obj:
    """StatefulSet ``<ws>`` (parallel pods, headless service) for presets spread over ``count`` nodes."""
    sts: Obj = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(ws),
        "spec": {
            "replicas": ws.resource.count,
            "podManagementPolicy": "Parallel",
            "serviceName": f"{ws.metadata.name}-headless",
            "selector": {"matchLabels": selector_labels(ws)},
            "template": {
                "metadata": {"labels": selector_labels(ws)},
                "spec": _pod_spec(
                    ws, preset, options, gpus=gpus, nodes=nodes, with_adapters=True, one_per_node=True
                ),
            },
        },
    }
    return with_hash(sts)


def build_template_deployment(ws: Workspace, options: ManifestOptions, *, nodes: Sequence[str] = ()) -> Obj:
    """Deployment ``<ws>`` wrapping ``inference.template`` (label, affinity and tolerations added)."""
    assert ws.inference is not None and ws.inference.template is not None
    template = json.loads(json.dumps(ws.inference.template))
    meta = template.setdefault("metadata", {})
    meta.setdefault("labels", {}).update(selector_labels(ws))
    spec = template.setdefault("spec", {})
    spec["affinity"] = node_affinity(ws.resource.label_selector.as_map(), nodes)
    spec["tolerations"] = [*(spec.get("tolerations") or []), *inference_tolerations(options)]
    dep: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(ws),
        "spec": {
            "replicas": ws.resource.count,
            "selector": {"matchLabels": selector_labels(ws)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": template,
        },
    }
    return with_hash(dep)


@dataclass
class Workload:
    """Everything an inference workspace needs, in creation order (services before the workload)."""

    services: list[Obj]
    config_map: Obj | None
    workload: Obj

    @property
    def kind(self) -> str:
        """``Deployment`` or ``StatefulSet``."""
        return str(self.workload["kind"])

    def objects(self) -> list[Obj]:
        """All objects, in creation order."""
        out = list(self.services)
        if self.config_map is not None:
            out.append(self.config_map)
        out.append(self.workload)
        return out


def build_inference(
    ws: Workspace,
    preset: Preset | None,
    options: ManifestOptions,
    *,
    sku: Sku | None,
    nodes: Sequence[str],
    node_gpus: Sequence[int] = (),
) -> Workload:
    """The inference children of ``ws`` on ``nodes`` (raises :class:`ManifestError` for a bad spec).

    ``sku`` is the catalog entry of ``resource.instanceType`` (None when unknown) and ``node_gpus`` the
    ``nvidia.com/gpu`` of each selected node: together they decide GPU or CPU (:func:`cpu_plan`)."""
    if ws.inference is None:
        raise ManifestError("NotInference", "workspace has no inference section")
    if ws.inference.template is not None:
        return Workload(
            services=[build_service(ws)],
            config_map=None,
            workload=build_template_deployment(ws, options, nodes=nodes),
        )
    if preset is None:
        raise ManifestError("UnknownPreset", "inference.preset names no known preset")
    cpu = cpu_plan(ws, preset, sku, node_gpus)
    gpus = 0 if cpu is not None else gpus_per_node(preset, sku, node_gpus)
    if is_distributed(ws, preset):
        return Workload(
            services=[build_service(ws, distributed=True), build_headless_service(ws)],
            config_map=build_inference_config(ws),
            workload=build_statefulset(ws, preset, options, gpus=gpus, nodes=nodes),
        )
    return Workload(
        services=[build_service(ws)],
        config_map=build_inference_config(ws),
        workload=build_deployment(ws, preset, options, gpus=gpus, nodes=nodes, cpu=cpu),
    )


def command_line(container: Mapping[str, Any]) -> list[str]:
    """The launch line of a container built here, split like a shell would (for tests and messages)."""
    cmd = container.get("command") or []
    if len(cmd) == 3 and cmd[:2] == ["/bin/sh", "-c"]:
        return shlex.split(str(cmd[2]))
    return [str(c) for c in cmd]
