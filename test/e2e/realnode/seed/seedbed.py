"""What the seed's CPU quick starts need around the real node: peers pods reach, the seed's manifests and
commands, and a client that keeps asking.

Every peer is real and listens on the real node's bridge address (our own test network): an HTTP server
for ``tuning.input.urls`` and Debian's ``docker-registry`` with htpasswd auth over TLS (certificate from
the machine's test CA, which the tiny preset image trusts) for ``tuning.output.image`` and adapters.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import os
import secrets
import shlex
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hack.localcluster import LocalCluster

REPO = Path(__file__).resolve().parents[4]
SAMPLES = REPO / "config" / "samples"

sys.path.insert(0, str(REPO / "test" / "runtime" / "tuning"))
from registry_support import Registry, start_registry  # noqa: E402

# The seed's /chat request, made deterministic: greedy decoding, a bounded answer.
SEEDED_CHAT = {
    "prompt": "What does KAITO deploy?",
    "generate_kwargs": {"do_sample": False, "max_new_tokens": 12},
}


# ------------------------------------------------------------------------------------------ peers


class DatasetServer:
    """A plain HTTP file server on ``address`` (pods fetch ``tuning.input.urls`` from it).

    Serves the files of ``root`` by name; anything else is 404. ``hits`` records (path, status).
    """

    def __init__(self, root: Path, address: str) -> None:
        self.root = root
        self.hits: list[tuple[str, int]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.split("?", 1)[0].lstrip("/")
                path = server.root / name
                if "/" in name or not name or not path.is_file():
                    server.hits.append((name, 404))
                    self.send_error(404, "no such dataset")
                    return
                data = path.read_bytes()
                server.hits.append((name, 200))
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.base_url = f"http://{address}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        """The URL of ``name`` (a file under ``root``, or not: then it 404s)."""
        return f"{self.base_url}/{name}"

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


def write_dataset(path: Path, rows: int = 32) -> Path:
    """A conversational parquet dataset (the dolly-15k shape of the seed's URL), by the tuning tests' helper."""
    from tuning_support import conversational_rows, write_parquet

    return write_parquet(path, conversational_rows(rows))


@dataclass
class SeedRegistry:
    """The authenticating registry pods push to and pull from, and the Secrets that reach it."""

    registry: Registry
    user: str
    password: str

    @property
    def host(self) -> str:
        return self.registry.host

    def docker_config(self, password: str | None = None) -> str:
        """``.dockerconfigjson`` for this registry (``password`` overrides: a secret the registry refuses)."""
        pw = self.password if password is None else password
        auth = base64.b64encode(f"{self.user}:{pw}".encode()).decode()
        return json.dumps({"auths": {self.host: {"username": self.user, "password": pw, "auth": auth}}})

    def push_secret(self, name: str, password: str | None = None) -> dict[str, Any]:
        """The ``kubernetes.io/dockerconfigjson`` Secret the seed's ``imagePushSecret`` names."""
        data = base64.b64encode(self.docker_config(password).encode()).decode()
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": data},
        }


def start_seed_registry(workdir: Path, address: str, tls: tuple[Path, Path, Path]) -> SeedRegistry:
    """Debian's docker-registry on ``address`` with htpasswd auth over TLS (``tls``: cert, key, CA)."""
    user, password = "kaito-seed", secrets.token_hex(12)
    running = start_registry(workdir, users={user: password}, bind=address, tls=tls)
    return SeedRegistry(running, user, password)


# ----------------------------------------------------------------------------------- the manifests


def sample(file: str, mutate: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """A manifest of ``config/samples`` (the seed's YAML), changed by ``mutate`` where the test must."""
    doc: dict[str, Any] = yaml.safe_load((SAMPLES / file).read_text())
    if mutate is not None:
        mutate(doc)
    return doc


@dataclass(frozen=True)
class CPUTarget:
    """Where the seed's workspaces go here: the real node, by the label the workspace selects and its
    CPU instance type, with the tiny CPU preset."""

    node: str
    instance_type: str
    label: tuple[str, str]
    preset: str

    def place(self, doc: dict[str, Any]) -> None:
        """Point a seed manifest at the real node (BYO: labelSelector + preferredNodes, no Machine)."""
        resource = doc["resource"]
        resource["instanceType"] = self.instance_type
        resource["labelSelector"] = {"matchLabels": {self.label[0]: self.label[1]}}
        resource["preferredNodes"] = [self.node]
        section = doc.get("inference") or doc.get("tuning")
        assert isinstance(section, dict)
        section["preset"]["name"] = self.preset


# ------------------------------------------------------------------------------------- kubectl etc.


def kget(cluster: LocalCluster, *args: str) -> Any:
    """``kubectl get ... -o json`` parsed, or None when it fails (not found)."""
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def conditions(ws: Any) -> dict[str, str]:
    """Condition type -> status of a workspace."""
    return {c["type"]: c["status"] for c in ((ws or {}).get("status") or {}).get("conditions") or []}


def events_for(cluster: LocalCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    """Events about the workspace ``name``."""
    out = kget(cluster, "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")
    return list((out or {}).get("items") or [])


def seed_curl(
    cluster: LocalCluster,
    namespace: str,
    image: str,
    cluster_ip: str,
    body: Mapping[str, Any],
    timeout: int = 120,
) -> str:
    """The seed's own command, with our curl image and the test's namespace::

        kubectl run -i --rm --restart=Never curl --image=<image> -- curl -X POST http://$CLUSTERIP/chat \\
            -H "accept: application/json" -H "Content-Type: application/json" -d '<body>'

    Returns kubectl's output: what the pod printed, then kubectl's "pod ... deleted" (see :func:`first_json`).
    """
    argv = [
        "run", "-i", "--rm", "--restart=Never", "curl", f"--image={image}", "-n", namespace,
        f"--pod-running-timeout={timeout}s", "--",
        "curl", "-sS", "-X", "POST", f"http://{cluster_ip}/chat",
        "-H", "accept: application/json", "-H", "Content-Type: application/json", "-d", json.dumps(body),
    ]  # fmt: skip
    out = cluster.kubectl(*argv, check=False, timeout=timeout + 60)
    assert out.returncode == 0, f"kubectl {shlex.join(argv)} -> {out.returncode}\n{out.stdout}\n{out.stderr}"
    return str(out.stdout)


def seed_curl_answer(
    cluster: LocalCluster,
    namespace: str,
    image: str,
    cluster_ip: str,
    body: Mapping[str, Any],
    tries: int = 3,
) -> Any:
    """The JSON the seed's command printed.

    ``kubectl run -i`` attaches after the container started; a curl that is done by then leaves kubectl
    to fall back to the logs, which ``--rm`` may already be deleting, and the output is lost although
    the command succeeded (exit 0). That race is kubectl's, so such a run is repeated; a failed curl is
    not (``seed_curl`` asserts its exit code).
    """
    out = ""
    for _ in range(tries):
        out = seed_curl(cluster, namespace, image, cluster_ip, body)
        if "{" in out:
            return first_json(out)
    raise AssertionError(f"the seed's curl printed no JSON in {tries} runs: {out!r}")


def first_json(text: str) -> Any:
    """The first JSON object in ``text`` (curl prints no newline, so kubectl's own lines may follow it)."""
    start = text.find("{")
    assert start >= 0, f"no JSON object in {text!r}"
    value, _ = json.JSONDecoder().raw_decode(text[start:])
    return value


def service_ip(cluster: LocalCluster, namespace: str, name: str) -> str:
    """The seed's ``kubectl get svc <name> -o jsonpath="{.spec.clusterIPs[0]}"``."""
    out = cluster.kubectl("get", "svc", name, "-n", namespace, "-o", "jsonpath={.spec.clusterIPs[0]}")
    return str(out.stdout).strip()


# ------------------------------------------------------------------------------------- the client


async def http_json(
    method: str, url: str, body: Mapping[str, Any] | None = None, timeout: float = 60.0
) -> tuple[int, Any]:
    """One request on a fresh connection (no keep-alive: each request finds a pod through the Service)."""
    import aiohttp

    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.request(method, url, json=body) as resp,
    ):
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


@dataclass
class KeepAsking:
    """A client that keeps asking ``url`` the same question until stopped, counting what failed.

    A failure is anything but a 200 with a ``Result``: a refused or reset connection, a timeout, a 5xx.
    """

    url: str
    body: Mapping[str, Any]
    ok: int = 0
    failures: list[str] = field(default_factory=list)  # "+<seconds since start>s <what>"
    started: float = field(default_factory=time.monotonic)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)

    async def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status, data = await http_json("POST", self.url, self.body, timeout=30)
                if status == 200 and isinstance(data, dict) and "Result" in data:
                    self.ok += 1
                else:
                    self._fail(f"HTTP {status}: {str(data)[:200]}")
            except Exception as e:  # every kind of failure is what this client counts
                cause = getattr(e, "os_error", None) or e.__cause__
                self._fail(f"{type(e).__name__}: {e} ({cause!r})"[:300])
            # Pace: at most ~10 requests per second, so a roll of a minute sees hundreds.
            await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - started)))

    def _fail(self, what: str) -> None:
        self.failures.append(f"+{time.monotonic() - self.started:.1f}s {what}")

    def start(self) -> None:
        """Start asking (in the running loop)."""
        self.started = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop after the request in flight and wait for it."""
        self._stop.set()
        if self._task is not None:
            await self._task


# ------------------------------------------------------------------------------------------ numbers


def report(metric: str, value: float, unit: str = "s") -> None:
    """Print one measured number and append it to ``$KAITO_SEED_METRICS`` (default
    ``_out/seed-metrics.jsonl``), so a run leaves the numbers the issue asks for."""
    line = {
        "metric": metric,
        "value": round(value, 3),
        "unit": unit,
        "at": time.strftime("%FT%TZ", time.gmtime()),
    }
    print(f"[seed] {metric} = {value:.3f} {unit}")
    path = Path(os.environ.get("KAITO_SEED_METRICS") or REPO / "_out" / "seed-metrics.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")


@dataclass
class EndpointLog:
    """What the Service's EndpointSlices said, polled every half second: one line per change (for a
    failure's message: when the Service had which endpoints in which state)."""

    cluster: LocalCluster
    namespace: str
    service: str
    lines: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    _task: asyncio.Task[None] | None = None

    def _snapshot(self) -> str:
        out = kget(
            self.cluster,
            "endpointslices",
            "-n",
            self.namespace,
            "-l",
            f"kubernetes.io/service-name={self.service}",
        )
        states = []
        for item in (out or {}).get("items") or []:
            for ep in item.get("endpoints") or []:
                c = ep.get("conditions") or {}
                flags = "".join(k[0] for k in ("ready", "serving", "terminating") if c.get(k))
                states.append(f"{','.join(ep.get('addresses') or [])}[{flags}]")
        return " ".join(sorted(states)) or "(none)"

    async def _loop(self) -> None:
        last = ""
        while True:
            now = await asyncio.to_thread(self._snapshot)
            if now != last:
                self.lines.append(f"+{time.monotonic() - self.started:.1f}s {now}")
                last = now
            await asyncio.sleep(0.5)

    def start(self) -> None:
        self.started = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
