"""A small REST helper over kubernetes_asyncio's ApiClient: raw paths, objects as plain dicts.

Every request goes through :meth:`KubeClient.request` (or :meth:`KubeClient.open_stream` for watches),
which counts ``rest_client_requests_total{code,method,host}`` and turns a non-2xx answer into a typed
:class:`ApiError`. Objects are ``dict[str, Any]`` exactly as the apiserver sent them; callers that want
to change one must copy it first (:func:`deepcopy`), since informer caches hand out shared references.
"""

from __future__ import annotations

import builtins
import copy
import json
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote, urlparse

import aiohttp
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.client.exceptions import ApiException

from kaito.runtime.metrics import REST_CLIENT_REQUESTS

Obj = dict[str, Any]
QueryValue = str | int | bool
PatchType = Literal["merge", "json", "strategic", "apply"]

PATCH_CONTENT_TYPES: dict[str, str] = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "apply": "application/apply-patch+yaml",
}


@dataclass(frozen=True)
class Resource:
    """A REST resource: API group (``""`` for core), version, plural, scope, and kind (for owner refs)."""

    group: str
    version: str
    plural: str
    namespaced: bool
    kind: str = ""

    @property
    def api_version(self) -> str:
        """``group/version`` (or just ``v1`` for the core group)."""
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        """The REST path; ``namespace=None`` on a namespaced resource means all namespaces."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{quote(name, safe='')}"
            if subresource:
                base += f"/{subresource}"
        return base

    def __str__(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


NAMESPACES = Resource("", "v1", "namespaces", False, "Namespace")
NODES = Resource("", "v1", "nodes", False, "Node")
PODS = Resource("", "v1", "pods", True, "Pod")
SERVICES = Resource("", "v1", "services", True, "Service")
CONFIGMAPS = Resource("", "v1", "configmaps", True, "ConfigMap")
SECRETS = Resource("", "v1", "secrets", True, "Secret")
EVENTS = Resource("", "v1", "events", True, "Event")
SERVICE_ACCOUNTS = Resource("", "v1", "serviceaccounts", True, "ServiceAccount")
PERSISTENT_VOLUME_CLAIMS = Resource("", "v1", "persistentvolumeclaims", True, "PersistentVolumeClaim")
DEPLOYMENTS = Resource("apps", "v1", "deployments", True, "Deployment")
STATEFULSETS = Resource("apps", "v1", "statefulsets", True, "StatefulSet")
CONTROLLER_REVISIONS = Resource("apps", "v1", "controllerrevisions", True, "ControllerRevision")
JOBS = Resource("batch", "v1", "jobs", True, "Job")
LEASES = Resource("coordination.k8s.io", "v1", "leases", True, "Lease")
CUSTOM_RESOURCE_DEFINITIONS = Resource(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions", False, "CustomResourceDefinition"
)


class ApiError(Exception):
    """A non-2xx answer from the apiserver (or an ERROR event on a watch)."""

    def __init__(self, status: int, reason: str = "", message: str = "", body: Obj | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body

    @classmethod
    def from_status(cls, status: int, payload: bytes | str | Obj | None) -> ApiError:
        """Build from an HTTP status and a ``Status`` object (raw or parsed)."""
        body: Obj | None = None
        if isinstance(payload, dict):
            body = payload
        elif payload:
            try:
                parsed = json.loads(payload)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                body = parsed
        reason = str(body.get("reason", "")) if body else ""
        message = str(body.get("message", "")) if body else (str(payload)[:500] if payload else "")
        code = int(body.get("code", status)) if body and body.get("code") else status
        return cls(code, reason, message, body)

    @property
    def not_found(self) -> bool:
        """404."""
        return self.status == 404

    @property
    def conflict(self) -> bool:
        """409 Conflict (stale resourceVersion), not AlreadyExists."""
        return self.status == 409 and self.reason != "AlreadyExists"

    @property
    def already_exists(self) -> bool:
        """409 AlreadyExists on create."""
        return self.status == 409 and self.reason == "AlreadyExists"

    @property
    def expired(self) -> bool:
        """410 Gone / Expired: the resourceVersion or continue token is too old."""
        return self.status == 410 or self.reason in ("Expired", "Gone")

    @property
    def retryable(self) -> bool:
        """429 or a 5xx: worth retrying after a backoff."""
        return self.status == 429 or self.status >= 500


def deepcopy(obj: Obj) -> Obj:
    """Copy an object before changing it (cached objects are shared and must never be mutated)."""
    return copy.deepcopy(obj)


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name`` for namespaced objects, ``name`` for cluster-scoped ones (client-go's key)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    name = meta.get("name", "")
    return f"{ns}/{name}" if ns else str(name)


def split_key(key: str) -> tuple[str | None, str]:
    """Inverse of :func:`object_key`: ``(namespace or None, name)``."""
    ns, sep, name = key.partition("/")
    return (ns, name) if sep else (None, ns)


def resource_version(obj: Mapping[str, Any]) -> str:
    """``metadata.resourceVersion`` (``""`` if absent)."""
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))


def unix_time(value: Any) -> float | None:
    """A Kubernetes timestamp (RFC 3339, ``...Z``) as Unix time; None when absent or malformed."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def owner_reference(owner: Mapping[str, Any], *, controller: bool = True, block: bool = True) -> Obj:
    """An ownerReference pointing at ``owner`` (which must carry apiVersion, kind, name and uid)."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": controller,
        "blockOwnerDeletion": block,
    }


def _query(params: Mapping[str, QueryValue | None]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for k, v in params.items():
        if v is None:
            continue
        if isinstance(v, bool):
            out.append((k, "true" if v else "false"))
        else:
            out.append((k, str(v)))
    return out


class KubeClient:
    """Async REST helper on a kubernetes_asyncio ``ApiClient`` (which owns auth, TLS and the session).

    ``request_timeout`` bounds every non-watch call (the library's default is no timeout at all).
    """

    def __init__(self, api_client: ApiClient, *, request_timeout: float = 60.0) -> None:
        self.api_client = api_client
        self.request_timeout = request_timeout
        host = str(api_client.configuration.host)
        self.host = urlparse(host).netloc or host

    @property
    def configuration(self) -> Configuration:
        """The underlying client configuration."""
        return api_client_configuration(self.api_client)

    async def _send(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]] | None,
        body: Any,
        content_type: str,
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        try:
            resp: aiohttp.ClientResponse = await self.api_client.call_api(
                path,
                method,
                query_params=list(query or []),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout,
            )
        except ApiException as e:  # the library raises these only for request-building problems
            REST_CLIENT_REQUESTS.labels("<error>", method, self.host).inc()
            raise ApiError(int(e.status or 0), str(e.reason or ""), str(e.body or "")) from e
        except BaseException:
            REST_CLIENT_REQUESTS.labels("<error>", method, self.host).inc()
            raise
        REST_CLIENT_REQUESTS.labels(str(resp.status), method, self.host).inc()
        return resp

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, QueryValue | None] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Obj:
        """Send one request and return the decoded JSON answer; raise :class:`ApiError` on non-2xx."""
        ct = aiohttp.ClientTimeout(total=timeout if timeout is not None else self.request_timeout)
        resp = await self._send(method, path, _query(query or {}), body, content_type, ct)
        try:
            data = await resp.read()
        finally:
            resp.release()
        if not 200 <= resp.status <= 299:
            raise ApiError.from_status(resp.status, data)
        if not data:
            return {}
        parsed = json.loads(data)
        return parsed if isinstance(parsed, dict) else {"items": parsed}

    async def open_stream(
        self,
        path: str,
        *,
        query: Mapping[str, QueryValue | None] | None = None,
        connect_timeout: float = 30.0,
    ) -> aiohttp.ClientResponse:
        """Start a streaming GET (a watch) and return the open response; the caller must close it.

        Only connecting is bounded here; the caller bounds reads (an inactivity timeout).
        """
        ct = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_connect=connect_timeout)
        resp = await self._send("GET", path, _query(query or {}), None, "application/json", ct)
        if not 200 <= resp.status <= 299:
            try:
                data = await resp.read()
            finally:
                resp.close()
            raise ApiError.from_status(resp.status, data)
        return resp

    # ------------------------------------------------------------------------------- typed helpers

    async def get(self, res: Resource, name: str, namespace: str | None = None) -> Obj:
        """GET one object."""
        return await self.request("GET", res.path(namespace, name))

    async def get_or_none(self, res: Resource, name: str, namespace: str | None = None) -> Obj | None:
        """GET one object, or ``None`` if it does not exist."""
        try:
            return await self.get(res, name, namespace)
        except ApiError as e:
            if e.not_found:
                return None
            raise

    async def list(
        self,
        res: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int | None = None,
        continue_: str | None = None,
        resource_version: str | None = None,
    ) -> Obj:
        """One LIST call (a page when ``limit`` is set); returns the List object."""
        return await self.request(
            "GET",
            res.path(namespace),
            query={
                "labelSelector": label_selector,
                "fieldSelector": field_selector,
                "limit": limit,
                "continue": continue_,
                "resourceVersion": resource_version,
            },
        )

    async def list_all(
        self,
        res: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page_size: int = 500,
    ) -> builtins.list[Obj]:
        """All items across pages (a consistent read)."""
        items: builtins.list[Obj] = []
        cont: str | None = None
        while True:
            page = await self.list(
                res,
                namespace,
                label_selector=label_selector,
                field_selector=field_selector,
                limit=page_size,
                continue_=cont,
            )
            items.extend(page.get("items") or [])
            cont = (page.get("metadata") or {}).get("continue") or None
            if not cont:
                return items

    async def create(self, res: Resource, body: Obj, namespace: str | None = None) -> Obj:
        """POST a new object (namespace defaults to the body's)."""
        ns = namespace or (body.get("metadata") or {}).get("namespace")
        return await self.request("POST", res.path(ns), body=body)

    async def replace(self, res: Resource, body: Obj, *, subresource: str | None = None) -> Obj:
        """PUT the object (optimistic concurrency on ``metadata.resourceVersion`` if set)."""
        meta = body["metadata"]
        return await self.request(
            "PUT", res.path(meta.get("namespace"), meta["name"], subresource), body=body
        )

    async def patch(
        self,
        res: Resource,
        name: str,
        patch: Obj | builtins.list[Obj],
        namespace: str | None = None,
        *,
        patch_type: PatchType = "merge",
        subresource: str | None = None,
        field_manager: str | None = None,
        force: bool | None = None,
    ) -> Obj:
        """PATCH with an explicit content type (merge patch by default)."""
        return await self.request(
            "PATCH",
            res.path(namespace, name, subresource),
            body=patch,
            content_type=PATCH_CONTENT_TYPES[patch_type],
            query={"fieldManager": field_manager, "force": force},
        )

    async def merge_patch_status(
        self, res: Resource, name: str, status: Obj, namespace: str | None = None
    ) -> Obj:
        """Merge-patch ``{"status": status}`` through the status subresource."""
        return await self.patch(res, name, {"status": status}, namespace, subresource="status")

    async def delete(
        self,
        res: Resource,
        name: str,
        namespace: str | None = None,
        *,
        propagation_policy: str | None = "Background",
        preconditions: Obj | None = None,
        ignore_not_found: bool = True,
    ) -> Obj | None:
        """DELETE an object; ``None`` if it was already gone (and ``ignore_not_found``)."""
        body: Obj = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if propagation_policy:
            body["propagationPolicy"] = propagation_policy
        if preconditions:
            body["preconditions"] = preconditions
        try:
            return await self.request("DELETE", res.path(namespace, name), body=body)
        except ApiError as e:
            if e.not_found and ignore_not_found:
                return None
            raise


def api_client_configuration(api_client: ApiClient) -> Configuration:
    """The ``Configuration`` an ApiClient was built with."""
    cfg: Configuration = api_client.configuration
    return cfg


async def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> ApiClient:
    """An ApiClient from a kubeconfig file, else the in-cluster service account."""
    from kubernetes_asyncio import config

    cfg = Configuration()
    if kubeconfig:
        await config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            await config.load_kube_config(context=context, client_configuration=cfg)
    return api_client_for(cfg)


def api_client_for(cfg: Configuration) -> ApiClient:
    """An ApiClient on ``cfg`` that looks up proxy settings once, not on every request.

    kubernetes_asyncio opens its aiohttp session with ``trust_env=True``, which makes aiohttp read
    ``~/.netrc`` and the proxy variables in a worker thread for every request -- a thread hop per call
    that cost ~10% of the controller's CPU at 1,000 workspaces. The apiserver's proxy (``HTTPS_PROXY``
    / ``NO_PROXY``, as client-go honours them) is resolved here once; netrc credentials never applied
    (the client authenticates with a token or a certificate).
    """
    host = urlparse(str(cfg.host)).hostname or ""
    if not cfg.proxy and host and not urllib.request.proxy_bypass(host):
        scheme = urlparse(str(cfg.host)).scheme or "https"
        proxy = urllib.request.getproxies().get(scheme)
        if proxy:
            cfg.proxy = proxy
    api = ApiClient(configuration=cfg)
    session = getattr(api.rest_client, "pool_manager", None)
    if session is not None and hasattr(session, "_trust_env"):
        session._trust_env = False
    return api
