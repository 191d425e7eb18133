"""Generate CustomResourceDefinitions from the pydantic API types.

Pydantic's JSON schema is turned into a Kubernetes *structural* schema: ``$ref``s inlined, ``Optional``
unions collapsed, titles dropped, ``None`` defaults dropped, free-form dicts marked
``x-kubernetes-preserve-unknown-fields``. CEL rules, list types and other ``x-kubernetes-*`` keys come
from ``json_schema_extra`` on the models, so the API types are the single source of truth.
``hack/gen_crds.py`` writes the result to ``config/crd/``; a unit test fails when they drift apart.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kaito.api import machine, workspace

_DROP_KEYS = {"title"}


_VALIDATIONS = "x-kubernetes-validations"


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base`` (``extra`` wins on scalars, dicts merge).

    CEL rules add up: a field's own rules (e.g. immutability) join its model's rules.
    """
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif key == _VALIDATIONS and isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = out[key] + [v for v in copy.deepcopy(value) if v not in out[key]]
        else:
            out[key] = copy.deepcopy(value)
    return out


def _required_by_cel(node: dict[str, Any]) -> None:
    """Drop from ``required`` the fields a ``has(self.x)`` FieldValueRequired rule reports with a message."""
    covered = {
        rule["rule"][len("has(self.") : -1]
        for rule in node.get(_VALIDATIONS, [])
        if rule.get("reason") == "FieldValueRequired"
        and rule["rule"].startswith("has(self.")
        and rule["rule"].endswith(")")
        and "&&" not in rule["rule"]
        and "||" not in rule["rule"]
    }
    if covered and "required" in node:
        node["required"] = [name for name in node["required"] if name not in covered]
        if not node["required"]:
            del node["required"]


def _is_empty_default(value: Any) -> bool:
    return value is None or value in ([], {}, "")


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node (and its children) into a structural schema node."""
    node = dict(schema)
    if "$ref" in node:
        ref = node.pop("$ref")
        target = defs[ref.rsplit("/", 1)[-1]]
        node = _merge(target, node)
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = node.pop("allOf")[0]
        node = _merge(structural(inner, defs), node)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o != {"type": "null"}]
        if len(options) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            node = _merge(structural(options[0], defs), rest)
        else:
            node["anyOf"] = options
            if not node.get("x-kubernetes-int-or-string"):
                raise ValueError(f"union types are not structural: {schema}")
    if "$ref" in node or "allOf" in node:
        # A $ref target may itself be a $ref/allOf (e.g. enum classes); resolve until plain.
        return structural(node, defs)

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "default" and _is_empty_default(value):
            continue
        if key == "description" and isinstance(value, str):
            out[key] = " ".join(value.replace("``", "").split())
        elif key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out[key] = {name: structural(prop, defs) for name, prop in value.items()}
        elif key == "items" and isinstance(value, dict):
            out[key] = structural(value, defs)
        elif key == "additionalProperties":
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out[key] = structural(value, defs)
        elif key == "anyOf":
            out[key] = [{k: v for k, v in o.items() if k not in _DROP_KEYS} for o in value]
        else:
            out[key] = value
    if "properties" in out or out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("type", "object")
    _required_by_cel(out)
    return out


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural openAPIV3Schema of a top-level kind (apiVersion/kind/metadata handled as k8s does)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    root = structural(raw, defs)
    props = root["properties"]
    props["apiVersion"] = {
        "type": "string",
        "description": "APIVersion defines the versioned schema of this representation of an object.",
    }
    props["kind"] = {
        "type": "string",
        "description": "Kind is a string value representing the REST resource.",
    }
    # Declared so that CEL rules can report ``fieldPath: .metadata.name`` (only name and generateName
    # may be constrained in a CRD's metadata schema).
    props["metadata"] = {"type": "object", "properties": {"name": {"type": "string"}}}
    root.pop("required", None)
    required = [name for name in raw.get("required", []) if name not in ("apiVersion", "kind", "metadata")]
    if required:
        root["required"] = required
    _required_by_cel(root)
    return root


def _condition_column(name: str, condition: str, priority: int = 0) -> dict[str, Any]:
    column: dict[str, Any] = {
        "name": name,
        "type": "string",
        "jsonPath": f'.status.conditions[?(@.type=="{condition}")].status',
        "description": f"Status of the {condition} condition.",
    }
    if priority:
        column["priority"] = priority
    return column


def workspace_crd() -> dict[str, Any]:
    """The Workspace CRD: v1alpha1 (storage) and v1beta1 served with one schema."""
    schema = model_schema(workspace.Workspace)
    columns = [
        {
            "name": "Instance",
            "type": "string",
            "jsonPath": ".resource.instanceType",
            "description": "GPU SKU.",
        },
        _condition_column("ResourceReady", "ResourceReady"),
        _condition_column("InferenceReady", "InferenceReady"),
        _condition_column("WorkspaceReady", "WorkspaceReady"),
        _condition_column("JobStarted", "JobStarted", priority=1),
        _condition_column("WorkspaceSucceeded", "WorkspaceSucceeded", priority=1),
        {"name": "State", "type": "string", "jsonPath": ".status.state", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    versions = [
        {
            "name": version,
            "served": True,
            "storage": version == workspace.STORAGE_VERSION,
            "schema": {"openAPIV3Schema": copy.deepcopy(schema)},
            "subresources": {"status": {}},
            "additionalPrinterColumns": copy.deepcopy(columns),
        }
        for version in workspace.SERVED_VERSIONS
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{workspace.PLURAL}.{workspace.GROUP}"},
        "spec": {
            "group": workspace.GROUP,
            "names": {
                "kind": workspace.KIND,
                "listKind": f"{workspace.KIND}List",
                "plural": workspace.PLURAL,
                "singular": "workspace",
                "shortNames": ["wk", "wks"],
                "categories": ["workspace"],
            },
            "scope": "Namespaced",
            "versions": versions,
        },
    }


def machine_crd() -> dict[str, Any]:
    """The Machine CRD (karpenter.sh/v1alpha5, cluster-scoped), for clusters without Karpenter's own."""
    schema = model_schema(machine.Machine)
    columns = [
        {
            "name": "Type",
            "type": "string",
            "jsonPath": ".metadata.labels.node\\.kubernetes\\.io/instance-type",
        },
        {"name": "Node", "type": "string", "jsonPath": ".status.nodeName"},
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {
            "name": "Workspace",
            "type": "string",
            "jsonPath": ".metadata.labels.kaito\\.sh/workspace",
            "priority": 1,
        },
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{machine.PLURAL}.{machine.GROUP}"},
        "spec": {
            "group": machine.GROUP,
            "names": {
                "kind": machine.KIND,
                "listKind": f"{machine.KIND}List",
                "plural": machine.PLURAL,
                "singular": "machine",
                "categories": ["karpenter"],
            },
            "scope": "Cluster",
            "versions": [
                {
                    "name": machine.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


HEADER = "# Generated by hack/gen_crds.py from kaito/api; do not edit by hand.\n"


def render(crd: dict[str, Any]) -> str:
    """The CRD as the YAML text checked into config/crd/."""
    return HEADER + yaml.safe_dump(crd, sort_keys=True, width=110)


def all_crds() -> dict[str, str]:
    """File name -> rendered YAML for every generated CRD."""
    return {
        "kaito.sh_workspaces.yaml": render(workspace_crd()),
        "karpenter.sh_machines.yaml": render(machine_crd()),
    }


def default_crd_dir() -> Path:
    """``config/crd`` of the source checkout this package lives in."""
    return Path(__file__).resolve().parents[2] / "config" / "crd"
