"""kaito-controller as a real process: ``/readyz`` says ready only while the admission webhook listens.

The order inside one process is covered without timing luck by
``test/unit/webhook/test_webhook_server.py::test_readyz_is_not_ready_before_the_webhook_listens``; this
checks the command's wiring: the ``webhook`` readiness check is registered, every 200 from ``/readyz``
comes with a webhook that answers over TLS, and SIGTERM ends the process with status 0.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import aiohttp

from hack.localcluster import free_port
from test.waiting import eventually

REPO = Path(__file__).resolve().parents[3]


async def test_controller_is_ready_only_with_its_webhook_listening(
    crds: Any, namespace: str, tmp_path: Path
) -> None:
    probe_port, webhook_port = free_port(), free_port()
    log_path = tmp_path / "controller.log"
    argv = [
        sys.executable,
        "-m",
        "kaito",
        "--kubeconfig",
        str(crds.kubeconfig),
        "--namespace",
        namespace,
        "--metrics-bind-address",
        "0",
        "--health-probe-bind-address",
        f"127.0.0.1:{probe_port}",
        "--log-format",
        "json",
        "--webhook-host",
        "127.0.0.1",
        "--webhook-port",
        str(webhook_port),
        "--webhook-ip",
        "127.0.0.1",
        "--webhook-service",
        "",
        "--webhook-namespace",
        namespace,
        "--webhook-cert-dir",
        str(tmp_path / "certs"),
    ]
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, env=crds.env(), stdout=log_file, stderr=asyncio.subprocess.STDOUT
        )
    # Any certificate will do: the question is whether the webhook accepts and answers at all.
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    readyz = f"http://127.0.0.1:{probe_port}/readyz"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

            async def ready() -> str | None:
                assert proc.returncode is None, f"controller exited:\n{log_path.read_text()}"
                try:
                    async with http.get(readyz + "?verbose") as r:
                        status, text = r.status, await r.text()
                except aiohttp.ClientConnectionError:
                    return None  # the probe server is not up yet
                if status != 200:
                    return None
                # Ready was reported: the webhook must answer now, not "soon".
                async with http.get(f"https://127.0.0.1:{webhook_port}/healthz", ssl=insecure) as w:
                    assert w.status == 200, f"/readyz 200 but the webhook answered {w.status}"
                return text

            text = await eventually(ready, 90, f"/readyz 200 (controller log: {log_path})", interval=0.02)
            assert "[+]webhook ok" in text and "[+]informers-synced ok" in text, text
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            code = await proc.wait()
        assert code == 0, log_path.read_text()
        assert "manager stopped" in log_path.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
