"""Killing the provisioner (a real process, SIGKILL) while ARM is still creating the pool, then starting a
new one: the new process adopts the pool being created -- no second PUT, no leaked pool."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from hack.localcluster import LocalCluster
from test.fake_arm import FakeArm, FakeArmServer
from test.fake_arm.nodes import AksNodeSimulator
from test.integration.provisioner.lifecycle.conftest import RG, SUB
from test.integration.provisioner.lifecycle.helpers import (
    Machines,
    fresh_name,
    gpu_count,
    machine_manifest,
    mark_node_ready,
    nodes_of_pool,
)
from test.waiting import eventually

REPO = Path(__file__).resolve().parents[4]


def start(cluster: LocalCluster, env: dict[str, str], run: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "provisioner",
                "--cloud",
                "azure",
                "--kubeconfig",
                str(cluster.kubeconfig),
                "--no-leader-elect",
                "--metrics-port",
                "-1",
                "--probe-port",
                "-1",
                "--gc-interval",
                "0",
                "--machine-selector",
                f"kaito.test/run={run}",
                "--log-format",
                "json",
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_restart_mid_create_neither_leaks_nor_duplicates(
    machine_crd: LocalCluster, api_client: ApiClient, tmp_path: Path
) -> None:
    # ARM keeps the create running until the test finishes it (as a slow GPU VM allocation would).
    arm = FakeArm(polls=10**9, retry_after=1, hooks=[AksNodeSimulator(api_client, gpu_count)])
    machines = Machines(api_client)
    name, run = fresh_name("rs"), fresh_name("run")
    aks = f"aks-{run}"
    token = tmp_path / "arm-token"
    token.write_text("fake-arm-token")
    log = tmp_path / "provisioner.log"
    procs: list[subprocess.Popen[bytes]] = []

    def tail() -> str:
        return "\n".join(log.read_text(errors="replace").splitlines()[-60:])

    async with FakeArmServer(arm) as server:
        env = machine_crd.env()
        env.update(
            {
                "ARM_SUBSCRIPTION_ID": SUB,
                "ARM_RESOURCE_GROUP": RG,
                "AZURE_CLUSTER_NAME": aks,
                "ARM_ENDPOINT": server.endpoint,
                "ARM_CA_FILE": str(server.ca_file),
                "ARM_TOKEN_FILE": str(token),
                "ARM_POLLING_INTERVAL": "1",
                "ARM_MAX_RETRIES": "0",
            }
        )
        try:
            procs.append(start(machine_crd, env, run, log))
            await machines.create(machine_manifest(name, run))

            async def put_sent() -> bool:
                assert procs[0].poll() is None, tail()
                return len(arm.requests_for("PUT", name)) == 1

            await eventually(put_sent, 60, "the first provisioner to send the PUT")
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(timeout=10)

            procs.append(start(machine_crd, env, run, log))
            # The new process finds the pool still Creating and waits for it instead of creating it again.
            await machines.wait_condition(
                name, "MachineLaunched", "Unknown", 60, reason="OperationInProgress"
            )
            assert len(arm.requests_for("PUT", name)) == 1

            await arm.finish_operations()  # ARM completes the create; AKS registers the node
            arm.polls = 1  # later operations (the delete) finish promptly

            async def node() -> str | None:
                nodes = await nodes_of_pool(api_client, name)
                return nodes[0].metadata.name if nodes else None

            await mark_node_ready(api_client, await eventually(node, 30, "the pool's node"))
            m = await machines.wait_condition(name, "Ready", "True", 60)
            assert m["status"]["nodeName"].startswith(f"aks-{name}-")
            assert len(arm.requests_for("PUT", name)) == 1
            assert [p for p in arm.pools if p[3] == name.lower()] != []

            await machines.delete(name)

            async def released() -> bool:
                assert procs[1].poll() is None, tail()
                return await machines.get(name) is None

            await eventually(released, 60, f"machine {name} to be deleted")
            assert [p for p in arm.pools if p[3] == name.lower()] == []  # nothing leaked
            assert await nodes_of_pool(api_client, name) == []
            procs[1].send_signal(signal.SIGTERM)
            assert procs[1].wait(timeout=30) == 0, tail()
        finally:
            print(tail())  # shown by pytest only when the test failed
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            if await machines.get(name) is not None:  # a failed test must not leave a stuck Machine behind
                await machines.patch(name, {"metadata": {"finalizers": None}})
                with contextlib.suppress(ApiException):
                    await machines.delete(name)
