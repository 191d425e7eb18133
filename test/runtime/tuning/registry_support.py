"""A real OCI registry for the tests: Debian's ``docker-registry`` (distribution 2.8) on loopback.

Each registry gets its own generated config, storage directory and free port; readiness is polled on
``/v2/`` (200, or 401 when auth is on) with a deadline. By default it listens on loopback over plain
HTTP; the real-node e2e tests (test/e2e/realnode/seed) bind it to the node's bridge address with TLS, so
that pods reach it like a cloud registry.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REGISTRY_BINARY = "/usr/bin/docker-registry"
TOKEN_SERVICE = "kaito-test-registry"
USER, PASSWORD = "kaito-pusher", "pw-9f3b7c"  # test-only credentials of the authenticating registries
TOKEN_ISSUER = "kaito-test-issuer"


def free_port(address: str = "127.0.0.1") -> int:
    """A port free on ``address`` (loopback by default) right now."""
    with socket.socket() as s:
        s.bind((address, 0))
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
    scheme: str = "http"

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


def _status(url: str, context: ssl.SSLContext | None = None) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def start_registry(
    workdir: Path,
    users: dict[str, str] | None = None,
    token_server: TokenServer | None = None,
    timeout: float = 30.0,
    *,
    bind: str = "127.0.0.1",
    tls: tuple[Path, Path, Path] | None = None,
) -> Registry:
    """Start a registry storing under ``workdir``; with ``users``, htpasswd (bcrypt) basic auth; with
    ``token_server``, bearer-token auth (distribution's ``auth.token``) trusting that server's key.

    ``bind`` is the address to listen on; ``tls`` (certificate, key, CA that signed them) serves HTTPS.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(bind)
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
        f"  addr: {bind}:{port}",
        "  secret: kaito-test-secret",
    ]
    if tls is not None:
        lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
    if users:
        import bcrypt  # distribution's htpasswd accepts bcrypt hashes only

        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(
            "".join(
                f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                for user, pw in users.items()
            )
        )
        lines += ["auth:", "  htpasswd:", "    realm: kaito-test", f"    path: {htpasswd}"]
    elif token_server is not None:
        lines += [
            "auth:",
            "  token:",
            f"    realm: {token_server.url}/token",
            f"    service: {TOKEN_SERVICE}",
            f"    issuer: {TOKEN_ISSUER}",
            f"    rootcertbundle: {token_server.cert}",
        ]
    config = workdir / "config.yml"
    config.write_text("\n".join(lines) + "\n")
    log_path = workdir / "registry.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
    scheme = "https" if tls is not None else "http"
    registry = Registry(f"{bind}:{port}", storage, process, log_path, scheme)
    context = ssl.create_default_context(cafile=str(tls[2])) if tls is not None else None
    ready = {200, 401} if users or token_server else {200}
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"registry exited with {process.returncode}: {registry.log()}")
        try:
            if _status(f"{scheme}://{registry.host}/v2/", context) in ready:
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


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A docker token server (the bearer flow of ACR, GHCR, Docker Hub) for distribution's token auth.

    ``GET /token?service&scope`` with basic credentials, or ``POST /token`` with an OAuth2
    ``refresh_token`` grant (docker's ``identitytoken``), returns an RS256 JWT whose ``x5c`` header
    carries a self-signed certificate the registry trusts (``rootcertbundle``). Keys and signatures come
    from the ``openssl`` CLI, so no crypto package is needed. ``requests`` records (method, grant, scope).
    """

    def __init__(self, workdir: Path, users: dict[str, str], refresh_tokens: set[str]) -> None:
        import http.server
        import threading

        workdir.mkdir(parents=True, exist_ok=True)
        self.key = workdir / "token-key.pem"
        self.cert = workdir / "token-cert.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
             "-out", str(self.cert), "-subj", "/CN=kaito-test-token", "-days", "1"],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True, capture_output=True
        ).stdout
        self.x5c = base64.b64encode(der).decode()
        self.users = users
        self.refresh_tokens = refresh_tokens
        self.requests: list[tuple[str, str, str]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _issue(self, query: dict[str, list[str]], form: dict[str, list[str]]) -> None:
                scope = (form.get("scope") or query.get("scope") or [""])[0]
                grant = (form.get("grant_type") or ["password"])[0]
                server.requests.append((self.command, grant, scope))
                if grant == "refresh_token":
                    ok = (form.get("refresh_token") or [""])[0] in server.refresh_tokens
                else:
                    ok = server._basic_ok(self.headers.get("Authorization"))
                if not ok:
                    self._send(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                    return
                token = server.sign(scope)
                key = "access_token" if grant == "refresh_token" else "token"
                self._send(200, {key: token, "expires_in": 300})

            def _send(self, status: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                self._issue(urllib.parse.parse_qs(parts.query), {})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                self._issue(urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query), form)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def _basic_ok(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return self.users.get(user) == password

    def sign(self, scope: str) -> str:
        """An RS256 JWT granting the actions of ``scope`` (``repository:<name>:<actions>``)."""
        access = []
        if scope.startswith("repository:"):
            _, name, actions = scope.split(":", 2)
            access.append({"type": "repository", "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {
            "iss": TOKEN_ISSUER, "sub": "kaito-test", "aud": TOKEN_SERVICE, "exp": now + 300,
            "nbf": now - 10, "iat": now, "jti": str(now) + scope, "access": access,
        }  # fmt: skip
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        return f"{signing_input}.{_b64url(signature)}"

    def stop(self) -> None:
        """Stop serving."""
        self._httpd.shutdown()
        self._httpd.server_close()
