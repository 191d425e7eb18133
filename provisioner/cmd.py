"""The gpu-provisioner's entry point: ``gpu-provisioner`` / ``python -m provisioner``.

    python -m provisioner --cloud kwok --kubeconfig ~/.kube/config --no-leader-elect
    python -m provisioner --cloud azure          # in-cluster; Azure settings from the environment

Flags (each also readable from the environment variable in brackets, flags win):
``--cloud`` azure|kwok [CLOUD_PROVIDER], ``--kubeconfig`` [KUBECONFIG], ``--leader-elect`` /
``--no-leader-elect`` [LEADER_ELECT, default true], ``--leader-election-namespace`` [POD_NAMESPACE],
``--metrics-port`` [METRICS_PORT, 8080], ``--probe-port`` [HEALTH_PROBE_PORT, 8081], ``--workers``,
``--kwok-node-delay``, ``--registration-timeout``, ``--drain-timeout``, ``--gc-interval``, ``--gc-grace``,
``--machine-selector``, ``--log-level`` [LOG_LEVEL], ``--log-format`` [KAITO_LOG_FORMAT].
Azure: ``ARM_SUBSCRIPTION_ID``, ``ARM_RESOURCE_GROUP``, ``AZURE_CLUSTER_NAME``, identity variables and
the optional ``ARM_*`` overrides (see :meth:`provisioner.cloud.azure.AzureConfig.from_env`).

Exit status: 0 after SIGTERM/SIGINT (in-flight reconciles finish, the Lease is released), 1 when
leadership was lost, the caches did not sync or the cloud provider could not be configured, 2 for bad
flags.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence

import structlog

from kaito.runtime.kube import KubeClient, load_api_client
from kaito.runtime.logging import configure_logging
from kaito.runtime.manager import Manager, ManagerOptions
from provisioner.cloud.factory import PROVIDERS, open_provider
from provisioner.lifecycle.reconciler import LifecycleOptions
from provisioner.lifecycle.setup import add_provisioner

log = structlog.get_logger("provisioner.cmd")

LEASE_NAME = "gpu-provisioner-leader-election"


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    return raw in ("1", "true", "yes", "on")


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    return int(raw) if raw.isdigit() else default


def gpu_count(sku: str) -> int:
    """GPUs of an instance type from the SKU catalog; KeyError for an unknown one."""
    from kaito.presets.skus import default_sku_catalog

    found = default_sku_catalog().get(sku)
    if found is None:
        raise KeyError(sku)
    return found.gpu_count


def node_capacity(sku: str) -> dict[str, str]:
    """A CPU instance type's ``cpu``/``memory`` capacity from the SKU catalog (empty for GPU or unknown ones)."""
    from kaito.presets.skus import default_sku_catalog

    found = default_sku_catalog().get(sku)
    if found is None or not found.is_cpu or found.vcpus is None or found.memory is None:
        return {}
    return {"cpu": str(found.vcpus), "memory": found.memory}


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Parse the command line (defaults from ``env``, by default the process environment)."""
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(
        prog="gpu-provisioner", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cloud_default = env.get("CLOUD_PROVIDER") or None
    p.add_argument(
        "--cloud",
        choices=PROVIDERS,
        default=cloud_default,
        required=cloud_default is None,
        help="where Machines become nodes: azure (AKS agent pools) or kwok (fake nodes)",
    )
    p.add_argument("--kubeconfig", default=env.get("KUBECONFIG") or None, help="default: in-cluster")
    p.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=_env_bool(env, "LEADER_ELECT", True),
        help="hold a Lease so only one replica reconciles (default on)",
    )
    p.add_argument("--leader-election-namespace", default=env.get("POD_NAMESPACE") or "kaito-system")
    p.add_argument("--leader-election-name", default=LEASE_NAME)
    p.add_argument("--identity", default=None, help="leader-election identity (default: hostname_uuid)")
    p.add_argument("--bind-address", default="0.0.0.0", help="address of the metrics and probe servers")
    p.add_argument(
        "--metrics-port", type=int, default=_env_int(env, "METRICS_PORT", 8080), help="negative disables"
    )
    p.add_argument(
        "--probe-port", type=int, default=_env_int(env, "HEALTH_PROBE_PORT", 8081), help="negative disables"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=50,
        help="concurrent Machine reconciles (an Azure create holds one for the length of ARM's operation)",
    )
    p.add_argument(
        "--kwok-node-delay", type=float, default=0.0, help="kwok: seconds before a Machine's Node appears"
    )
    p.add_argument(
        "--registration-timeout",
        type=float,
        default=900.0,
        help="seconds a launched instance has to register its Node before it is deleted and relaunched",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=600.0,
        help="seconds to drain a deleted Machine's node (evictions honour PodDisruptionBudgets) before deleting it",
    )
    p.add_argument("--gc-interval", type=float, default=120.0, help="seconds between orphan sweeps (0: off)")
    p.add_argument(
        "--gc-grace", type=float, default=30.0, help="minimum instance age before a sweep deletes it"
    )
    p.add_argument(
        "--machine-selector", default=None, help="label selector: serve only the Machines it matches"
    )
    p.add_argument("--log-level", default=env.get("LOG_LEVEL") or "info")
    p.add_argument(
        "--log-format",
        choices=("json", "console", "auto"),
        default=env.get("KAITO_LOG_FORMAT") or "auto",
    )
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.registration_timeout <= 0:
        p.error("--registration-timeout must be positive")
    return args


async def amain(argv: Sequence[str] | None = None) -> int:
    """Run the provisioner until signalled; see the module docstring for the exit status."""
    args = parse_args(argv)
    configure_logging(
        json_output=None if args.log_format == "auto" else args.log_format == "json", level=args.log_level
    )
    try:
        api = await load_api_client(args.kubeconfig)
    except Exception as e:  # no kubeconfig / service account: say so instead of a traceback
        log.error("cannot load the Kubernetes client configuration", kubeconfig=args.kubeconfig, error=str(e))
        return 1
    opts = ManagerOptions(
        name="gpu-provisioner",
        leader_election=args.leader_elect,
        lease_name=args.leader_election_name,
        lease_namespace=args.leader_election_namespace,
        metrics_host=args.bind_address,
        metrics_port=args.metrics_port if args.metrics_port >= 0 else None,
        probe_host=args.bind_address,
        probe_port=args.probe_port if args.probe_port >= 0 else None,
    )
    if args.identity:
        opts.identity = args.identity
    mgr = Manager(KubeClient(api), opts)
    mgr.close_on_exit(api.close)
    try:
        try:
            cloud = await open_provider(
                args.cloud,
                api_client=api,
                gpu_count=gpu_count,
                node_capacity=node_capacity,
                kwok_delay=args.kwok_node_delay,
            )
        except ValueError as e:  # ConfigError is a ValueError: a missing/malformed Azure variable
            log.error("cannot configure the cloud provider", cloud=args.cloud, error=str(e))
            await mgr.close()
            return 1
        mgr.close_on_exit(cloud.close)
        # Keep the result referenced: it holds the handle that reports kaito_machine_phase.
        provisioner = add_provisioner(
            mgr,
            cloud,
            gpu_count=gpu_count,
            options=LifecycleOptions(
                registration_timeout=args.registration_timeout, drain_timeout=args.drain_timeout
            ),
            workers=args.workers,
            machine_selector=args.machine_selector,
            gc_interval=args.gc_interval if args.gc_interval > 0 else None,
            gc_grace=args.gc_grace,
        )
    except BaseException:
        await mgr.close()
        raise
    log.info(
        "gpu-provisioner starting",
        cloud=args.cloud,
        leader_elect=args.leader_elect,
        workers=args.workers,
        machine_selector=args.machine_selector,
    )
    code = await mgr.run_main(
        cache_sync_hint="is the Machine CRD (machines.karpenter.sh) installed "
        "and may this identity list/watch Machines and Nodes?"
    )
    del provisioner
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    return asyncio.run(amain(argv))


if __name__ == "__main__":
    sys.exit(main())
