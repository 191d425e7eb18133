"""Kubernetes resource quantities ("16Gi", "400", "1.5G", "500m") parsed exactly.

Preset memory figures and Machine storage requests are quantities; comparing them as floats would
round "16.5Gi" and friends, so everything here works on :class:`decimal.Decimal`.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

GIB = Decimal(1024**3)

_BINARY = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1)}
_DECIMAL.update({"k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12)})
_DECIMAL.update({"P": Decimal(10**15), "E": Decimal(10**18)})

_QUANTITY = re.compile(
    r"^(?P<num>[+-]?(?:\d+\.?\d*|\.\d+))(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])|[eE](?P<exp>[+-]?\d+))?$"
)


class QuantityError(ValueError):
    """A string that is not a Kubernetes quantity."""


def parse_quantity(value: str | int | float) -> Decimal:
    """Return the quantity's value in base units (bytes for memory), e.g. ``"1Gi"`` -> 1073741824."""
    if isinstance(value, bool):
        raise QuantityError(f"{value!r} is not a quantity")
    if isinstance(value, int | float):
        return Decimal(str(value))
    match = _QUANTITY.match(value.strip())
    if match is None:
        raise QuantityError(f"{value!r} is not a Kubernetes quantity (examples: 16Gi, 500Mi, 1.5, 400G)")
    try:
        number = Decimal(match["num"])
    except InvalidOperation as e:  # pragma: no cover - the regex admits only decimal literals
        raise QuantityError(f"{value!r} is not a Kubernetes quantity") from e
    if match["exp"] is not None:
        return number * (Decimal(10) ** int(match["exp"]))
    suffix = match["suffix"] or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    return number * _DECIMAL[suffix]


def to_gib(value: str | int | float) -> Decimal:
    """The quantity expressed in GiB (binary gigabytes)."""
    return parse_quantity(value) / GIB


def format_gib(value: Decimal) -> str:
    """Render a GiB amount for messages: ``16`` -> ``"16Gi"``, ``16.5`` -> ``"16.5Gi"``."""
    text = format(value.normalize(), "f")
    return f"{text}Gi"
