"""Image references parsed as Docker does: the distribution reference grammar, Docker Hub defaults.

Upstream KAITO (v0.4.5+) checks ``tuning.input.image`` / ``tuning.output.image`` (and adapter images on
update) with ``reference.ParseDockerRef`` from ``github.com/distribution/reference`` v0.6. This module
is that function's behaviour in Python, so the webhook accepts and rejects the same strings:

* a first path component without ``.`` or ``:``, not ``localhost`` and all lower case is a Docker Hub
  namespace, and a single component is an official image: ``data-image:latest`` is
  ``docker.io/library/data-image:latest``; ``myregistry.io/data-image`` gets the tag ``latest``;
* the repository path must be lower case (``kaito.azurecr.io/INPUT:0.0.0`` is rejected: registries
  refuse such pushes and pulls);
* tags are ``[\\w][\\w.-]{0,127}``; digests are ``<algorithm>:<hex>`` with a known algorithm and length;
* the whole name is at most 255 characters, and a bare 64-hex string is refused (it reads like an ID).

The grammar is in distribution/reference's ``regexp.go`` and ``normalize.go``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
NAME_TOTAL_LENGTH_MAX = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN = rf"(?:{_DOMAIN_NAME}|{_IPV6})(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9a-fA-F]{32,}"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"

_REFERENCE = re.compile(rf"^({_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?$")
_IDENTIFIER = re.compile(r"^[a-f0-9]{64}$")
# go-digest's registered algorithms and their hex lengths (lower-case hex only).
_DIGEST_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}


class ImageReferenceError(ValueError):
    """The string is not an image reference Docker would accept; the message says why."""


@dataclass(frozen=True)
class ImageReference:
    """A normalised reference: ``domain/path`` plus a tag (``latest`` when neither tag nor digest)."""

    domain: str
    path: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        text = f"{self.domain}/{self.path}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def _split_docker_domain(name: str) -> tuple[str, str]:
    """distribution/reference ``splitDockerDomain``: (domain, remainder) with Docker Hub defaults."""
    maybe_domain, sep, maybe_remote = name.partition("/")
    if not sep:
        return DEFAULT_DOMAIN, OFFICIAL_REPO_PREFIX + name
    if maybe_domain == "localhost":
        domain, remote = maybe_domain, maybe_remote
    elif maybe_domain == LEGACY_DEFAULT_DOMAIN:
        domain, remote = DEFAULT_DOMAIN, maybe_remote
    elif any(c in maybe_domain for c in ".:"):
        domain, remote = maybe_domain, maybe_remote
    elif maybe_domain.lower() != maybe_domain:
        # Upper-case namespaces are not allowed, so an upper-case first element must be a domain.
        domain, remote = maybe_domain, maybe_remote
    else:
        domain, remote = DEFAULT_DOMAIN, name
    if domain == DEFAULT_DOMAIN and "/" not in remote:
        remote = OFFICIAL_REPO_PREFIX + remote
    return domain, remote


def _check_digest(digest: str) -> None:
    algorithm, _, hex_part = digest.partition(":")
    length = _DIGEST_HEX_LENGTH.get(algorithm)
    if length is None:
        raise ImageReferenceError(f"unsupported digest algorithm {algorithm!r}; use sha256")
    if len(hex_part) != length or not re.fullmatch(r"[a-f0-9]+", hex_part):
        raise ImageReferenceError(f"invalid {algorithm} digest: expected {length} lower-case hex characters")


def parse_docker_ref(text: str) -> ImageReference:
    """Parse ``text`` as ``reference.ParseDockerRef`` does, or raise :class:`ImageReferenceError`."""
    if _IDENTIFIER.match(text):
        raise ImageReferenceError("a 64-character hexadecimal string is an image ID, not a repository name")
    domain, remainder = _split_docker_domain(text)
    tag_sep = remainder.find(":")
    remote = remainder[:tag_sep] if tag_sep > -1 else remainder
    if remote.lower() != remote:
        raise ImageReferenceError(f"repository name ({remote}) must be lowercase")
    full = f"{domain}/{remainder}"
    match = _REFERENCE.match(full)
    if match is None:
        if not text:
            raise ImageReferenceError("repository name must have at least one component")
        if _REFERENCE.match(full.lower()):
            raise ImageReferenceError("repository name must be lowercase")
        raise ImageReferenceError("invalid reference format")
    name, tag, digest = match.group(1), match.group(2), match.group(3)
    if len(name) > NAME_TOTAL_LENGTH_MAX:
        raise ImageReferenceError(f"repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters")
    if digest is not None:
        _check_digest(digest)
    # The domain as matched (the regexp is greedy on the first component only when it holds a domain).
    path = name[len(domain) + 1 :]
    if digest is None and tag is None:
        tag = "latest"
    return ImageReference(domain=domain, path=path, tag=tag, digest=digest)
