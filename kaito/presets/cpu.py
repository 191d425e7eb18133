"""Presets on CPU-only instance types: whether they fit, and how big their pods are.

Upstream KAITO serves on GPUs only. Here a preset whose catalog entry has a ``cpu:`` section
(:class:`~kaito.presets.registry.CPUParams`) may run on a CPU SKU (``gpuCount: 0`` in
``presets/skus/*-cpu.yaml``). This module holds the pure rules the webhook and the controller share:

* :func:`check_cpu_fit` / :func:`explain_cpu_misfit`: admission's fit check for inference, with the
  smallest SKU that fits as the fix (the CPU twin of :func:`~kaito.presets.registry.check_fit`);
* :func:`check_cpu_tuning_fit`: tuning on CPU (``qlora`` refused: bitsandbytes needs a GPU);
* :func:`cpu_resources`: the pod's requests, limits and torch thread count on a CPU node.

The node keeps a share of its CPU and memory for the kubelet, the OS and DaemonSets
(:func:`usable_cpu_millis`, :func:`usable_memory_gib`), so "fits" means "fits in what pods can have".
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from kaito.api.quantity import to_gib
from kaito.presets.registry import FitProblem, Preset, PresetRegistry
from kaito.presets.skus import Sku, SkuCatalog, gib_text

# What a node keeps for itself (kubelet, container runtime, OS, DaemonSets such as kube-proxy and the
# CNI): 500m + 2% of its CPU and 1 GiB + 5% of its memory, a little above AKS's kube-reserved and
# eviction thresholds so a pod sized from the SKU always schedules.
RESERVED_CPU_MILLIS = 500
RESERVED_CPU_FRACTION = Decimal("0.02")
RESERVED_MEMORY_GIB = Decimal(1)
RESERVED_MEMORY_FRACTION = Decimal("0.05")

# bitsandbytes' 4/8-bit kernels run on NVIDIA GPUs only.
GPU_ONLY_TUNING_METHODS = frozenset({"qlora"})

Obj = dict[str, Any]


def usable_cpu_millis(sku: Sku) -> int:
    """Millicores pods can request on one node of ``sku`` (rounded down to 100m, at least 100m)."""
    total = (sku.vcpus or 0) * 1000
    usable = Decimal(total) * (1 - RESERVED_CPU_FRACTION) - RESERVED_CPU_MILLIS
    return max(100, int(usable) // 100 * 100)


def usable_memory_gib(sku: Sku) -> Decimal:
    """GiB of memory pods can have on one node of ``sku`` (its RAM less the node's own share)."""
    usable = sku.memory_gib * (1 - RESERVED_MEMORY_FRACTION) - RESERVED_MEMORY_GIB
    return max(Decimal(0), usable)


def cpu_memory_needed_gib(preset: Preset, method: str | None = None) -> Decimal:
    """GiB of RAM ``preset`` needs on CPU: to serve it, or to tune it with ``method`` when given."""
    assert preset.cpu is not None
    if method is not None:
        # LoRA training holds activations and optimizer state besides the weights: twice the serving
        # memory unless the catalog says otherwise.
        return to_gib(preset.cpu.tuning_memory) if preset.cpu.tuning_memory else 2 * to_gib(preset.cpu.memory)
    return to_gib(preset.cpu.memory)


def _not_on_cpu(preset: Preset, sku: Sku) -> FitProblem:
    return FitProblem(
        "cpu-unsupported",
        f"preset {preset.name} cannot run on CPU (it needs {preset.gpu_count} GPU(s) with "
        f"{preset.total_gpu_memory} GPU memory) and {sku.name} has no GPU",
    )


def check_cpu_fit(preset: Preset, sku: Sku, *, method: str | None = None) -> list[FitProblem]:
    """Why one node of the CPU SKU ``sku`` cannot serve ``preset`` (or tune it with ``method``).

    Empty when it fits. Each pod of a CPU workload runs whole on one node (``resource.count`` makes
    replicas), so there is no pooling across nodes.
    """
    if preset.cpu is None:
        return [_not_on_cpu(preset, sku)]
    problems: list[FitProblem] = []
    usable_cpus = Decimal(usable_cpu_millis(sku)) / 1000
    if usable_cpus < preset.cpu.min_cpus:
        problems.append(
            FitProblem(
                "cpu-count",
                f"{sku.name} has {sku.vcpus} vCPUs ({usable_cpus.normalize():f} of them for pods), "
                f"{preset.name} needs {preset.cpu.min_cpus.normalize():f} on CPU",
            )
        )
    needed = cpu_memory_needed_gib(preset, method)
    usable = usable_memory_gib(sku)
    if usable < needed:
        what = f"to tune with {method}" if method else "on CPU"
        kept = (
            f" ({gib_text(sku.memory_gib - usable)} of it is kept for the node itself)"
            if sku.memory_gib >= needed
            else ""
        )
        problems.append(
            FitProblem(
                "memory",
                f"{sku.name} has {gib_text(sku.memory_gib)}{kept}, {preset.name} needs "
                f"{gib_text(needed)} {what}",
            )
        )
    return problems


def check_cpu_tuning_fit(preset: Preset, sku: Sku, method: str) -> list[FitProblem]:
    """Why ``preset`` cannot be tuned with ``method`` on one node of the CPU SKU ``sku`` (empty: it can)."""
    if method in GPU_ONLY_TUNING_METHODS:
        return [
            FitProblem(
                "method-needs-gpu",
                f"{method} quantizes the base model with bitsandbytes, which needs an NVIDIA GPU, and "
                f"{sku.name} is CPU only",
            )
        ]
    return check_cpu_fit(preset, sku, method=method)


def family_of(name: str) -> str:
    """The size family of an instance type: ``Standard_D#s_v3`` for ``Standard_D4s_v3``, ``m5`` for ``m5.large``."""
    if "." in name:
        return name.split(".", 1)[0]
    return re.sub(r"^(Standard_[A-Za-z]+)\d+", r"\1#", name)


def fitting_cpu_skus(
    preset: Preset, catalog: SkuCatalog, cloud: str | None = None, *, method: str | None = None
) -> list[Sku]:
    """CPU SKUs on which one node serves (or tunes) ``preset``, smallest memory first."""
    fits = [s for s in catalog.cpu_skus(cloud) if not check_cpu_fit(preset, s, method=method)]
    return sorted(fits, key=lambda s: (s.memory_gib, s.vcpus or 0, s.name))


def _shortlist(names: Sequence[str], limit: int = 3) -> str:
    return ", ".join(names[:limit])


def cpu_fix(
    preset: Preset,
    sku: Sku,
    problems: Sequence[FitProblem],
    catalog: SkuCatalog,
    registry: PresetRegistry,
    *,
    method: str | None = None,
) -> str:
    """What to pick instead of ``sku`` (the clause after the problems in a misfit message)."""
    if any(p.kind in ("cpu-unsupported", "method-needs-gpu") for p in problems):
        gpus = [s.name for s in registry.fitting_skus(preset, catalog, sku.cloud or None)]
        pick = f"pick a GPU instance type such as {_shortlist(gpus)}" if gpus else "pick a GPU instance type"
        if any(p.kind == "method-needs-gpu" for p in problems) and preset.cpu is not None:
            return f"use method lora on this instance type, or {pick}"
        return pick
    fitting = fitting_cpu_skus(preset, catalog, sku.cloud or None, method=method)
    same_family = [s for s in fitting if family_of(s.name) == family_of(sku.name)]
    if same_family:
        return f"pick {same_family[0].name} or larger"
    if fitting:
        return f"pick a larger instance type such as {_shortlist([s.name for s in fitting])}"
    gpus = [s.name for s in registry.fitting_skus(preset, catalog, sku.cloud or None)]
    return (
        f"no known CPU instance type is large enough; pick a GPU instance type such as {_shortlist(gpus)}"
        if gpus
        else "no known instance type is large enough"
    )


def explain_cpu_misfit(
    preset: Preset,
    sku: Sku,
    catalog: SkuCatalog,
    registry: PresetRegistry,
    *,
    method: str | None = None,
) -> str | None:
    """One sentence saying why ``sku`` cannot serve (or tune, with ``method``) ``preset``, and what to
    pick instead; None when it fits. E.g. ``"Standard_D2s_v3 has 8 GiB, phi-3-mini-4k-instruct needs
    12 GiB on CPU; pick Standard_D4s_v3 or larger"``."""
    problems = check_cpu_tuning_fit(preset, sku, method) if method else check_cpu_fit(preset, sku)
    if not problems:
        return None
    detail = "; ".join(p.message for p in problems)
    return f"{detail}; {cpu_fix(preset, sku, problems, catalog, registry, method=method)}"


# ------------------------------------------------------------------------------------- pod sizing


@dataclass(frozen=True)
class CPUResources:
    """A CPU workload's container resources and the torch thread count that goes with them.

    * ``requests.cpu``: half of what the node can give pods (at least the preset's ``minCPUs``), so the
      surge pod of a rolling update fits next to the running one on the same node;
    * ``limits.cpu``: what the node can give pods; ``threads`` is that limit in whole cores, so torch
      runs one thread per core it may use instead of one per host core (cgroup quotas are invisible to
      it) and is not throttled mid-matmul;
    * ``requests.memory``: the preset's need; ``limits.memory``: what the node can give pods (never
      below the need), so a long prompt is not OOM-killed early and the node's own share stays free.

    Without a SKU (a bring-your-own node of an unknown instance type) the preset's needs are all
    there is: requests = limits = the needs.
    """

    cpu_request_millis: int
    cpu_limit_millis: int
    memory_request: str
    memory_limit: str
    threads: int

    def as_container_resources(self) -> Obj:
        """The ``resources`` map of a container."""
        return {
            "requests": {"cpu": f"{self.cpu_request_millis}m", "memory": self.memory_request},
            "limits": {"cpu": f"{self.cpu_limit_millis}m", "memory": self.memory_limit},
        }


def _quantity(gib: Decimal) -> str:
    """``Decimal(12)`` -> ``"12Gi"``; fractions in whole MiB (``Decimal("0.5")`` -> ``"512Mi"``)."""
    if gib == gib.to_integral_value():
        return f"{int(gib)}Gi"
    return f"{int(gib * 1024)}Mi"


def cpu_resources(preset: Preset, sku: Sku | None, *, method: str | None = None) -> CPUResources:
    """Container resources of ``preset`` on one CPU node of ``sku`` (``method``: a tuning Job's)."""
    if preset.cpu is None:
        raise ValueError(f"preset {preset.name} has no cpu section")
    need_millis = int(preset.cpu.min_cpus * 1000)
    need = cpu_memory_needed_gib(preset, method)
    need_text = _quantity(need)
    if sku is None or not sku.is_cpu:
        return CPUResources(need_millis, need_millis, need_text, need_text, max(1, need_millis // 1000))
    limit = max(need_millis, usable_cpu_millis(sku))
    request = max(need_millis, limit // 2 // 100 * 100)
    memory_limit = max(need, usable_memory_gib(sku))
    return CPUResources(request, limit, need_text, _quantity(memory_limit), max(1, math.floor(limit / 1000)))
