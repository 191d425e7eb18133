#!/usr/bin/env python3
"""Run a controller locally with exactly its ServiceAccount's permissions.

Applies the RBAC in ``config/`` (Namespace, ServiceAccounts, Roles, Bindings) with an admin kubeconfig,
asks the TokenRequest API for a short-lived token of the ServiceAccount (``kubectl create token``),
writes a private kubeconfig holding that token, and runs the command with ``KUBECONFIG`` pointing at it.
So a permission missing from ``config/rbac`` fails locally exactly as it would in the cluster::

    python hack/run-as-sa.py run --sa gpu-provisioner -- python -m provisioner --cloud kwok
    python hack/run-as-sa.py run --sa kaito-workspace -- python -m kaito --webhook-ip 127.0.0.1
    python hack/run-as-sa.py kubeconfig --sa kaito-workspace --out /tmp/ws.kubeconfig
    python hack/run-as-sa.py apply-rbac

The admin kubeconfig is ``--kubeconfig`` or ``$KUBECONFIG`` (e.g. from ``hack/localcluster.py``). The
command also gets ``POD_NAMESPACE``/``SYSTEM_NAMESPACE`` (where the Lease and the webhook Secret live),
as the Deployments set them. The token is never printed; the kubeconfig is mode 0600 in a private
directory that is removed when the command exits (``run``). SIGTERM/SIGINT are passed on to the command,
and its exit status is returned.

Only the standard library and ``kubectl`` are used (the cluster's version-matched one is preferred).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config"
NAMESPACE = "kaito-system"
SERVICE_ACCOUNTS = ("kaito-workspace", "gpu-provisioner")
FIELD_MANAGER = "kaito-run-as-sa"


class RunAsError(RuntimeError):
    """A kubectl step failed."""


def find_kubectl() -> str:
    """``$KUBECTL``, else the kubectl built by hack/build-binaries.sh, else the one on PATH."""
    override = os.environ.get("KUBECTL")
    if override:
        return override
    cache = Path(os.environ.get("KAITO_BIN_CACHE") or Path.home() / ".cache" / "kaito-py") / "bin"
    built = sorted(cache.glob("k8s-*/kubectl"))
    if built:
        return str(built[-1])
    found = shutil.which("kubectl")
    if not found:
        raise RunAsError("no kubectl: run hack/build-binaries.sh or set $KUBECTL")
    return found


def kubectl(admin_kubeconfig: str, *args: str, secret_output: bool = False) -> str:
    """Run kubectl as the admin and return stdout; ``secret_output`` keeps it out of error messages."""
    proc = subprocess.run(
        [find_kubectl(), f"--kubeconfig={admin_kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        detail = proc.stderr.strip() if not secret_output else "(output withheld)"
        raise RunAsError(f"kubectl {' '.join(args[:3])} ... failed ({proc.returncode}): {detail}")
    return proc.stdout


def apply_rbac(admin_kubeconfig: str) -> None:
    """Apply the Namespace and the RBAC of config/ (server-side, idempotent)."""
    for part in ("namespace", "rbac"):
        kubectl(
            admin_kubeconfig,
            "apply",
            "--server-side",
            "--force-conflicts",
            f"--field-manager={FIELD_MANAGER}",
            "-k",
            str(CONFIG / part),
        )


def request_token(admin_kubeconfig: str, service_account: str, namespace: str, duration: str) -> str:
    """A bound token for the ServiceAccount from the TokenRequest API."""
    token = kubectl(
        admin_kubeconfig,
        "create",
        "token",
        service_account,
        f"--namespace={namespace}",
        f"--duration={duration}",
        secret_output=True,
    ).strip()
    if not token:
        raise RunAsError(f"the TokenRequest for {namespace}/{service_account} returned no token")
    return token


def write_kubeconfig(
    admin_kubeconfig: str, service_account: str, namespace: str, token: str, out: Path
) -> None:
    """A kubeconfig for the same cluster (server, CA) as the admin's, authenticating with ``token``."""
    view = json.loads(
        kubectl(admin_kubeconfig, "config", "view", "--raw", "--minify", "--flatten", "-o", "json")
    )
    cluster = view["clusters"][0]["cluster"]
    user = f"system:serviceaccount:{namespace}:{service_account}"
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {"name": service_account, "context": {"cluster": "cluster", "user": user, "namespace": namespace}}
        ],
        "current-context": service_account,
    }
    # Created 0600 before the token is written; JSON is valid YAML for every Kubernetes client.
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f, indent=2)


def run_command(command: Sequence[str], env: dict[str, str]) -> int:
    """Run ``command`` with ``env``, passing SIGTERM/SIGINT on; return its exit status."""
    proc = subprocess.Popen(list(command), env=env)

    def forward(signum: int, frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line: ``run``, ``kubeconfig`` or ``apply-rbac``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="admin kubeconfig")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("apply-rbac", help="apply config/ Namespace + RBAC and exit")
    for name in ("run", "kubeconfig"):
        s = sub.add_parser(name)
        s.add_argument("--sa", required=True, choices=SERVICE_ACCOUNTS, help="ServiceAccount in kaito-system")
        s.add_argument("--namespace", default=NAMESPACE)
        s.add_argument("--duration", default="12h", help="token lifetime (the apiserver may cap it)")
        s.add_argument("--no-apply", action="store_true", help="do not apply config/ RBAC first")
        if name == "kubeconfig":
            s.add_argument("--out", type=Path, required=True, help="where to write the kubeconfig (0600)")
        else:
            s.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = p.parse_args(argv)
    if not args.kubeconfig:
        p.error("no admin kubeconfig: pass --kubeconfig or set KUBECONFIG")
    if args.action == "run":
        if args.command[:1] == ["--"]:
            args.command = args.command[1:]
        if not args.command:
            p.error("run: give the command after --")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    args = parse_args(argv)
    try:
        if args.action == "apply-rbac" or not args.no_apply:
            apply_rbac(args.kubeconfig)
        if args.action == "apply-rbac":
            return 0
        token = request_token(args.kubeconfig, args.sa, args.namespace, args.duration)
        if args.action == "kubeconfig":
            write_kubeconfig(args.kubeconfig, args.sa, args.namespace, token, args.out)
            print(f"wrote {args.out} for system:serviceaccount:{args.namespace}:{args.sa}", file=sys.stderr)
            return 0
        with tempfile.TemporaryDirectory(prefix="kaito-run-as-sa-") as private:
            path = Path(private) / "kubeconfig"
            write_kubeconfig(args.kubeconfig, args.sa, args.namespace, token, path)
            env = dict(os.environ)
            env.update(KUBECONFIG=str(path), POD_NAMESPACE=args.namespace, SYSTEM_NAMESPACE=args.namespace)
            return run_command(args.command, env)
    except RunAsError as e:
        print(f"run-as-sa: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
