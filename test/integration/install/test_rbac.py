"""Least privilege, checked by the real apiserver's RBAC authorizer (SubjectAccessReview).

The roles in config/rbac are applied for real; each ServiceAccount is then asked about what its code
does (allowed) and about what it must never be able to do (denied): wildcards, Secrets outside its own
certificate, other Leases, other webhook configurations, workloads it only reads, escalation paths.
``hack/run-as-sa.py`` is exercised too: a token from the TokenRequest API authenticates as the
ServiceAccount and carries exactly these permissions.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from hack.localcluster import LocalCluster
from test.integration.install.helpers import CONFIG, NAMESPACE, REPO, kubectl_path
from test.waiting import eventually

WS = "kaito-workspace"
GP = "gpu-provisioner"
RUN_AS_SA = REPO / "hack" / "run-as-sa.py"

# (verb, group, resource, subresource, namespace, name)
Attr = tuple[str, str, str, str, str, str]


def attr(verb: str, resource: str, group: str = "", *, sub: str = "", ns: str = "", name: str = "") -> Attr:
    return (verb, group, resource, sub, ns, name)


@pytest.fixture(scope="module")
def rbac(control_plane: LocalCluster) -> LocalCluster:
    """config/ Namespace + RBAC applied through hack/run-as-sa.py apply-rbac."""
    proc = subprocess.run(
        [sys.executable, str(RUN_AS_SA), "--kubeconfig", str(control_plane.kubeconfig), "apply-rbac"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**control_plane.env(), "KUBECTL": str(kubectl_path())},
    )
    assert proc.returncode == 0, proc.stderr
    # The authorizer sees new bindings through its informers, a moment after the write.
    for sa in (WS, GP):
        settled(control_plane, sa, NEEDED[sa][0], True)
    return control_plane


def settled(cluster: LocalCluster, sa: str, a: Attr, want: bool) -> None:
    """Wait until the authorizer answers ``want`` for ``a`` (RBAC changes propagate asynchronously)."""

    async def check() -> bool:
        return await asyncio.to_thread(allowed, cluster, sa, a) == want

    asyncio.run(eventually(check, timeout=30, what=f"{sa} {a} allowed={want}"))


def allowed(cluster: LocalCluster, service_account: str, a: Attr) -> bool:
    verb, group, resource, sub, ns, name = a
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{NAMESPACE}:{service_account}",
            "groups": [
                "system:serviceaccounts",
                f"system:serviceaccounts:{NAMESPACE}",
                "system:authenticated",
            ],
            "resourceAttributes": {
                k: v
                for k, v in {
                    "verb": verb,
                    "group": group,
                    "resource": resource,
                    "subresource": sub,
                    "namespace": ns,
                    "name": name,
                }.items()
                if v
            },
        },
    }
    status, body = cluster.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
    assert status == 201, body
    return bool(body["status"].get("allowed"))


# What the code does (kaito/workspace, kaito/machine, kaito/webhook, kaito/runtime, provisioner/).
NEEDED: dict[str, list[Attr]] = {
    WS: [
        attr("list", "workspaces", "kaito.sh"),
        attr("watch", "workspaces", "kaito.sh"),
        attr("patch", "workspaces", "kaito.sh", ns="default", name="w"),
        attr("patch", "workspaces", "kaito.sh", sub="status", ns="default", name="w"),
        attr("create", "machines", "karpenter.sh"),
        attr("delete", "machines", "karpenter.sh", name="ws-abc"),
        attr("get", "machines", "karpenter.sh", name="ws-abc"),
        attr("watch", "machines", "karpenter.sh"),
        attr("create", "nodeclaims", "karpenter.sh"),
        attr("delete", "nodeclaims", "karpenter.sh", name="ws-abc"),
        attr("get", "nodeclaims", "karpenter.sh", name="ws-abc"),
        attr("watch", "nodeclaims", "karpenter.sh"),
        attr("create", "deployments", "apps", ns="default"),
        attr("update", "statefulsets", "apps", ns="default", name="w"),
        attr("patch", "services", ns="default", name="w"),
        attr("patch", "configmaps", ns="default", name="w"),
        attr("update", "workspaces", "kaito.sh", sub="finalizers", ns="default", name="w"),
        attr("create", "services", ns="default"),
        attr("create", "configmaps", ns="default"),
        attr("get", "configmaps", ns="team-a", name="inference-params"),
        attr("watch", "pods"),
        attr("watch", "nodes"),
        attr("watch", "jobs", "batch"),
        attr("create", "jobs", "batch", ns="default"),
        attr("create", "events", ns="default"),
        attr("create", "leases", "coordination.k8s.io", ns=NAMESPACE),
        attr("update", "leases", "coordination.k8s.io", ns=NAMESPACE, name="kaito-workspace"),
        attr("create", "secrets", ns=NAMESPACE),
        attr("get", "secrets", ns=NAMESPACE, name="workspace-webhook-cert"),
        attr("update", "secrets", ns=NAMESPACE, name="workspace-webhook-cert"),
        attr(
            "patch",
            "validatingwebhookconfigurations",
            "admissionregistration.k8s.io",
            name="validation.workspace.kaito.sh",
        ),
        attr(
            "get",
            "mutatingwebhookconfigurations",
            "admissionregistration.k8s.io",
            name="mutation.workspace.kaito.sh",
        ),
    ],
    GP: [
        attr("watch", "machines", "karpenter.sh"),
        attr("get", "machines", "karpenter.sh", name="ws-abc"),
        attr("patch", "machines", "karpenter.sh", name="ws-abc"),
        attr("patch", "machines", "karpenter.sh", sub="status", name="ws-abc"),
        attr("watch", "nodeclaims", "karpenter.sh"),
        attr("get", "nodeclaims", "karpenter.sh", name="ws-abc"),
        attr("patch", "nodeclaims", "karpenter.sh", name="ws-abc"),
        attr("patch", "nodeclaims", "karpenter.sh", sub="status", name="ws-abc"),
        attr("watch", "nodes"),
        attr("create", "nodes"),
        attr("patch", "nodes", name="aks-ws-abc-0"),
        attr("delete", "nodes", name="aks-ws-abc-0"),
        attr("create", "leases", "coordination.k8s.io", ns=NAMESPACE),
        attr("update", "leases", "coordination.k8s.io", ns=NAMESPACE, name="gpu-provisioner-leader-election"),
        attr("create", "events", ns="default"),
        attr("list", "pods"),
        attr("create", "pods", sub="eviction", ns="team-a", name="p"),
    ],
}

# What neither may do. Each line is a privilege that would widen the blast radius of a compromised pod.
FORBIDDEN_BOTH: list[Attr] = [
    attr("*", "workspaces", "kaito.sh"),
    attr("*", "machines", "karpenter.sh"),
    attr("*", "nodeclaims", "karpenter.sh"),
    attr("get", "nodepools", "karpenter.sh"),
    attr("update", "nodeclaims", "karpenter.sh", name="n"),
    attr("get", "*", "kaito.sh"),
    attr("get", "nodes", "*"),
    attr("list", "secrets"),
    attr("list", "secrets", ns=NAMESPACE),
    attr("watch", "secrets", ns=NAMESPACE),
    attr("get", "secrets", ns="kube-system", name="workspace-webhook-cert"),
    attr("get", "secrets", ns="default", name="anything"),
    attr("get", "secrets", ns=NAMESPACE, name="some-other-secret"),
    attr("update", "leases", "coordination.k8s.io", ns=NAMESPACE, name="kube-controller-manager"),
    attr("update", "leases", "coordination.k8s.io", ns="kube-system", name="kaito-workspace"),
    attr("create", "leases", "coordination.k8s.io", ns="default"),
    attr("delete", "leases", "coordination.k8s.io", ns=NAMESPACE, name="kaito-workspace"),
    attr("create", "pods", ns="default"),
    attr("create", "pods", sub="exec", ns="default", name="p"),
    attr("create", "serviceaccounts", sub="token", ns=NAMESPACE, name=WS),
    attr("impersonate", "serviceaccounts", ns=NAMESPACE),
    attr("escalate", "clusterroles", "rbac.authorization.k8s.io"),
    attr("bind", "clusterroles", "rbac.authorization.k8s.io"),
    attr("create", "clusterrolebindings", "rbac.authorization.k8s.io"),
    attr("patch", "validatingwebhookconfigurations", "admissionregistration.k8s.io", name="other"),
    attr("create", "validatingwebhookconfigurations", "admissionregistration.k8s.io"),
    attr(
        "delete",
        "validatingwebhookconfigurations",
        "admissionregistration.k8s.io",
        name="validation.workspace.kaito.sh",
    ),
    attr("create", "customresourcedefinitions", "apiextensions.k8s.io"),
    attr("update", "namespaces", name="default"),
    attr("delete", "persistentvolumes"),
]

FORBIDDEN: dict[str, list[Attr]] = {
    WS: [
        *FORBIDDEN_BOTH,
        # Nodes and pods are read-only for the workspace controller; Machines' status is the provisioner's.
        attr("patch", "nodes", name="n"),
        attr("delete", "nodes", name="n"),
        attr("delete", "pods", ns="default", name="p"),
        attr("patch", "machines", "karpenter.sh", sub="status", name="m"),
        attr("create", "pods", sub="eviction", ns="default", name="p"),
        attr("create", "workspaces", "kaito.sh", ns="default"),
        attr("update", "workspaces", "kaito.sh", ns="default", name="w"),
        attr("delete", "workspaces", "kaito.sh", ns="default", name="w"),
        attr("update", "workspaces", "kaito.sh", sub="status", ns="default", name="w"),
        attr("patch", "machines", "karpenter.sh", name="m"),
        attr("patch", "nodeclaims", "karpenter.sh", name="n"),
        attr("patch", "nodeclaims", "karpenter.sh", sub="status", name="n"),
        attr("delete", "deployments", "apps", ns="default", name="d"),
        attr("delete", "services", ns="default", name="s"),
        attr("delete", "configmaps", ns="default", name="c"),
        attr("delete", "jobs", "batch", ns="default", name="j"),
        attr("update", "jobs", "batch", ns="default", name="j"),
        attr("patch", "events", ns="default", name="e"),
        attr("delete", "events", ns="default", name="e"),
    ],
    GP: [
        *FORBIDDEN_BOTH,
        attr("get", "workspaces", "kaito.sh", ns="default", name="w"),
        attr("create", "machines", "karpenter.sh"),
        attr("delete", "machines", "karpenter.sh", name="m"),
        attr("create", "nodeclaims", "karpenter.sh"),
        attr("delete", "nodeclaims", "karpenter.sh", name="n"),
        attr("create", "deployments", "apps", ns="default"),
        attr("create", "jobs", "batch", ns="default"),
        attr("get", "configmaps", ns="default", name="c"),
        attr("create", "secrets", ns=NAMESPACE),
        attr("update", "leases", "coordination.k8s.io", ns=NAMESPACE, name="kaito-workspace"),
        attr("delete", "pods", ns="default", name="p"),
        attr("get", "pods", ns="default", name="p"),
        attr("patch", "pods", ns="default", name="p"),
        attr("create", "events", ns="kube-system"),
        attr("create", "events", ns=NAMESPACE),
        attr("patch", "events", ns="default", name="e"),
    ],
}


def _ids(items: list[Attr]) -> list[str]:
    return ["-".join(p for p in a if p) for a in items]


@pytest.mark.parametrize("sa", [WS, GP])
def test_service_accounts_may_do_what_their_code_does(rbac: LocalCluster, sa: str) -> None:
    denied = [a for a in NEEDED[sa] if not allowed(rbac, sa, a)]
    assert not denied, f"{sa} lacks: {_ids(denied)}"


@pytest.mark.parametrize("sa", [WS, GP])
def test_service_accounts_may_do_nothing_more(rbac: LocalCluster, sa: str) -> None:
    granted = [a for a in FORBIDDEN[sa] if allowed(rbac, sa, a)]
    assert not granted, f"{sa} may: {_ids(granted)}"


def test_the_check_itself_sees_a_grant(rbac: LocalCluster) -> None:
    """Control: widen a role for a moment and the review reports it (the denials above are real)."""
    # A Role of its own: the built-in aggregated roles (view, edit) stay empty without the
    # controller-manager's aggregation controller, which this profile does not run.
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "install-test-widen", "namespace": "default"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "install-test-widen", "namespace": "default"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "install-test-widen"},
        "subjects": [{"kind": "ServiceAccount", "name": GP, "namespace": NAMESPACE}],
    }
    probe = attr("get", "configmaps", ns="default", name="c")
    assert not allowed(rbac, GP, probe)
    rbac.apply(role)
    rbac.apply(binding)
    try:
        settled(rbac, GP, probe, True)
    finally:
        rbac.kubectl(
            "delete", "rolebinding,role", "install-test-widen", "-n", "default", "--ignore-not-found"
        )
    settled(rbac, GP, probe, False)


def _rules(path: Path) -> list[dict[str, Any]]:
    return [r for d in yaml.safe_load_all(path.read_text()) if d and "rules" in d for r in d["rules"]]


@pytest.mark.parametrize("path", sorted((CONFIG / "rbac").glob("*_role.yaml")), ids=lambda p: p.name)
def test_no_wildcards_and_secrets_only_by_name(path: Path) -> None:
    for rule in _rules(path):
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(field, []), f"{path.name}: wildcard in {field}: {rule}"
        if "secrets" in rule["resources"]:
            assert set(rule["verbs"]) <= {"create", "get", "update"}
            assert rule.get("resourceNames") or rule["verbs"] == ["create"], rule


def _run_as(cluster: LocalCluster, sa: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(RUN_AS_SA),
            "--kubeconfig",
            str(cluster.kubeconfig),
            "run",
            "--sa",
            sa,
            "--",
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**cluster.env(), "KUBECTL": str(kubectl_path())},
    )


@pytest.mark.parametrize("sa", [WS, GP])
def test_run_as_sa_authenticates_as_the_service_account(rbac: LocalCluster, sa: str) -> None:
    kubectl = str(kubectl_path())
    who = _run_as(rbac, sa, kubectl, "auth", "whoami", "-o", "json")
    assert who.returncode == 0, who.stderr
    assert (
        json.loads(who.stdout)["status"]["userInfo"]["username"] == f"system:serviceaccount:{NAMESPACE}:{sa}"
    )
    # The child's kubeconfig carries the token and nothing else: no admin credentials leak through.
    can = _run_as(rbac, sa, kubectl, "auth", "can-i", "list", "secrets", "--all-namespaces")
    assert can.stdout.strip() == "no", can.stdout + can.stderr
    can = _run_as(rbac, sa, kubectl, "auth", "can-i", "watch", "nodes")
    assert can.stdout.strip() == "yes", can.stdout + can.stderr


def test_run_as_sa_never_prints_the_token(rbac: LocalCluster, tmp_path: Path) -> None:
    out = tmp_path / "ws.kubeconfig"
    proc = subprocess.run(
        [
            sys.executable,
            str(RUN_AS_SA),
            "--kubeconfig",
            str(rbac.kubeconfig),
            "kubeconfig",
            "--sa",
            WS,
            "--out",
            str(out),
            "--no-apply",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**rbac.env(), "KUBECTL": str(kubectl_path())},
    )
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o077 == 0, "the kubeconfig must be private"
    token = json.loads(out.read_text())["users"][0]["user"]["token"]
    assert len(token) > 100
    assert token not in proc.stdout and token not in proc.stderr
    # A token with a lifetime: the TokenRequest API, not a legacy Secret-based token.
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
    status, body = rbac.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", review)
    assert status == 201 and body["status"]["authenticated"], body
    assert body["status"]["user"]["username"] == f"system:serviceaccount:{NAMESPACE}:{WS}"
    assert "authentication.kubernetes.io/credential-id" in body["status"]["user"].get("extra", {}), body


def test_run_as_sa_passes_sigterm_on_and_removes_the_kubeconfig(rbac: LocalCluster, tmp_path: Path) -> None:
    """The wrapper forwards SIGTERM (the controllers' graceful stop), returns the child's status and
    deletes the private kubeconfig holding the token."""
    marker = tmp_path / "child-ready"
    # On SIGTERM the child stops its sleeper and exits 7 (single quotes: $! is read when the trap fires).
    child = (
        "trap 'kill $!; exit 7' TERM; "
        f'echo "$KUBECONFIG" > {marker}.tmp; mv {marker}.tmp {marker}; sleep 60 & wait'
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            str(RUN_AS_SA),
            "--kubeconfig",
            str(rbac.kubeconfig),
            "run",
            "--sa",
            GP,
            "--no-apply",
            "--",
            "sh",
            "-c",
            child,
        ],
        env={**rbac.env(), "KUBECTL": str(kubectl_path())},
    )
    try:

        async def ready() -> bool:
            assert proc.poll() is None, f"run-as-sa exited early ({proc.returncode})"
            return marker.exists()

        asyncio.run(eventually(ready, timeout=60, what="the child to start"))
        kubeconfig = Path(marker.read_text().strip())
        assert kubeconfig.exists() and kubeconfig.stat().st_mode & 0o077 == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 7
        assert not kubeconfig.exists() and not kubeconfig.parent.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
