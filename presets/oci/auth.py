"""Registry credentials from docker ``config.json`` files, and parsing of ``WWW-Authenticate`` challenges.

A ``kubernetes.io/dockerconfigjson`` Secret holds exactly such a file (key ``.dockerconfigjson``); the
Job mounts it and points ``--docker-config`` at it. Credentials are kept out of ``repr`` and messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .reference import DOCKER_HUB, DOCKER_HUB_API

_HUB_ALIASES = {DOCKER_HUB, DOCKER_HUB_API, "index.docker.io", "registry.hub.docker.com"}
_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


class CredentialsError(ValueError):
    """A docker config file is unreadable or malformed (its content is never echoed)."""


@dataclass(frozen=True)
class Credentials:
    """Username/password, or an identity (refresh) token, or a ready registry (bearer) token."""

    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)
    registry_token: str | None = field(default=None, repr=False)

    def basic_header(self) -> str | None:
        """``Basic ...`` for username/password credentials, else None."""
        if self.username is None or self.password is None:
            return None
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def normalize_host(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``http://host:5000/x`` -> ``host:5000``."""
    host = key.strip()
    for prefix in ("https://", "http://"):
        if host.startswith(prefix):
            host = host[len(prefix) :]
    host = host.split("/", 1)[0].lower()
    return DOCKER_HUB if host in _HUB_ALIASES else host


def config_paths(explicit: Iterable[str]) -> list[Path]:
    """Resolve ``--docker-config`` values (files or directories holding ``config.json``).

    With none given, ``$DOCKER_CONFIG/config.json`` then ``~/.docker/config.json`` (when present).
    """
    paths: list[Path] = []
    for item in explicit:
        path = Path(item)
        paths.append(path / "config.json" if path.is_dir() else path)
    if paths:
        return paths
    env_dir = os.environ.get("DOCKER_CONFIG")
    default = Path(env_dir) / "config.json" if env_dir else Path.home() / ".docker" / "config.json"
    return [default] if default.is_file() else []


def _entry_credentials(path: Path, host: str, entry: object) -> Credentials:
    if not isinstance(entry, dict):
        raise CredentialsError(f"{path}: auths entry for {host} is not an object")
    username = entry.get("username")
    password = entry.get("password")
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsError(f"{path}: 'auth' for {host} is not base64 of user:password") from None
        if ":" not in decoded:
            raise CredentialsError(f"{path}: 'auth' for {host} is not base64 of user:password")
        username, _, password = decoded.partition(":")
    identity = entry.get("identitytoken")
    registry_token = entry.get("registrytoken")
    return Credentials(
        username=username if isinstance(username, str) and username else None,
        password=password if isinstance(password, str) else None,
        identity_token=identity if isinstance(identity, str) and identity else None,
        registry_token=registry_token if isinstance(registry_token, str) and registry_token else None,
    )


def load_credentials(paths: Iterable[Path], registry: str) -> Credentials | None:
    """Credentials for ``registry`` from the first config file that has an ``auths`` entry for it.

    Credential helpers (``credsStore``/``credHelpers``) need binaries a pod does not have; they are
    ignored, so a config that only names a helper gives no credentials (the registry's 401 says so).
    """
    wanted = normalize_host(registry)
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CredentialsError(f"docker config {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            # json's message quotes no content beyond a position, so it is safe to repeat.
            raise CredentialsError(f"docker config {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CredentialsError(f"docker config {path} is not a JSON object")
        auths = data.get("auths", {})
        if not isinstance(auths, dict):
            raise CredentialsError(f"docker config {path}: 'auths' is not an object")
        for key, entry in auths.items():
            if normalize_host(str(key)) == wanted:
                return _entry_credentials(path, wanted, entry)
    return None


@dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header: scheme (lower-case) and its parameters."""

    scheme: str
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge:
    """Parse ``Bearer realm="...",service="...",scope="..."`` or ``Basic realm="..."``."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM_RE.finditer(rest)
    }
    return Challenge(scheme=scheme.lower(), params=params)
