"""Rendering the install manifests (kustomize, Helm) and validating them offline.

Shared by the install integration tests and the install e2e test. Tools come from
``hack/build-tools.sh`` (helm, kubeconform, the ServiceMonitor and PrometheusRule CRDs) and ``hack/build-binaries.sh``
(the version-matched kubectl, whose built-in kustomize renders ``config/``).
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from hack.localcluster import build_binaries

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "config"
CHART = CONFIG / "helm" / "kaito"
CRD_DIR = CONFIG / "crd"
NAMESPACE = "kaito-system"

# Labels only Helm adds (bookkeeping); everything else must be identical between the two installs.
HELM_ONLY_LABELS = ("app.kubernetes.io/managed-by", "helm.sh/chart")

Obj = dict[str, Any]


@cache
def tools_dir() -> Path:
    """Directory with helm, kubeconform and crds/ (built once, cached by version)."""
    out = subprocess.run(
        ["bash", str(REPO / "hack" / "build-tools.sh")], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


@cache
def kubectl_path() -> Path:
    """The kubectl built with the local control plane."""
    return build_binaries() / "kubectl"


def crd_files() -> list[Path]:
    """The generated CRD files in config/crd (any other file there, e.g. a kustomization, is skipped)."""
    return [
        f
        for f in sorted(CRD_DIR.glob("*.yaml"))
        if any(d.get("kind") == "CustomResourceDefinition" for d in load_docs(f.read_text()))
    ]


def generated_crds() -> list[Obj]:
    """The CRD objects of config/crd."""
    return [
        d
        for f in crd_files()
        for d in load_docs(f.read_text())
        if d.get("kind") == "CustomResourceDefinition"
    ]


def prometheus_operator_crds() -> list[Path]:
    """The Prometheus Operator's ServiceMonitor and PrometheusRule CRDs (from its Go module, fetched by
    build-tools.sh): the chart's default install renders both kinds."""
    return [
        tools_dir() / "crds" / f"monitoring.coreos.com_{plural}.yaml"
        for plural in ("servicemonitors", "prometheusrules")
    ]


def run(
    cmd: Sequence[str | Path], *, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a tool; on failure raise with its stderr (assertions then show what went wrong)."""
    proc = subprocess.run(
        [str(c) for c in cmd], input=input, capture_output=True, text=True, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(str(c) for c in cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def load_docs(text: str) -> list[Obj]:
    """Every non-empty YAML document of a stream."""
    return [d for d in yaml.safe_load_all(text) if d]


def render_kustomize(directory: Path = CONFIG / "default") -> list[Obj]:
    """``kubectl kustomize`` of a directory under config/."""
    return load_docs(run([kubectl_path(), "kustomize", directory]).stdout)


def helm_template(*args: str, include_crds: bool = False) -> str:
    """``helm template`` of the chart as release ``kaito`` in kaito-system (extra ``args`` appended)."""
    cmd: list[str | Path] = [tools_dir() / "helm", "template", "kaito", CHART, "--namespace", NAMESPACE]
    if include_crds:
        cmd.append("--include-crds")
    return run([*cmd, *args]).stdout


def render_helm(*args: str, include_crds: bool = False) -> list[Obj]:
    """The chart's objects with the Namespace rendered too (as config/default has it)."""
    return load_docs(helm_template("--set", "namespace.create=true", *args, include_crds=include_crds))


def key(obj: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """(apiVersion, kind, namespace, name): what identifies an object for apply."""
    meta = obj.get("metadata") or {}
    return (str(obj["apiVersion"]), str(obj["kind"]), str(meta.get("namespace", "")), str(meta["name"]))


def by_key(objs: Iterable[Obj]) -> dict[tuple[str, str, str, str], Obj]:
    """Index objects by :func:`key`; a duplicate is an error (apply would silently merge them)."""
    out: dict[tuple[str, str, str, str], Obj] = {}
    for o in objs:
        k = key(o)
        assert k not in out, f"duplicate object {k}"
        out[k] = o
    return out


def strip_helm_labels(obj: Obj) -> Obj:
    """A copy without Helm's bookkeeping labels (object metadata only; pod templates never carry them)."""
    out = copy.deepcopy(obj)
    labels = (out.get("metadata") or {}).get("labels")
    if labels:
        for name in HELM_ONLY_LABELS:
            labels.pop(name, None)
    return out


def pod_specs(objs: Iterable[Obj]) -> dict[str, Obj]:
    """Deployment name -> pod template spec."""
    return {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objs if o["kind"] == "Deployment"}


def kinds(objs: Iterable[Obj]) -> set[tuple[str, str]]:
    """(apiVersion, kind) pairs present."""
    return {(str(o["apiVersion"]), str(o["kind"])) for o in objs}


def to_yaml(objs: Iterable[Obj]) -> str:
    """A multi-document YAML stream."""
    return yaml.safe_dump_all(list(objs), sort_keys=False)


# ------------------------------------------------------------------------------ offline JSON schemas

_INT_OR_STRING: Obj = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
_QUANTITY: Obj = {"oneOf": [{"type": "string"}, {"type": "number"}]}
_SPECIAL = {
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": _INT_OR_STRING,
    "io.k8s.apimachinery.pkg.api.resource.Quantity": _QUANTITY,
}


def _strict(schema: Any) -> Any:
    """Rewrite an OpenAPI v2 schema into a strict JSON schema (draft 4), as kubeconform's -strict wants.

    Objects with declared properties reject unknown ones (unless the API keeps unknown fields);
    int-or-string fields accept both; OpenAPI-only keywords (``x-kubernetes-*``) are dropped. Walks the
    schema structure (properties, items, ...) so a field that happens to be called ``properties`` (as
    in a CRD's own schema) is not mistaken for a keyword.
    """
    if not isinstance(schema, dict):
        return schema
    if schema.get("x-kubernetes-int-or-string") or schema.get("format") == "int-or-string":
        return dict(_INT_OR_STRING)
    out: Obj = {}
    for k, v in schema.items():
        if k.startswith("x-"):
            continue
        if k in ("properties", "patternProperties", "definitions") and isinstance(v, dict):
            out[k] = {name: _strict(sub) for name, sub in v.items()}
        elif k in ("items", "additionalProperties", "not") and isinstance(v, dict):
            out[k] = _strict(v)
        elif k in ("allOf", "anyOf", "oneOf") and isinstance(v, list):
            out[k] = [_strict(sub) for sub in v]
        else:
            out[k] = v
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _refs(schema: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/definitions/"):
            found.add(ref.removeprefix("#/definitions/"))
        for v in schema.values():
            found |= _refs(v)
    elif isinstance(schema, list):
        for v in schema:
            found |= _refs(v)
    return found


def kubeconform_file_name(api_version: str, kind: str) -> str:
    """The file kubeconform's ``{{ .ResourceKind }}{{ .KindSuffix }}.json`` template looks for."""
    group, _, version = api_version.rpartition("/")
    suffix = f"-{group.split('.')[0].lower()}-{version.lower()}" if group else f"-{version.lower()}"
    return f"{kind.lower()}{suffix}.json"


def write_schemas(
    openapi_v2: Mapping[str, Any], out_dir: Path, wanted: Iterable[tuple[str, str]]
) -> list[Path]:
    """Write one standalone strict schema per wanted (apiVersion, kind) from the apiserver's /openapi/v2.

    Each file carries the definitions it references (transitively) so ``$ref`` resolves locally.
    Raises AssertionError when the apiserver does not publish a wanted kind.
    """
    definitions: dict[str, Any] = dict(openapi_v2["definitions"])
    index: dict[tuple[str, str], str] = {}
    for name, schema in definitions.items():
        for gvk in schema.get("x-kubernetes-group-version-kind") or ():
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            index.setdefault((api_version, gvk["kind"]), name)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for api_version, kind in sorted(set(wanted)):
        root = index.get((api_version, kind))
        assert root is not None, f"the apiserver publishes no schema for {api_version} {kind}"
        needed: set[str] = set()
        todo = [root]
        while todo:
            name = todo.pop()
            if name in needed:
                continue
            needed.add(name)
            todo.extend(_refs(definitions[name]) - needed)
        defs = {
            name: (_SPECIAL[name] if name in _SPECIAL else _strict(definitions[name]))
            for name in sorted(needed)
        }
        doc = {
            "$schema": "http://json-schema.org/draft-04/schema#",
            "$ref": f"#/definitions/{root}",
            "definitions": defs,
        }
        path = out_dir / kubeconform_file_name(api_version, kind)
        path.write_text(json.dumps(doc))
        written.append(path)
    return written


def kubeconform(schema_dir: Path, manifests: str) -> subprocess.CompletedProcess[str]:
    """Validate a YAML stream with kubeconform against only the local schemas (no remote lookups)."""
    return run(
        [
            tools_dir() / "kubeconform",
            "-strict",
            "-summary",
            "-output",
            "json",
            "-schema-location",
            str(schema_dir / "{{ .ResourceKind }}{{ .KindSuffix }}.json"),
            "-",
        ],
        input=manifests,
        check=False,
    )
