"""Shared pieces of the API types: the camelCase base model, ObjectMeta, label selectors, CEL helpers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from kaito.runtime.redaction import redact

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class KubeModel(BaseModel):
    """Base for API types: Python snake_case attributes, camelCase on the wire.

    Unknown fields are ignored when parsing (the apiserver already rejects them at admission with
    strict field validation, and an older controller must still read objects a newer CRD wrote).
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_dict(self) -> dict[str, Any]:
        """The object as the Kubernetes API expects it (camelCase keys, unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(rule: str, message: str, **extra: str) -> Any:
    """One ``x-kubernetes-validations`` entry."""
    return {"rule": rule, "message": message, **extra}


def with_rules(*rules: Any) -> ConfigDict:
    """The :class:`KubeModel` config plus model-level CEL rules (``x-kubernetes-validations``)."""
    return ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        json_schema_extra={"x-kubernetes-validations": list(rules)},
    )


def required(field: str, message: str) -> Any:
    """A ``has(self.<field>)`` rule that replaces the schema's bare ``required`` entry for ``field``.

    The apiserver's own "Required value" error says nothing about what to put there; this one reports
    ``<path>.<field>: Required value: <message>``. The CRD generator drops ``field`` from ``required``
    when it sees this rule (the pydantic model still requires it).
    """
    return cel(f"has(self.{field})", message, fieldPath=f".{field}", reason="FieldValueRequired")


def immutable(field: str) -> dict[str, Any]:
    """``json_schema_extra`` making a field immutable by a CEL transition rule (holds with no webhook)."""
    return {
        "x-kubernetes-validations": [
            cel("self == oldSelf", f"{field} is immutable; delete and re-create the workspace to change it")
        ]
    }


class OwnerReference(KubeModel):
    """metav1.OwnerReference."""

    api_version: str
    kind: str
    name: str
    uid: str
    controller: bool | None = None
    block_owner_deletion: bool | None = None


class ObjectMeta(KubeModel):
    """The parts of metav1.ObjectMeta the operator reads or writes; everything else is kept verbatim."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: datetime | None = None
    deletion_timestamp: datetime | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    finalizers: list[str] | None = None
    owner_references: list[OwnerReference] | None = None


class LabelSelectorRequirement(KubeModel):
    """metav1.LabelSelectorRequirement."""

    key: str = Field(max_length=317)
    operator: str = Field(description="In, NotIn, Exists or DoesNotExist.", max_length=16)
    values: list[str] | None = Field(
        default=None, max_length=64, json_schema_extra={"items": {"maxLength": 63}}
    )


class LabelSelector(KubeModel):
    """metav1.LabelSelector; the workspace controller needs ``matchLabels`` (see ResourceSpec)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        json_schema_extra={"x-kubernetes-map-type": "atomic"},
    )

    match_labels: dict[str, str] | None = Field(
        default=None,
        description="Labels the GPU nodes carry (and provisioned nodes receive).",
        json_schema_extra={"maxProperties": 64, "additionalProperties": {"maxLength": 63}},
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(default=None, max_length=32)

    def as_map(self) -> dict[str, str]:
        """The selector as a plain label map (single-value ``In`` expressions folded in), as upstream does."""
        labels = dict(self.match_labels or {})
        for expr in self.match_expressions or []:
            if expr.operator == "In" and expr.values and len(expr.values) == 1:
                labels[expr.key] = expr.values[0]
        return labels


def describe_validation_error(err: ValidationError) -> str:
    """``field.path: message; ...`` for a pydantic error, without the input values.

    ``str(err)`` quotes each offending input (``input_value='https://...?sig=...'``), which must not
    reach an admission response, an Event or a log line; the messages are redacted as well, since a
    validator may quote what it rejected.
    """
    parts = []
    for e in err.errors(include_url=False, include_input=False, include_context=False):
        path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in e["loc"]).replace(".[", "[")
        parts.append(f"{path or 'object'}: {redact(e['msg'])}")
    return "; ".join(parts)
