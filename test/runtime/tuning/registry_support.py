"""A real OCI registry for the tests: Debian's ``docker-registry`` (distribution 2.8) on loopback.

Each registry gets its own generated config, storage directory and free port; readiness is polled on
``/v2/`` (200, or 401 when auth is on) with a deadline.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REGISTRY_BINARY = "/usr/bin/docker-registry"


def free_port() -> int:
    """A port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def registry_available() -> bool:
    """Whether the registry binary is installed (``apt-get install docker-registry``)."""
    return shutil.which(REGISTRY_BINARY) is not None


@dataclass
class Registry:
    """A running registry process."""

    host: str
    storage: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        """Terminate the process and wait for it."""
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log(self) -> str:
        """The registry's output so far (for assertion messages)."""
        return self.log_path.read_text(errors="replace")[-4000:]


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def start_registry(workdir: Path, users: dict[str, str] | None = None, timeout: float = 30.0) -> Registry:
    """Start a registry storing under ``workdir``; with ``users``, htpasswd (bcrypt) basic auth."""
    import bcrypt

    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    storage = workdir / "storage"
    storage.mkdir()
    lines = [
        "version: 0.1",
        "log:",
        "  level: warn",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {storage}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        "  secret: kaito-test-secret",
    ]
    if users:
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(
            "".join(
                f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                for user, pw in users.items()
            )
        )
        lines += ["auth:", "  htpasswd:", "    realm: kaito-test", f"    path: {htpasswd}"]
    config = workdir / "config.yml"
    config.write_text("\n".join(lines) + "\n")
    log_path = workdir / "registry.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
    registry = Registry(f"127.0.0.1:{port}", storage, process, log_path)
    ready = {200, 401} if users else {200}
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"registry exited with {process.returncode}: {registry.log()}")
        try:
            if _status(f"http://{registry.host}/v2/") in ready:
                return registry
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            registry.stop()
            raise AssertionError(f"registry not ready after {timeout}s: {registry.log()}")
        time.sleep(0.05)  # poll interval of the readiness check above, bounded by the deadline


def docker_config(path: Path, registry: str, user: str, password: str) -> Path:
    """Write a ``.dockerconfigjson``-style file (what the imagePushSecret Secret holds) to ``path``."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry: {"username": user, "password": password, "auth": auth}}}))
    return path
