"""GPU instance-type catalog (``presets/skus/<cloud>.yaml``): GPU count, total GPU memory, GPU model."""

from __future__ import annotations

import builtins
import difflib
from decimal import Decimal
from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from kaito.api.quantity import parse_quantity, to_gib
from kaito.presets.catalog import CatalogError, catalog_dir

CLOUDS = ("azure", "aws", "arc")


class GPUSku(BaseModel):
    """One instance type. ``gpu_memory`` is the total across all GPUs of the node."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    name: str
    cloud: str = ""
    gpu_count: int = Field(ge=1)
    gpu_memory: str
    gpu_model: str
    nvme_disk: bool = False

    @field_validator("gpu_memory")
    @classmethod
    def _quantity(cls, value: str) -> str:
        parse_quantity(value)
        return value

    @property
    def gpu_memory_gib(self) -> Decimal:
        """Total GPU memory of one node in GiB."""
        return to_gib(self.gpu_memory)

    @property
    def per_gpu_memory_gib(self) -> Decimal:
        """GPU memory of one GPU in GiB."""
        return self.gpu_memory_gib / self.gpu_count

    def describe(self) -> str:
        """``"1x NVIDIA V100, 16Gi"`` for messages."""
        return f"{self.gpu_count}x {self.gpu_model}, {self.gpu_memory} GPU memory"


class _SkuFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cloud: str
    skus: list[GPUSku]


class SkuCatalog:
    """All known instance types, by cloud. Lookups are exact, with a case-insensitive fallback."""

    def __init__(self, skus: list[GPUSku]) -> None:
        self._by_name: dict[str, GPUSku] = {}
        self._by_lower: dict[str, GPUSku] = {}
        for sku in skus:
            if sku.name in self._by_name:
                raise CatalogError(f"SKU {sku.name} is listed twice")
            self._by_name[sku.name] = sku
            self._by_lower[sku.name.lower()] = sku

    @classmethod
    def load(cls, directory: Path | None = None) -> SkuCatalog:
        """Read every ``*.yaml`` of ``directory`` (default: ``<catalog>/skus``)."""
        directory = directory or catalog_dir() / "skus"
        skus: list[GPUSku] = []
        for path in sorted(directory.glob("*.yaml")):
            try:
                data = _SkuFile.model_validate(yaml.safe_load(path.read_text()))
            except (ValidationError, yaml.YAMLError) as e:
                raise CatalogError(f"{path}: {e}") from e
            skus.extend(sku.model_copy(update={"cloud": data.cloud}) for sku in data.skus)
        if not skus:
            raise CatalogError(f"no SKUs found in {directory}")
        return cls(skus)

    def get(self, name: str, cloud: str | None = None) -> GPUSku | None:
        """The SKU called ``name`` (in ``cloud`` when given), or None when unknown."""
        sku = self._by_name.get(name) or self._by_lower.get(name.lower())
        if sku is None or (cloud and sku.cloud != cloud):
            return None
        return sku

    def list(self, cloud: str | None = None) -> builtins.list[GPUSku]:
        """All SKUs (of one cloud when given), in catalog order."""
        return [s for s in self._by_name.values() if cloud is None or s.cloud == cloud]

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
