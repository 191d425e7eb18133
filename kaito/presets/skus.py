"""Instance-type catalog (``presets/skus/<cloud>*.yaml``): GPU sizes and CPU-only sizes.

A GPU SKU has ``gpuCount``/``gpuMemory``/``gpuModel``; a CPU SKU (``gpuCount: 0``, the default) has
``vcpus`` and ``memory`` instead and runs the presets whose catalog entry has a ``cpu:`` section. One type
serves both so every lookup, suggestion and message path stays the same; :attr:`Sku.is_cpu` tells them
apart. GPU SKUs may state ``vcpus``/``memory`` too (unused today).
"""

from __future__ import annotations

import builtins
import difflib
from decimal import Decimal
from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kaito.api.quantity import parse_quantity, to_gib
from kaito.presets.catalog import CatalogError, catalog_dir

CLOUDS = ("azure", "aws", "arc")


def gib_text(value: Decimal) -> str:
    """A GiB amount as people write it: ``Decimal(8)`` -> ``"8 GiB"``, ``Decimal("7.5")`` -> ``"7.5 GiB"``."""
    return f"{format(value.normalize(), 'f')} GiB"


class Sku(BaseModel):
    """One instance type. ``gpu_memory`` is the total across all GPUs of the node; ``memory`` its RAM."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    name: str
    cloud: str = ""
    gpu_count: int = Field(default=0, ge=0)
    gpu_memory: str = "0"
    gpu_model: str = ""
    nvme_disk: bool = False
    vcpus: int | None = Field(default=None, ge=1)
    memory: str | None = None

    @field_validator("gpu_memory", "memory")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None:
            parse_quantity(value)
        return value

    @model_validator(mode="after")
    def _kind_complete(self) -> Sku:
        if self.gpu_count > 0 and (not self.gpu_model or to_gib(self.gpu_memory) <= 0):
            raise ValueError(f"{self.name}: a GPU SKU needs gpuMemory and gpuModel")
        if self.gpu_count == 0 and (self.vcpus is None or self.memory is None):
            raise ValueError(f"{self.name}: a CPU SKU (gpuCount 0) needs vcpus and memory")
        return self

    @property
    def is_cpu(self) -> bool:
        """Whether this is a CPU-only instance type (no GPU)."""
        return self.gpu_count == 0

    @property
    def gpu_memory_gib(self) -> Decimal:
        """Total GPU memory of one node in GiB (0 for a CPU SKU)."""
        return to_gib(self.gpu_memory)

    @property
    def per_gpu_memory_gib(self) -> Decimal:
        """GPU memory of one GPU in GiB (0 for a CPU SKU)."""
        return self.gpu_memory_gib / self.gpu_count if self.gpu_count else Decimal(0)

    @property
    def memory_gib(self) -> Decimal:
        """The node's RAM in GiB (0 when the catalog does not say)."""
        return to_gib(self.memory) if self.memory is not None else Decimal(0)

    def describe(self) -> str:
        """``"1x NVIDIA V100, 16Gi GPU memory"`` or ``"CPU only: 2 vCPUs, 8 GiB memory"`` for messages."""
        if self.is_cpu:
            return f"CPU only: {self.vcpus} vCPUs, {gib_text(self.memory_gib)} memory"
        return f"{self.gpu_count}x {self.gpu_model}, {self.gpu_memory} GPU memory"


GPUSku = Sku
"""The name the GPU-only code paths use; a CPU SKU is the same type with ``gpu_count == 0``."""


class _SkuFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cloud: str
    skus: list[Sku]


class SkuCatalog:
    """All known instance types, by cloud. Lookups are exact, with a case-insensitive fallback."""

    def __init__(self, skus: list[Sku]) -> None:
        self._by_name: dict[str, Sku] = {}
        self._by_lower: dict[str, Sku] = {}
        for sku in skus:
            if sku.name in self._by_name:
                raise CatalogError(f"SKU {sku.name} is listed twice")
            self._by_name[sku.name] = sku
            self._by_lower[sku.name.lower()] = sku

    @classmethod
    def load(cls, directory: Path | None = None) -> SkuCatalog:
        """Read every ``*.yaml`` of ``directory`` (default: ``<catalog>/skus``)."""
        directory = directory or catalog_dir() / "skus"
        skus: list[Sku] = []
        for path in sorted(directory.glob("*.yaml")):
            try:
                data = _SkuFile.model_validate(yaml.safe_load(path.read_text()))
            except (ValidationError, yaml.YAMLError) as e:
                raise CatalogError(f"{path}: {e}") from e
            skus.extend(sku.model_copy(update={"cloud": data.cloud}) for sku in data.skus)
        if not skus:
            raise CatalogError(f"no SKUs found in {directory}")
        return cls(skus)

    def get(self, name: str, cloud: str | None = None) -> Sku | None:
        """The SKU called ``name`` (in ``cloud`` when given), or None when unknown."""
        sku = self._by_name.get(name) or self._by_lower.get(name.lower())
        if sku is None or (cloud and sku.cloud != cloud):
            return None
        return sku

    def list(self, cloud: str | None = None) -> builtins.list[Sku]:
        """All SKUs (of one cloud when given), in catalog order."""
        return [s for s in self._by_name.values() if cloud is None or s.cloud == cloud]

    def cpu_skus(self, cloud: str | None = None) -> builtins.list[Sku]:
        """The CPU-only SKUs (of one cloud when given), in catalog order."""
        return [s for s in self.list(cloud) if s.is_cpu]

    def clouds(self) -> builtins.list[str]:
        """Clouds that have at least one SKU."""
        return sorted({s.cloud for s in self._by_name.values()})

    def suggest(self, name: str, cloud: str | None = None, limit: int = 3) -> builtins.list[str]:
        """Known SKU names that look like ``name`` (for "did you mean" messages)."""
        names = [s.name for s in self.list(cloud)]
        lowered = {n.lower(): n for n in names}
        close = difflib.get_close_matches(name.lower(), list(lowered), n=limit, cutoff=0.6)
        return [lowered[c] for c in close]


@cache
def default_sku_catalog() -> SkuCatalog:
    """The catalog from the default location, loaded once per process."""
    return SkuCatalog.load()
