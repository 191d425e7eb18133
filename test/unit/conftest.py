"""Catalogs the unit tests build against (loaded once per module)."""

from __future__ import annotations

import pytest

from kaito.presets.registry import PresetRegistry
from kaito.presets.skus import SkuCatalog


@pytest.fixture(scope="module")
def registry() -> PresetRegistry:
    return PresetRegistry.load()


@pytest.fixture(scope="module")
def skus() -> SkuCatalog:
    return SkuCatalog.load()
