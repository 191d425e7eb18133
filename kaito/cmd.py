"""``kaito-controller``: the workspace controller process (pod 1).

Wires the :class:`~kaito.runtime.manager.Manager` (informers, leader election, probe and metrics
servers, SIGTERM handling), the workspace controller and, unless ``--no-webhook``, the admission webhook
with its self-managed certificate (served on every replica, leader or not)::

    kaito-controller --kubeconfig ~/.kube/config --provisioning machine --workers 5 \\
        --webhook-port 9443 --webhook-ip 127.0.0.1     # local: the apiserver calls https://127.0.0.1

Exit status: 0 after SIGTERM/SIGINT, 1 when leadership was lost (restart as a standby) or the caches did
not sync, 2 for bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import structlog

from kaito.api.workspace import RuntimeName
from kaito.presets.registry import DEFAULT_REGISTRY, default_registry
from kaito.presets.skus import CLOUDS, default_sku_catalog
from kaito.runtime.kube import CONFIGMAPS, KubeClient, load_api_client
from kaito.runtime.logging import configure_logging
from kaito.runtime.manager import Manager, ManagerOptions
from kaito.workspace.manifests import ManifestOptions
from kaito.workspace.reconciler import PROVISIONING_MODES, ReconcilerOptions, register
from kaito.workspace.tuning import default_templates

log = structlog.get_logger("kaito.cmd")

VALIDATING_WEBHOOK = "validation.workspace.kaito.sh"
MUTATING_WEBHOOK = "mutation.workspace.kaito.sh"


def _hostport(value: str) -> tuple[str, int | None]:
    """``":8080"`` / ``"127.0.0.1:8080"`` / ``"0"`` (disabled) as (host, port)."""
    if value in ("0", ""):
        return "0.0.0.0", None
    host, _, port = value.rpartition(":")
    return host or "0.0.0.0", int(port)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags (environment variables give upstream-compatible defaults)."""
    env = os.environ
    p = argparse.ArgumentParser(
        prog="kaito-controller", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--kubeconfig", default=env.get("KUBECONFIG"), help="default: in-cluster, then ~/.kube")
    p.add_argument("--workers", type=int, default=5, help="concurrent reconciles")
    p.add_argument(
        "--provisioning",
        choices=PROVISIONING_MODES,
        default=env.get("KAITO_PROVISIONING", "machine"),
        help="machine: create Machines for missing nodes (gpu-provisioner); byo: only existing nodes",
    )
    p.add_argument(
        "--image-registry",
        default=env.get("PRESET_REGISTRY_NAME", DEFAULT_REGISTRY),
        help="registry of the preset model images",
    )
    p.add_argument(
        "--default-runtime",
        choices=[r.value for r in RuntimeName],
        default=env.get("KAITO_DEFAULT_RUNTIME", RuntimeName.TRANSFORMERS.value),
        help="runtime when a workspace has no kaito.sh/runtime annotation",
    )
    p.add_argument(
        "--enable-tuning",
        action="store_true",
        default=env.get("KAITO_ENABLE_TUNING", "").lower() in ("1", "true", "yes"),
        help="run tuning workspaces as Jobs (needs batch/jobs get, list, watch, create)",
    )
    p.add_argument("--namespace", default=None, help="watch one namespace only (default: all)")
    p.add_argument("--leader-elect", action="store_true", help="Lease leader election (for 2+ replicas)")
    p.add_argument("--leader-election-namespace", default=env.get("SYSTEM_NAMESPACE", "kaito-system"))
    p.add_argument("--leader-election-id", default="kaito-workspace", help="name of the Lease")
    p.add_argument("--leader-election-identity", default=None, help="default: hostname_uuid")
    p.add_argument("--leader-election-lease-duration", type=float, default=15.0)
    p.add_argument("--leader-election-renew-deadline", type=float, default=10.0)
    p.add_argument("--leader-election-retry-period", type=float, default=2.0)
    p.add_argument("--metrics-bind-address", default=":8080")
    p.add_argument("--health-probe-bind-address", default=":8081")
    p.add_argument("--webhook", dest="webhook", action="store_true", default=True)
    p.add_argument("--no-webhook", dest="webhook", action="store_false")
    p.add_argument("--webhook-host", default="0.0.0.0")
    p.add_argument("--webhook-port", type=int, default=int(env.get("WEBHOOK_PORT", "9443")))
    p.add_argument("--webhook-namespace", default=env.get("SYSTEM_NAMESPACE", "kaito-system"))
    p.add_argument("--webhook-service", default=env.get("WEBHOOK_SERVICE", "kaito-workspace-webhook"))
    p.add_argument("--webhook-secret", default="workspace-webhook-cert")
    p.add_argument("--webhook-ip", action="append", default=[], help="IP SAN for the webhook certificate")
    p.add_argument("--webhook-cert-dir", default=None, help="default: a private temp dir")
    p.add_argument("--cloud-provider", choices=CLOUDS, default=env.get("CLOUD_PROVIDER") or None)
    p.add_argument("--machine-deletion-timeout", type=float, default=300.0)
    p.add_argument("--log-format", choices=("json", "console"), default=None)
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


async def amain(argv: Sequence[str] | None = None) -> int:
    """Run the controller until signalled; see the module docstring for the exit status."""
    args = parse_args(argv)
    configure_logging(None if args.log_format is None else args.log_format == "json", args.log_level)
    api = await load_api_client(args.kubeconfig)
    client = KubeClient(api)
    metrics_host, metrics_port = _hostport(args.metrics_bind_address)
    probe_host, probe_port = _hostport(args.health_probe_bind_address)
    mopts = ManagerOptions(
        name="kaito-workspace",
        leader_election=args.leader_elect,
        lease_name=args.leader_election_id,
        lease_namespace=args.leader_election_namespace,
        lease_duration=args.leader_election_lease_duration,
        renew_deadline=args.leader_election_renew_deadline,
        retry_period=args.leader_election_retry_period,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        probe_host=probe_host,
        probe_port=probe_port,
    )
    if args.leader_election_identity:
        mopts.identity = args.leader_election_identity
    mgr = Manager(client, mopts)
    mgr.close_on_exit(api.close)
    try:
        await _setup(mgr, client, api, args)
    except BaseException:
        # A failed start-up still closes the API client (and the webhook's temp dir).
        await mgr.close()
        raise
    return await mgr.run_main()


async def _setup(mgr: Manager, client: KubeClient, api: object, args: argparse.Namespace) -> None:
    """Register the workspace controller and, unless ``--no-webhook``, the webhook on ``mgr``."""
    registry = default_registry()
    skus = default_sku_catalog()
    # Read now: a controller image without its default tuning templates stops here, not at the first
    # tuning workspace.
    default_templates()
    options = ReconcilerOptions(
        provisioning=args.provisioning,
        manifests=ManifestOptions(
            registry=args.image_registry,
            default_runtime=RuntimeName(args.default_runtime),
        ),
        machine_deletion_timeout=args.machine_deletion_timeout,
        tuning=args.enable_tuning,
    )
    register(
        mgr,
        client,
        registry=registry,
        skus=skus,
        options=options,
        workers=args.workers,
        namespace=args.namespace,
    )
    if args.webhook:
        cert_dir = args.webhook_cert_dir
        if cert_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="kaito-webhook-")
            mgr.close_on_exit(tmp.cleanup)
            cert_dir = tmp.name
        await _setup_webhook(mgr, client, api, args, Path(cert_dir))


async def _setup_webhook(
    mgr: Manager, client: KubeClient, api: object, args: argparse.Namespace, cert_dir: Path
) -> None:
    """Issue/load the serving certificate, then serve the webhook on every replica (not leader-gated)."""
    from kaito.webhook.certs import CertManager
    from kaito.webhook.server import WebhookServer
    from kaito.webhook.validation import WorkspaceValidator

    async def read_configmap(namespace: str, name: str) -> dict[str, str] | None:
        cm = await client.get_or_none(CONFIGMAPS, name, namespace)
        return None if cm is None else dict(cm.get("data") or {})

    validator = WorkspaceValidator(
        default_registry(),
        default_sku_catalog(),
        cloud_provider=args.cloud_provider,
        configmaps=read_configmap,
        # Bring-your-own nodes may be of any type; Machines need a SKU the provisioner knows.
        allow_unknown_instance_types=args.provisioning == "byo",
    )
    certs = CertManager(
        api,  # type: ignore[arg-type]
        namespace=args.webhook_namespace,
        cert_dir=cert_dir,
        secret_name=args.webhook_secret,
        service=args.webhook_service or None,
        ip_addresses=args.webhook_ip,
        validating_webhooks=[VALIDATING_WEBHOOK],
        mutating_webhooks=[MUTATING_WEBHOOK],
    )
    # The certificate must be on disk before the server can start; later rotations reload it.
    await certs.ensure()
    server = WebhookServer(validator, host=args.webhook_host, port=args.webhook_port, cert_dir=cert_dir)
    certs.on_change = server.reload_certificates
    # /readyz stays 500 until the webhook accepts connections.
    server.add_to_manager(mgr, alongside=certs.run)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    try:
        return asyncio.run(amain(argv))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
