"""The rendered manifests pass the real apiserver (server dry-run, strict field validation, Pod Security)
and kubeconform against schemas generated from that apiserver's own OpenAPI document.

kubeconform never downloads anything here: its only schema location is a directory this test writes
from ``/openapi/v2`` of the local kube-apiserver (which, once the CRDs are applied, also publishes the
Workspace, Machine, ServiceMonitor and PrometheusRule schemas).
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from hack.localcluster import LocalCluster
from test.integration.install.helpers import (
    generated_crds,
    kinds,
    kubeconform,
    render_helm,
    render_kustomize,
    to_yaml,
    write_schemas,
)
from test.waiting import eventually

SOURCES = ("config/default", "config/base", "helm", "helm-all-options")

# Every optional branch of the chart switched on, so its templates are validated too.
ALL_OPTIONS = (
    "image.pullSecrets={regcred}",
    "azure.subscriptionId=00000000-0000-0000-0000-000000000000",
    "azure.resourceGroup=rg",
    "azure.clusterName=aks",
    "azure.location=westus3",
    "azure.clientId=11111111-1111-1111-1111-111111111111",
    "azure.tenantId=22222222-2222-2222-2222-222222222222",
    "metrics.serviceMonitor.labels.release=prometheus",
    "workspace.extraArgs={--workers=10}",
    "provisioner.extraArgs={--gc-interval=300}",
    "provisioner.replicas=2",
    "provisioner.cloud=kwok",
    "workspace.replicas=3",
    "logLevel=debug",
    "logFormat=console",
)


def render(source: str) -> list[dict[str, Any]]:
    if source == "helm":
        return render_helm()
    if source == "helm-all-options":
        return render_helm(*(a for opt in ALL_OPTIONS for a in ("--set", opt)))
    return render_kustomize(Path(__file__).resolve().parents[3] / source)


def dry_run(cluster: LocalCluster, manifests: str) -> tuple[int, str, str]:
    """Server-side apply as a dry run with strict field validation; (rc, stdout, stderr)."""
    proc = cluster.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--validate=strict",
        "--field-manager=kaito-install-test",
        "-f",
        "-",
        input=manifests,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("source", SOURCES)
def test_server_dry_run_accepts_every_object(crds_and_namespace: LocalCluster, source: str) -> None:
    objs = render(source)
    rc, out, err = dry_run(crds_and_namespace, to_yaml(objs))
    assert rc == 0, err
    # One line per object ("... serverside-applied (server dry run)"): nothing skipped.
    assert out.count("(server dry run)") == len(objs), out
    # The namespace enforces (and warns about) the "restricted" Pod Security profile: the apiserver
    # checks the Deployments' pod templates and would print a warning for any violation.
    assert "PodSecurity" not in err, err


def test_pod_security_warning_is_detected(crds_and_namespace: LocalCluster) -> None:
    """Control for the check above: a pod template that runs as root draws the apiserver's warning."""
    dep = next(o for o in render_kustomize() if o["kind"] == "Deployment")
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = False
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"].pop("runAsNonRoot")
    rc, _, err = dry_run(crds_and_namespace, to_yaml([bad]))
    assert rc == 0
    assert "would violate PodSecurity" in err and "runAsNonRoot" in err, err


def test_strict_field_validation_rejects_a_typo(crds_and_namespace: LocalCluster) -> None:
    """Control: a misspelt field fails the dry run (the manifests above are checked field by field)."""
    sm = next(o for o in render_kustomize() if o["kind"] == "ServiceMonitor")
    bad = copy.deepcopy(sm)
    bad["spec"]["endpoints"][0]["intervall"] = "30s"
    rc, _, err = dry_run(crds_and_namespace, to_yaml([bad]))
    assert rc != 0
    assert "intervall" in err, err


@pytest.fixture(scope="module")
def schema_dir(crds_and_namespace: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Strict JSON schemas for every kind the install uses, from the apiserver's /openapi/v2."""
    wanted = set()
    for source in SOURCES:
        wanted |= kinds(render(source))
    wanted |= kinds(generated_crds())

    async def published() -> dict[str, Any] | None:
        status, body = await asyncio.to_thread(crds_and_namespace.request, "GET", "/openapi/v2", None, 60)
        assert status == 200, body
        doc = body if isinstance(body, dict) else json.loads(body)
        present = {
            (f"{g['group']}/{g['version']}" if g["group"] else g["version"], g["kind"])
            for d in doc["definitions"].values()
            for g in d.get("x-kubernetes-group-version-kind") or ()
        }
        missing = wanted - present
        assert not missing, f"not yet published: {sorted(missing)}"
        return doc

    # CRD schemas reach /openapi/v2 a moment after the CRDs are Established.
    doc = asyncio.run(eventually(published, timeout=60, what="CRD schemas in /openapi/v2", interval=0.5))
    assert doc is not None
    out = tmp_path_factory.mktemp("schemas")
    write_schemas(doc, out, wanted)
    return out


def _summary(stdout: str) -> dict[str, Any]:
    report = json.loads(stdout)
    summary: dict[str, Any] = report["summary"]
    return summary


@pytest.mark.parametrize("source", SOURCES)
def test_kubeconform_validates_against_the_apiserver_schemas(schema_dir: Path, source: str) -> None:
    objs = render(source)
    proc = kubeconform(schema_dir, to_yaml(objs))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = _summary(proc.stdout)
    assert summary["valid"] == len(objs), summary
    assert summary["skipped"] == 0 and summary["errors"] == 0 and summary["invalid"] == 0, summary


def test_kubeconform_validates_the_crds(schema_dir: Path) -> None:
    docs = generated_crds()
    proc = kubeconform(schema_dir, to_yaml(docs))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _summary(proc.stdout)["valid"] == len(docs)


@pytest.mark.parametrize(
    ("kind", "mutate", "field"),
    [
        ("Deployment", lambda o: o["spec"].update(replica=2), "replica"),
        (
            "Deployment",
            lambda o: o["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(
                readOnlyRootFileSystem=True
            ),
            "readOnlyRootFileSystem",
        ),
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(prot="x"), "prot"),
        ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].update(expression="x"), "expression"),
        ("ClusterRole", lambda o: o["rules"][0].update(verb=["get"]), "verb"),
    ],
)
def test_kubeconform_rejects_unknown_fields(schema_dir: Path, kind: str, mutate: Any, field: str) -> None:
    """Control: the generated schemas are strict, so a misspelt field is an error, not a pass."""
    obj = copy.deepcopy(next(o for o in render_kustomize() if o["kind"] == kind))
    mutate(obj)
    proc = kubeconform(schema_dir, to_yaml([obj]))
    assert proc.returncode != 0
    assert _summary(proc.stdout)["invalid"] == 1
    assert field in proc.stdout, proc.stdout
