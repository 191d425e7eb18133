"""A tiny operator on the runtime machinery, for leader-election tests and demos (not shipped: it lives
in hack/, outside the operator package).

It runs a :class:`~kaito.runtime.manager.Manager` with Lease leader election and one controller that
stamps every ConfigMap labelled ``kaito.sh/demo=true`` in ``--namespace`` with the annotation
``kaito.sh/reconciled-by: <identity>`` -- so which replica is reconciling is visible from outside.

    python -m hack.demo_process --namespace NS --lease-name demo --identity a \\
        --probe-port 18081 --metrics-port 18080 [--kubeconfig PATH]

Exit status: 0 after a clean SIGTERM/SIGINT shutdown (the Lease is released), 1 when leadership was
lost (as controller-runtime, the process exits and is restarted as a standby).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import structlog

from kaito.runtime.controller import DONE, Result
from kaito.runtime.kube import CONFIGMAPS, KubeClient, load_api_client, split_key
from kaito.runtime.logging import configure_logging
from kaito.runtime.manager import Manager, ManagerOptions

ANNOTATION = "kaito.sh/reconciled-by"
LABEL_SELECTOR = "kaito.sh/demo=true"

log = structlog.get_logger("kaito.runtime.demo")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kubeconfig", default=None)
    p.add_argument("--namespace", required=True, help="namespace of the Lease and the ConfigMaps")
    p.add_argument("--lease-name", default="kaito-demo")
    p.add_argument("--identity", default=None)
    p.add_argument("--probe-port", type=int, default=8081)
    p.add_argument("--metrics-port", type=int, default=8080)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lease-duration", type=float, default=15.0)
    p.add_argument("--renew-deadline", type=float, default=10.0)
    p.add_argument("--retry-period", type=float, default=2.0)
    p.add_argument("--log-format", choices=("json", "console"), default="json")
    return p.parse_args(argv)


async def amain(argv: Sequence[str] | None = None) -> int:
    """Run the demo manager until signalled; see the module docstring for the exit status."""
    args = parse_args(argv)
    configure_logging(json_output=args.log_format == "json")
    api = await load_api_client(args.kubeconfig)
    client = KubeClient(api)
    opts = ManagerOptions(
        name="demo",
        leader_election=True,
        lease_name=args.lease_name,
        lease_namespace=args.namespace,
        lease_duration=args.lease_duration,
        renew_deadline=args.renew_deadline,
        retry_period=args.retry_period,
        probe_host=args.bind,
        probe_port=args.probe_port,
        metrics_host=args.bind,
        metrics_port=args.metrics_port,
    )
    if args.identity:
        opts.identity = args.identity
    mgr = Manager(client, opts)
    mgr.close_on_exit(api.close)
    configmaps = mgr.informer(CONFIGMAPS, namespace=args.namespace, label_selector=LABEL_SELECTOR)

    async def reconcile(key: str) -> Result:
        cm = configmaps.store.get(key)
        if cm is None:
            return DONE
        annotations = (cm.get("metadata") or {}).get("annotations") or {}
        if annotations.get(ANNOTATION) != opts.identity:
            ns, name = split_key(key)
            await client.patch(
                CONFIGMAPS, name, {"metadata": {"annotations": {ANNOTATION: opts.identity}}}, ns
            )
            log.info("stamped configmap", identity=opts.identity)
        return DONE

    mgr.add_controller(
        "demo-configmaps",
        reconcile,
        workers=args.workers,
        for_=CONFIGMAPS,
        namespace=args.namespace,
        label_selector=LABEL_SELECTOR,
    )
    return await mgr.run_main()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    return asyncio.run(amain(argv))


if __name__ == "__main__":
    sys.exit(main())
