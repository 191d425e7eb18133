"""Image references (``registry/repository:tag`` or ``...@sha256:...``) as docker and oras read them."""

from __future__ import annotations

import re
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

# OCI distribution-spec: repository path components and tags.
_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")


class ReferenceError(ValueError):
    """The image reference cannot be parsed."""


@dataclass(frozen=True)
class Reference:
    """A parsed image reference.

    ``registry`` is the host[:port] as written (``docker.io`` for Docker Hub), ``repository`` the path
    inside it, ``tag`` and/or ``digest`` what to fetch. ``api_host`` is where the registry API lives.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """Host[:port] serving ``/v2/`` (Docker Hub's API is not on docker.io itself)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def target(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag (``latest`` if none)."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> Reference:
    """Parse ``[registry/]repository[:tag][@digest]``; a first component without ``.``/``:`` is Docker Hub."""
    raw = text.strip()
    if not raw or "://" in raw:
        raise ReferenceError(f"invalid image reference {text!r}: expected registry/repository:tag")
    name, _, digest = raw.partition("@")
    if digest and not _DIGEST_RE.match(digest):
        raise ReferenceError(f"invalid image reference {text!r}: digest must be sha256:<64 hex>")
    tag: str | None = None
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise ReferenceError(f"invalid image reference {text!r}: bad tag {tag!r}")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = DOCKER_HUB, name
        if "/" not in repository:
            repository = f"library/{repository}"
    if not _REPO_RE.match(repository):
        raise ReferenceError(
            f"invalid image reference {text!r}: repository {repository!r} must be lowercase "
            "letters, digits and separators"
        )
    return Reference(registry=registry, repository=repository, tag=tag, digest=digest or None)
