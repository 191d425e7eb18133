"""Run the fake ARM standalone for demos: ``python -m test.fake_arm --port 8443``.

Prints the endpoint and CA file; point the provisioner at it with ``ARM_ENDPOINT``, ``ARM_CA_FILE`` and
``ARM_TOKEN_FILE`` (any bearer token is accepted unless ``--token`` is given). With ``--kubeconfig`` each
finished agent pool also registers an AKS-like, kwok-managed Node in that cluster (GPU counts from the
SKU catalog), so the Azure provider's whole flow runs on a laptop.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from test.fake_arm.server import FakeArm, FakeArmServer


def _gpu_count(sku: str) -> int:
    from kaito.presets.skus import default_sku_catalog

    found = default_sku_catalog().get(sku)
    return found.gpu_count if found is not None else 0


async def _serve(args: argparse.Namespace) -> None:
    arm = FakeArm(polls=args.polls, retry_after=args.retry_after, token=args.token, location=args.location)
    api_client: Any = None
    if args.kubeconfig:
        from kubernetes_asyncio import config
        from kubernetes_asyncio.client import ApiClient, Configuration

        from test.fake_arm.nodes import AksNodeSimulator

        client_config = Configuration()
        await config.load_kube_config(config_file=args.kubeconfig, client_configuration=client_config)
        api_client = ApiClient(client_config)
        arm.hooks.append(AksNodeSimulator(api_client, _gpu_count, location=args.location))
    server = FakeArmServer(
        arm,
        host=args.host,
        port=args.port,
    )
    cert_dir = Path(args.cert_dir) if args.cert_dir else None
    if cert_dir is not None:
        cert_dir.mkdir(parents=True, exist_ok=True)
    await server.start(cert_dir)
    print(f"fake ARM listening on {server.endpoint}", flush=True)
    print(f"ARM_ENDPOINT={server.endpoint}", flush=True)
    print(f"ARM_CA_FILE={server.ca_file}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()
        if api_client is not None:
            await api_client.close()


def main() -> None:
    """Parse flags and serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m test.fake_arm", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--polls", type=int, default=2, help="InProgress polls before an operation finishes")
    parser.add_argument("--retry-after", type=int, default=1, help="Retry-After seconds on operations")
    parser.add_argument("--location", default="eastus", help="region named in operation URLs and node RGs")
    parser.add_argument("--kubeconfig", default=None, help="register a kwok Node per finished pool here")
    parser.add_argument("--token", default=None, help="require exactly this bearer token")
    parser.add_argument(
        "--cert-dir", default=None, help="where to write the self-signed cert (default: temp)"
    )
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
