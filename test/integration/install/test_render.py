"""The Helm chart and the plain manifests render, describe the same objects, and meet the pod rules.

No cluster needed: kustomize (built into the version-matched kubectl) and helm render locally.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from test.integration.install.helpers import (
    CHART,
    CONFIG,
    NAMESPACE,
    by_key,
    generated_crds,
    helm_template,
    load_docs,
    pod_specs,
    render_helm,
    render_kustomize,
    run,
    strip_helm_labels,
    tools_dir,
)


def test_helm_lint_is_clean() -> None:
    proc = run([tools_dir() / "helm", "lint", "--strict", CHART])
    assert "0 chart(s) failed" in proc.stdout


def test_chart_renders_exactly_the_objects_of_config_default() -> None:
    plain = by_key(render_kustomize())
    helm = by_key(render_helm())
    assert sorted(helm) == sorted(plain), "the chart and config/default describe different object sets"
    for k, obj in plain.items():
        assert strip_helm_labels(helm[k]) == obj, f"{k} differs between the chart and config/default"


def test_chart_crds_are_the_generated_ones() -> None:
    helm_crds = [o for o in render_helm(include_crds=True) if o["kind"] == "CustomResourceDefinition"]
    generated = generated_crds()
    assert generated, "config/crd holds no CRDs"
    assert by_key(helm_crds) == by_key(generated)


def test_base_is_default_without_the_prometheus_operator_objects() -> None:
    base = by_key(render_kustomize(CONFIG / "base"))
    default = by_key(render_kustomize(CONFIG / "default"))
    extra = {k for k in default if k not in base}
    assert {k[1] for k in extra} == {"ServiceMonitor", "PrometheusRule"}
    assert all(default[k] == base[k] for k in base)


def test_every_namespaced_object_is_in_kaito_system() -> None:
    for obj in render_kustomize():
        if obj["kind"] in {"Namespace", "ClusterRole", "ClusterRoleBinding"} or obj["kind"].endswith(
            "WebhookConfiguration"
        ):
            assert "namespace" not in obj["metadata"], obj["metadata"]["name"]
        elif obj["metadata"]["name"] == "gpu-provisioner-events":
            # Events about cluster-scoped Machines live in "default"; only there may it write them.
            assert obj["metadata"]["namespace"] == "default"
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE, (obj["kind"], obj["metadata"]["name"])


@pytest.mark.parametrize("source", ["config", "helm"])
def test_pods_are_locked_down(source: str) -> None:
    """Non-root, read-only root filesystem, no capabilities, seccomp, limits, probes: every container."""
    objs = render_kustomize() if source == "config" else render_helm()
    specs = pod_specs(objs)
    assert set(specs) == {"kaito-workspace", "gpu-provisioner"}
    for name, spec in specs.items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["serviceAccountName"] == name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert set(c["resources"]["requests"]) == {"cpu", "memory"}, name
            assert set(c["resources"]["limits"]) == {"cpu", "memory"}, name
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", name
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", name
            # The probe port is a named container port, so probes follow a port change.
            assert c["readinessProbe"]["httpGet"]["port"] in {p["name"] for p in c["ports"]}, name


def test_workspace_deployment_is_highly_available() -> None:
    objs = by_key(render_kustomize())
    dep = objs[("apps/v1", "Deployment", NAMESPACE, "kaito-workspace")]
    assert dep["spec"]["replicas"] == 2
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--leader-elect" in args
    assert "--no-webhook" not in args, "every replica must serve the webhook"
    pdb = objs[("policy/v1", "PodDisruptionBudget", NAMESPACE, "kaito-workspace")]
    assert pdb["spec"]["selector"] == dep["spec"]["selector"]
    assert pdb["spec"]["minAvailable"] == 1
    webhook_svc = objs[("v1", "Service", NAMESPACE, "kaito-workspace-webhook")]
    assert webhook_svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_webhooks_point_at_the_webhook_service_and_leave_the_ca_bundle_to_the_controller() -> None:
    for obj in render_kustomize():
        if not obj["kind"].endswith("WebhookConfiguration"):
            continue
        for hook in obj["webhooks"]:
            svc = hook["clientConfig"]["service"]
            assert (svc["namespace"], svc["name"]) == (NAMESPACE, "kaito-workspace-webhook")
            assert "caBundle" not in hook["clientConfig"]
            assert hook["name"] == obj["metadata"]["name"]


def test_servicemonitors_select_the_metrics_services() -> None:
    objs = render_kustomize()
    services = [o for o in objs if o["kind"] == "Service"]
    monitors = [o for o in objs if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2
    for sm in monitors:
        want = sm["spec"]["selector"]["matchLabels"]
        selected = [s for s in services if want.items() <= s["metadata"]["labels"].items()]
        assert len(selected) == 1, sm["metadata"]["name"]
        ports = {p["name"] for p in selected[0]["spec"]["ports"]}
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= ports


def _find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_chart_values_reach_the_objects() -> None:
    objs = render_helm(
        "--set",
        "image.registry=registry.example/kaito",
        "--set",
        "workspace.replicas=3",
        "--set",
        "provisioner.replicas=2",
        "--set",
        "logLevel=debug",
        "--set",
        "azure.subscriptionId=sub-1",
        "--set",
        "azure.resourceGroup=rg-1",
        "--set",
        "azure.clusterName=aks-1",
        "--set",
        "azure.location=westus3",
        "--set",
        "azure.tenantId=tenant-1",
        "--set",
        "azure.clientId=client-1",
    )
    ws = _find(objs, "Deployment", "kaito-workspace")
    gp = _find(objs, "Deployment", "gpu-provisioner")
    assert ws["spec"]["replicas"] == 3
    assert gp["spec"]["replicas"] == 2
    ws_c = ws["spec"]["template"]["spec"]["containers"][0]
    gp_c = gp["spec"]["template"]["spec"]["containers"][0]
    assert ws_c["image"] == "registry.example/kaito/kaito-controller:0.1.0"
    assert gp_c["image"] == "registry.example/kaito/gpu-provisioner:0.1.0"
    assert "--log-level=debug" in ws_c["args"] and "--log-level=debug" in gp_c["args"]
    env = _env(gp_c)
    assert env["ARM_SUBSCRIPTION_ID"] == "sub-1"
    assert env["ARM_RESOURCE_GROUP"] == "rg-1"
    assert env["AZURE_CLUSTER_NAME"] == "aks-1"
    assert env["LOCATION"] == "westus3"
    assert env["AZURE_TENANT_ID"] == "tenant-1"
    sa = _find(objs, "ServiceAccount", "gpu-provisioner")
    assert sa["metadata"]["annotations"] == {"azure.workload.identity/client-id": "client-1"}


def test_chart_runs_local_images_on_a_tainted_node_of_its_choice() -> None:
    """What a local install on a real node needs: images already on the node (pullPolicy Never, a tag
    of its own), a nodeSelector and a toleration per component. The security context stays the
    production one."""
    default = pod_specs(render_helm())
    objs = render_helm(
        "--set", "image.registry=localhost",
        "--set", "image.pullPolicy=Never",
        "--set", "workspace.image.tag=dev",
        "--set", "provisioner.image.tag=dev2",
        "--set", "provisioner.image.registry=registry.local:5000",
        "--set", "provisioner.image.pullPolicy=IfNotPresent",
        "--set", "workspace.nodeSelector.kaito\\.sh/node=real",
        "--set", "provisioner.nodeSelector.kubernetes\\.io/os=plan9",
        "--set", "tolerations[0].key=CriticalAddonsOnly,tolerations[0].operator=Exists",
        "--set", "workspace.tolerations[0].key=kaito.sh/real-node,workspace.tolerations[0].operator=Exists,"
        "workspace.tolerations[0].effect=NoSchedule",
        "--set", "provisioner.tolerations[0].key=kaito.sh/real-node,provisioner.tolerations[0].operator=Equal,"
        "provisioner.tolerations[0].value=yes,provisioner.tolerations[0].effect=NoSchedule",
        "--set", "workspace.affinity=null",
    )  # fmt: skip
    specs = pod_specs(objs)
    ws, gp = specs["kaito-workspace"], specs["gpu-provisioner"]
    assert ws["containers"][0]["image"] == "localhost/kaito-controller:dev"
    assert ws["containers"][0]["imagePullPolicy"] == "Never"
    assert gp["containers"][0]["image"] == "registry.local:5000/gpu-provisioner:dev2"
    assert gp["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    # The component's keys go on top of the global nodeSelector.
    assert ws["nodeSelector"] == {"kubernetes.io/os": "linux", "kaito.sh/node": "real"}
    assert gp["nodeSelector"] == {"kubernetes.io/os": "plan9"}
    # The global tolerations, then the component's.
    critical = {"key": "CriticalAddonsOnly", "operator": "Exists"}
    assert ws["tolerations"] == [
        critical,
        {"key": "kaito.sh/real-node", "operator": "Exists", "effect": "NoSchedule"},
    ]
    assert gp["tolerations"] == [
        critical,
        {"key": "kaito.sh/real-node", "operator": "Equal", "value": "yes", "effect": "NoSchedule"},
    ]
    # Affinity: the component's own (null drops the default); the provisioner keeps its rule.
    assert "affinity" not in ws
    assert gp["affinity"] == default["gpu-provisioner"]["affinity"]
    for name, spec in specs.items():
        assert spec["securityContext"] == default[name]["securityContext"], name
        assert spec["containers"][0]["securityContext"] == default[name]["containers"][0]["securityContext"]


def test_chart_affinity_replaces_the_default() -> None:
    term = {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["system"]}]}
    objs = render_helm(
        "--set-json",
        "provisioner.affinity="
        + json.dumps(
            {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
                }
            }
        ),
    )
    gp = pod_specs(objs)["gpu-provisioner"]
    assert gp["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == {
        "nodeSelectorTerms": [term]
    }


def test_chart_switches() -> None:
    objs = render_helm("--set", "provisioner.enabled=false", "--set", "metrics.serviceMonitor.enabled=false")
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert not any(n in {"gpu-provisioner", "gpu-provisioner-metrics"} for _, n in names)
    assert not any(k == "ServiceMonitor" for k, _ in names)
    assert ("Deployment", "kaito-workspace") in names
    # One replica: no PodDisruptionBudget (minAvailable 1 would block every drain of its node).
    single = render_helm("--set", "workspace.replicas=1")
    assert not any(o["kind"] == "PodDisruptionBudget" for o in single)
    # Without namespace.create the chart leaves the Namespace to `helm install --create-namespace`.
    assert not any(o["kind"] == "Namespace" for o in load_docs(helm_template()))


def test_chart_follows_the_release_namespace() -> None:
    objs = load_docs(
        run(
            [tools_dir() / "helm", "template", "kaito", CHART, "--namespace", "ops"],
        ).stdout
    )
    for obj in objs:
        if "namespace" in obj["metadata"] and obj["metadata"]["name"] != "gpu-provisioner-events":
            assert obj["metadata"]["namespace"] == "ops", obj["metadata"]["name"]
    binding = _find(objs, "ClusterRoleBinding", "kaito-workspace")
    assert binding["subjects"][0]["namespace"] == "ops"
    vwc = _find(objs, "ValidatingWebhookConfiguration", "validation.workspace.kaito.sh")
    hook = vwc["webhooks"][0]
    assert hook["clientConfig"]["service"]["namespace"] == "ops"
    assert "system:serviceaccount:ops:kaito-workspace" in hook["matchConditions"][0]["expression"]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("provisioner.cloud=gcp", "/provisioner/cloud"),
        ("workspace.replica=3", "replica"),
        ("provisioner.replicas=3", "/provisioner/replicas"),
        ("logLevel=verbose", "/logLevel"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("workspace.image.pullPolicy=never", "/workspace/image/pullPolicy"),
        ("workspace.tolerations[0].effect=NoScheduling", "/workspace/tolerations/0/effect"),
        ("provisioner.affinity.nodeAfinity.x=y", "nodeAfinity"),
        ("metrics.prometheusRule.enabled=maybe", "/metrics/prometheusRule/enabled"),
    ],
)
def test_chart_rejects_bad_values(setting: str, message: str) -> None:
    """values.schema.json turns a typo or an unsupported setting into an error, not a silent default."""
    proc = run(
        [tools_dir() / "helm", "template", "kaito", CHART, "--namespace", NAMESPACE, "--set", setting],
        check=False,
    )
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
