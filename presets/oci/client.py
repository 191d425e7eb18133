"""A small OCI distribution-spec client on the standard library (urllib), for pods without extra packages.

Implements what pushing and pulling one artifact needs: ``/v2/`` auth challenges (Basic, and Bearer
tokens from the realm with basic credentials or an identity token), blob existence checks, monolithic
blob uploads (POST then PUT ``?digest=``), manifest PUT/GET, and blob GET with digest verification.
Authorization headers are never forwarded across redirects (blob storage redirects carry their own
signature) and never appear in messages; every error and log message goes through
:func:`.redaction.redact` (URL userinfo, signatures, tokens). Credentials (Basic, or an identity
refresh token) go to a token realm only over https, unless the client was asked for plain http.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import IO, Any

from .auth import Credentials, parse_challenge
from .redaction import redact
from .reference import Reference

log = logging.getLogger("kaito_oci")

CHUNK = 1 << 20
USER_AGENT = "kaito-oci/0.1"


class RegistryError(RuntimeError):
    """A registry request failed; ``status`` is the HTTP status (0 for transport errors)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(redact(message))
        self.status = status


class AuthError(RegistryError):
    """The registry refused the credentials (401/403)."""


class NotFoundError(RegistryError):
    """The manifest or blob does not exist (404)."""


@dataclass
class Response:
    """Status, headers and body of a finished request (body read unless streamed)."""

    status: int
    headers: Message
    body: bytes
    url: str


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Report redirects instead of following them: the client decides what follows (auth dropped)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


BodyFactory = Callable[[], "bytes | IO[bytes] | None"]


class RegistryClient:
    """Talk to one registry for one repository with optional credentials.

    ``plain_http`` selects ``http://`` (local or in-cluster registries without TLS); ``retries``
    transport errors, 5xx and 429 are retried after ``backoff`` * 1, 2, 4, ... seconds (at most 16).
    """

    def __init__(
        self,
        ref: Reference,
        credentials: Credentials | None,
        *,
        plain_http: bool = False,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 1.0,
    ) -> None:
        self.ref = ref
        self.credentials = credentials
        self.plain_http = plain_http
        self.base = f"{'http' if plain_http else 'https'}://{ref.api_host}"
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._auth_header: str | None = None
        self._opener = urllib.request.build_opener(_NoRedirect)

    # --- low level -----------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base + path

    def _once(
        self, method: str, url: str, headers: dict[str, str], body: bytes | IO[bytes] | None, auth: bool
    ) -> tuple[int, Message, Any]:
        req = urllib.request.Request(url, data=body, method=method)
        req.add_header("User-Agent", USER_AGENT)
        for key, value in headers.items():
            req.add_header(key, value)
        if auth and self._auth_header:
            # Unredirected: never sent to the host a redirect points at.
            req.add_unredirected_header("Authorization", self._auth_header)
        try:
            resp = self._opener.open(req, timeout=self.timeout)
            return resp.status, resp.headers, resp
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err

    def request(
        self,
        method: str,
        path: str,
        *,
        scope: str,
        headers: dict[str, str] | None = None,
        body: BodyFactory | None = None,
        ok: tuple[int, ...] = (200,),
        stream_to: Callable[[IO[bytes]], None] | None = None,
        what: str = "",
    ) -> Response:
        """Send a request, answering one auth challenge, following redirects without auth, retrying
        transport errors and 5xx/429 with backoff. ``stream_to`` consumes a successful body instead
        of reading it into memory. Raises :class:`RegistryError` subclasses for unexpected statuses.
        """
        hdrs = dict(headers or {})
        url = self._url(path)
        attempt = 0
        challenged = False
        redirects = 0
        auth = True
        while True:
            payload = body() if body is not None else None
            try:
                status, resp_headers, stream = self._once(method, url, hdrs, payload, auth)
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                if attempt >= self.retries:
                    raise RegistryError(f"{what or method} {self._safe(url)}: {reason}") from None
                attempt += 1
                self._backoff(attempt, f"{what or method}: {reason}")
                continue
            finally:
                if hasattr(payload, "close"):
                    payload.close()  # type: ignore[union-attr]
            with stream:
                if status == 401 and not challenged and auth:
                    challenged = True
                    stream.read()
                    self._authenticate(resp_headers.get("WWW-Authenticate", ""), scope)
                    continue
                if status in (301, 302, 303, 307, 308) and redirects < 5:
                    redirects += 1
                    location = resp_headers.get("Location", "")
                    new_url = urllib.parse.urljoin(url, location)
                    # Another host (e.g. signed blob storage) must not see the registry token.
                    auth = urllib.parse.urlsplit(new_url).netloc == urllib.parse.urlsplit(url).netloc
                    url = new_url
                    if status == 303:
                        method, body = "GET", None
                    stream.read()
                    continue
                if (status >= 500 or status == 429) and attempt < self.retries:
                    attempt += 1
                    stream.read()
                    self._backoff(attempt, f"{what or method}: HTTP {status}")
                    continue
                if status in ok:
                    if stream_to is not None:
                        stream_to(stream)
                        return Response(status, resp_headers, b"", url)
                    return Response(status, resp_headers, stream.read(), url)
                detail = self._error_detail(stream.read())
                message = f"{what or method} {self._safe(url)}: HTTP {status}{detail}"
                if status in (401, 403):
                    raise AuthError(message + self._auth_hint(), status)
                if status == 404:
                    raise NotFoundError(message, status)
                raise RegistryError(message, status)

    @staticmethod
    def _safe(url: str) -> str:
        # Upload locations and signed redirects carry state/signatures in the query; keep them out,
        # and the userinfo a Location or realm may carry.
        parts = urllib.parse.urlsplit(url)
        return redact(urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))

    @staticmethod
    def _error_detail(body: bytes) -> str:
        try:
            errors = json.loads(body.decode("utf-8")).get("errors") or []
            texts = [f"{e.get('code', '')}: {e.get('message', '')}" for e in errors if isinstance(e, dict)]
            return f" ({'; '.join(texts)})" if texts else ""
        except (ValueError, AttributeError, UnicodeDecodeError):
            return ""

    def _auth_hint(self) -> str:
        if self.credentials is None:
            return f" - no credentials for {self.ref.registry} in the docker config (--docker-config)"
        return f" - the registry rejected the credentials for {self.ref.registry}"

    def _backoff(self, attempt: int, why: str) -> None:
        delay = min(self.backoff * 2.0 ** (attempt - 1), 16.0)
        log.warning("retrying in %.0fs (attempt %d/%d): %s", delay, attempt, self.retries, redact(why))
        time.sleep(delay)  # retry backoff against a remote service, not test synchronisation

    def _authenticate(self, header: str, scope: str) -> None:
        challenge = parse_challenge(header)
        creds = self.credentials
        if challenge.scheme == "basic":
            basic = creds.basic_header() if creds else None
            if basic is None:
                raise AuthError(f"{self.ref.registry} requires basic auth{self._auth_hint()}", 401)
            self._auth_header = basic
            return
        if challenge.scheme != "bearer":
            raise AuthError(f"{self.ref.registry}: unsupported auth scheme {challenge.scheme!r}", 401)
        if creds is not None and creds.registry_token:
            self._auth_header = f"Bearer {creds.registry_token}"
            return
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthError(f"{self.ref.registry}: bearer challenge without a realm", 401)
        service = challenge.params.get("service", "")
        self._auth_header = f"Bearer {self._fetch_token(realm, service, scope)}"

    def _fetch_token(self, realm: str, service: str, scope: str) -> str:
        creds = self.credentials
        sends_credentials = creds is not None and (creds.identity_token or creds.basic_header())
        if sends_credentials and urllib.parse.urlsplit(realm).scheme != "https" and not self.plain_http:
            # The registry names the realm; a plain-http one would expose the password or the
            # refresh token to anyone on the path. Only a registry reached over plain http on purpose
            # (--plain-http: a local or in-cluster one) may use one.
            raise AuthError(
                f"{self.ref.registry}: refusing to send credentials to the token realm {self._safe(realm)} "
                "over plain http (use a https realm, or --plain-http for a registry without TLS)",
                401,
            )
        if creds is not None and creds.identity_token:
            # OAuth2 refresh-token grant (what docker does with an identitytoken, e.g. ACR).
            form = urllib.parse.urlencode(
                {
                    "grant_type": "refresh_token",
                    "service": service,
                    "scope": scope,
                    "client_id": "kaito-oci",
                    "refresh_token": creds.identity_token,
                }
            ).encode()
            req = urllib.request.Request(realm, data=form, method="POST")
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        else:
            query = urllib.parse.urlencode({"service": service, "scope": scope})
            req = urllib.request.Request(f"{realm}{'&' if '?' in realm else '?'}{query}", method="GET")
            basic = creds.basic_header() if creds else None
            if basic:
                req.add_unredirected_header("Authorization", basic)
        req.add_header("User-Agent", USER_AGENT)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            raise AuthError(
                f"token request to {self._safe(realm)} failed: HTTP {err.code}{self._auth_hint()}", err.code
            ) from None
        except (urllib.error.URLError, ValueError) as exc:
            raise RegistryError(f"token request to {self._safe(realm)} failed: {exc}") from None
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthError(f"token response from {self._safe(realm)} has no token", 401)
        return token

    # --- distribution API ----------------------------------------------------------------------

    @property
    def _repo(self) -> str:
        return f"/v2/{self.ref.repository}"

    def blob_exists(self, digest: str, scope: str) -> bool:
        """HEAD the blob; True when the registry already has it (its upload can be skipped)."""
        try:
            self.request("HEAD", f"{self._repo}/blobs/{digest}", scope=scope, what="check blob")
        except NotFoundError:
            return False
        return True

    def upload_blob(self, path: Path, digest: str, size: int) -> None:
        """Monolithic upload: POST an upload session, then PUT the whole blob with ``?digest=``."""
        scope = f"repository:{self.ref.repository}:pull,push"
        if self.blob_exists(digest, scope):
            log.info("blob %s already present", digest)
            return
        started = self.request(
            "POST",
            f"{self._repo}/blobs/uploads/",
            scope=scope,
            ok=(202,),
            what="start upload",
            headers={"Content-Length": "0"},
            body=lambda: b"",
        )
        location = started.headers.get("Location")
        if not location:
            raise RegistryError("registry answered the upload POST without a Location", started.status)
        target = urllib.parse.urljoin(started.url, location)
        target += ("&" if "?" in target else "?") + urllib.parse.urlencode({"digest": digest})
        self.request(
            "PUT",
            target,
            scope=scope,
            ok=(201, 204),
            what="upload blob",
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            body=lambda: path.open("rb"),
        )

    def check_push(self) -> None:
        """Prove the credentials may push to the repository, writing nothing: start a blob upload (the
        first request a push makes) and cancel it. Raises :class:`AuthError` when the registry refuses.

        A token's granted scope alone proves nothing (token servers grant less than asked without an
        error); the upload POST is where a registry enforces push rights.
        """
        started = self.request(
            "POST",
            f"{self._repo}/blobs/uploads/",
            scope=f"repository:{self.ref.repository}:pull,push",
            ok=(202,),
            what="start upload",
            headers={"Content-Length": "0"},
            body=lambda: b"",
        )
        location = started.headers.get("Location")
        if location:
            try:  # an unfinished upload expires anyway; cancelling is only tidiness
                self.request(
                    "DELETE",
                    urllib.parse.urljoin(started.url, location),
                    scope=f"repository:{self.ref.repository}:pull,push",
                    ok=(200, 202, 204, 404),
                    what="cancel upload",
                )
            except RegistryError as exc:
                log.info("could not cancel the probe upload: %s", exc)

    def put_manifest(self, manifest: bytes, media_type: str, tag: str) -> str:
        """PUT the manifest under ``tag``; return its digest (what the registry computed, checked)."""
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        resp = self.request(
            "PUT",
            f"{self._repo}/manifests/{tag}",
            scope=f"repository:{self.ref.repository}:pull,push",
            ok=(201, 200),
            what="push manifest",
            headers={"Content-Type": media_type, "Content-Length": str(len(manifest))},
            body=lambda: manifest,
        )
        returned = resp.headers.get("Docker-Content-Digest")
        if returned and returned != digest:
            raise RegistryError(f"registry stored the manifest as {returned}, expected {digest}")
        return digest

    def get_manifest(self, target: str, accept: list[str]) -> tuple[bytes, str]:
        """GET a manifest by tag or digest; returns (bytes, media type). Digest pins are verified."""
        resp = self.request(
            "GET",
            f"{self._repo}/manifests/{target}",
            scope=f"repository:{self.ref.repository}:pull",
            headers={"Accept": ", ".join(accept)},
            what="fetch manifest",
        )
        if target.startswith("sha256:"):
            actual = "sha256:" + hashlib.sha256(resp.body).hexdigest()
            if actual != target:
                raise RegistryError(f"manifest digest mismatch: asked {target}, got {actual}")
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        return resp.body, media_type

    def download_blob(self, digest: str, dest: Path) -> None:
        """GET the blob into ``dest`` while hashing it; a digest mismatch deletes the file and fails."""
        if not digest.startswith("sha256:"):
            raise RegistryError(f"unsupported digest algorithm in {digest}")
        hasher = hashlib.sha256()

        def consume(stream: IO[bytes]) -> None:
            with dest.open("wb") as out:
                while chunk := stream.read(CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)

        self.request(
            "GET",
            f"{self._repo}/blobs/{digest}",
            scope=f"repository:{self.ref.repository}:pull",
            stream_to=consume,
            what="fetch blob",
        )
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest:
            dest.unlink(missing_ok=True)
            raise RegistryError(f"blob digest mismatch: expected {digest}, got {actual}")
