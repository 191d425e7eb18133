"""A fake Azure Resource Manager for the AKS agentPools API, served over HTTPS on loopback.

It stands in for ARM because ARM cannot be reached from tests (no network, no subscription). It speaks
the wire protocol the real azure-mgmt-containerservice SDK uses, so the provisioner's Azure code runs
unchanged against it: PUT/GET/DELETE/LIST on
``/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.ContainerService/managedClusters/{cluster}/agentPools[/{name}]``
with a required ``api-version``, bearer-token auth, long-running operations announced through
``Azure-AsyncOperation`` and ``Location`` headers that go InProgress -> Succeeded/Failed over a
configurable number of polls, ``provisioningState`` in the pool body, ARM's error shape
(``{"error": {"code", "message"}}``) and injectable failures (quota, SKU, capacity, conflict...).

HTTPS because azure-core refuses to send a bearer token over plain HTTP; the certificate is self-signed
for 127.0.0.1/localhost and written to ``ca_file`` for the client to trust.

Every request is recorded (:attr:`FakeArm.requests`) so tests can assert the exact PUT body.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import itertools
import json
import re
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

_POOL_RE = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.ContainerService/"
    r"managedClusters/(?P<cluster>[^/]+)/agentPools(?:/(?P<name>[^/]+))?/?$",
    re.IGNORECASE,
)
_OPERATION_RE = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.ContainerService/locations/(?P<loc>[^/]+)/"
    r"(?P<kind>operations|operationresults)/(?P<op>[^/]+)$",
    re.IGNORECASE,
)

PoolHook = Callable[[str, dict[str, Any]], Awaitable[None]]

IN_PROGRESS_CREATE_MESSAGE = (
    "Operation is not allowed because there's an in progress create node pool operation. "
    "Please wait for it to finish before starting a new operation."
)


@dataclass(frozen=True)
class ArmError:
    """An ARM error reply: HTTP status plus ARM's ``{"error": {"code", "message"}}`` body."""

    status: int
    code: str
    message: str
    details: tuple[Mapping[str, str], ...] = ()

    def body(self) -> dict[str, Any]:
        """ARM's error envelope."""
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            err["details"] = [dict(d) for d in self.details]
        return {"error": err}


# Canned errors in the shapes AKS returns (illustrative public AKS behaviour).
QUOTA_EXCEEDED = ArmError(
    409,
    "QuotaExceeded",
    "Operation could not be completed as it results in exceeding approved standardNCSv3Family Cores quota. "
    "Additional details - Deployment Model: Resource Manager, Location: eastus, Current Limit: 0, "
    "Current Usage: 0, Additional Required: 12, (Minimum) New Limit Required: 12.",
)
QUOTA_OPERATION_NOT_ALLOWED = ArmError(
    400,
    "OperationNotAllowed",
    "Operation could not be completed as it results in exceeding approved Total Regional Cores quota. "
    "Location: westus2, Current Limit: 10, Current Usage: 8, Additional Required: 24.",
)
SKU_NOT_AVAILABLE = ArmError(
    400,
    "SkuNotAvailable",
    "The requested VM size for resource 'Following SKUs have failed for Capacity Restrictions: "
    "Standard_NC96ads_A100_v4' is currently not available in location 'eastus'. Please try another size "
    "or deploy to a different location or different zone.",
)
ALLOCATION_FAILED = ArmError(
    200,  # arrives as the failed status of the long-running operation
    "ReconcileVMSSAgentPoolFailed",
    'Code="AllocationFailed" Message="Allocation failed. We do not have sufficient capacity for the '
    'requested VM size in this region."',
)
ZONAL_ALLOCATION_FAILED = ArmError(
    409,
    "ZonalAllocationFailed",
    "Allocation failed. We do not have sufficient capacity for the requested VM size in this zone.",
)
ANOTHER_OPERATION_IN_PROGRESS = ArmError(
    409,
    "OperationNotAllowed",
    "Another operation (Updating) is in progress on the managed cluster; please retry after it completes.",
)
CONFLICT = ArmError(409, "Conflict", "Another operation is in progress on the agent pool.")


@dataclass
class RecordedRequest:
    """One request the fake received (the Authorization header is reduced to whether it was present)."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    has_bearer: bool


@dataclass
class _Operation:
    op_id: str
    kind: str  # "create" | "update" | "delete"
    key: tuple[str, str, str, str]
    polls_left: int
    error: ArmError | None = None
    status: str = "InProgress"


@dataclass
class _Injection:
    op: str  # "put" | "get" | "delete" | "list" | "operation"
    pool: str | None
    error: ArmError
    times: int


@dataclass
class FakeArm:
    """State and behaviour of the fake: pools, operations, injected errors, recorded requests."""

    polls: int = 1
    """InProgress answers an operation gives before it finishes (0 = done on the first poll)."""
    retry_after: int = 0
    """Retry-After seconds sent with long-running operations (keeps SDK polling fast in tests)."""
    location: str = "eastus"
    token: str | None = None
    """When set, requests must carry exactly this bearer token."""
    page_size: int = 0
    """When > 0, LIST answers this many pools per page with a nextLink."""
    hooks: list[PoolHook] = field(default_factory=list)
    """Awaited with (``"ready"`` | ``"deleted"``, pool document) when an operation finishes a pool;
    e.g. :class:`test.fake_arm.nodes.AksNodeSimulator` registers the pool's Node like AKS would."""
    hook_errors: list[Exception] = field(default_factory=list)
    lro_headers: str = "both"
    """Which polling headers operations announce: ``both`` (as AKS does), ``async`` or ``location``."""
    pools: dict[tuple[str, str, str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    _operations: dict[str, _Operation] = field(default_factory=dict)
    _injections: list[_Injection] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # --- test controls -------------------------------------------------------------------------

    def inject(self, op: str, error: ArmError, *, pool: str | None = None, times: int = 1) -> None:
        """Make the next ``times`` matching calls fail with ``error``.

        ``op``: ``put`` (the PUT itself answers the error), ``operation`` (the PUT is accepted and its
        long-running operation ends Failed with the error), ``get``, ``delete`` or ``list``.
        ``pool``: only calls on that pool (None: any pool).
        """
        if op not in {"put", "get", "delete", "list", "operation"}:
            raise ValueError(f"unknown op {op!r}")
        self._injections.append(_Injection(op, pool, error, times))

    def requests_for(self, method: str, pool: str | None = None) -> list[RecordedRequest]:
        """Recorded requests with ``method`` (and on ``pool``'s URL when given)."""
        out = []
        for r in self.requests:
            if r.method != method:
                continue
            m = _POOL_RE.match(r.path)
            if pool is None or (m and (m["name"] or "").lower() == pool.lower()):
                out.append(r)
        return out

    def add_pool(
        self,
        sub: str,
        rg: str,
        cluster: str,
        name: str,
        properties: Mapping[str, Any],
        *,
        state: str = "Succeeded",
    ) -> dict[str, Any]:
        """Put a pool straight into the store (e.g. a user's own pool, or one stuck ``Creating``)."""
        pool = self._pool_doc(sub, rg, cluster, name, dict(properties), state)
        self.pools[self._key(sub, rg, cluster, name)] = pool
        return pool

    async def finish_operations(self) -> None:
        """Complete every outstanding operation now, as if ARM had finished them without being polled."""
        for op in list(self._operations.values()):
            op.polls_left = 0
            await self._poll(op)

    # --- internals -----------------------------------------------------------------------------

    @staticmethod
    def _key(sub: str, rg: str, cluster: str, name: str) -> tuple[str, str, str, str]:
        # ARM resource ids are case-insensitive.
        return (sub.lower(), rg.lower(), cluster.lower(), name.lower())

    def _take_injection(self, op: str, pool: str | None) -> ArmError | None:
        for inj in self._injections:
            if inj.op == op and (inj.pool is None or (pool or "").lower() == inj.pool.lower()):
                inj.times -= 1
                if inj.times <= 0:
                    self._injections.remove(inj)
                return inj.error
        return None

    @staticmethod
    def _pool_doc(
        sub: str, rg: str, cluster: str, name: str, props: dict[str, Any], state: str
    ) -> dict[str, Any]:
        props = dict(props)
        props.setdefault("mode", "User")
        props.setdefault("osType", "Linux")
        props.setdefault("type", "VirtualMachineScaleSets")
        props["provisioningState"] = state
        props["powerState"] = {"code": "Running"}
        props.setdefault("orchestratorVersion", "1.30.0")
        return {
            "id": f"/subscriptions/{sub}/resourcegroups/{rg}/providers/Microsoft.ContainerService/"
            f"managedClusters/{cluster}/agentPools/{name}",
            "name": name,
            "type": "Microsoft.ContainerService/managedClusters/agentPools",
            "properties": props,
        }

    def _advance(self, op: _Operation) -> tuple[str, dict[str, Any]] | None:
        """One poll of an operation: count down, then apply its outcome to the pool exactly once.

        Returns the pool event to announce to hooks (``ready`` / ``deleted``), if this poll finished it.
        """
        if op.status != "InProgress":
            return None
        if op.polls_left > 0:
            op.polls_left -= 1
            return None
        pool = self.pools.get(op.key)
        if op.error is not None:
            op.status = "Failed"
            if pool is not None:
                pool["properties"]["provisioningState"] = "Failed"
                # AKS keeps why a pool failed in properties.status.provisioningError.
                pool["properties"]["status"] = {"provisioningError": op.error.body()["error"]}
            return None
        op.status = "Succeeded"
        if pool is None:
            return None
        if op.kind == "delete":
            self.pools.pop(op.key, None)
            return ("deleted", pool)
        pool["properties"]["provisioningState"] = "Succeeded"
        pool["properties"].pop("status", None)
        pool["properties"]["nodeImageVersion"] = "AKSUbuntu-2204gen2containerd-202501.01.0"
        return ("ready", pool)

    async def _poll(self, op: _Operation) -> None:
        event = self._advance(op)
        if event is None:
            return
        for hook in self.hooks:
            try:
                await hook(*event)
            except Exception as e:  # a broken hook must not turn into a fake ARM failure
                self.hook_errors.append(e)

    def _start_operation(
        self,
        request: web.Request,
        kind: str,
        key: tuple[str, str, str, str],
        sub: str,
        error: ArmError | None,
    ) -> dict[str, str]:
        op_id = f"op{next(self._ids):06d}"
        self._operations[op_id] = _Operation(op_id, kind, key, self.polls, error)
        base = f"{request.scheme}://{request.host}/subscriptions/{sub}/providers/Microsoft.ContainerService/locations/{self.location}"
        version = request.query.get("api-version", "")
        headers = {"Retry-After": str(self.retry_after)}
        if self.lro_headers in ("both", "async"):
            headers["Azure-AsyncOperation"] = f"{base}/operations/{op_id}?api-version={version}"
        if self.lro_headers in ("both", "location"):
            headers["Location"] = f"{base}/operationresults/{op_id}?api-version={version}"
        return headers

    # --- HTTP ----------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Route one request (single catch-all handler: ARM paths are case-insensitive)."""
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        auth = request.headers.get("Authorization", "")
        self.requests.append(
            RecordedRequest(
                request.method, request.path, dict(request.query), body, auth.startswith("Bearer ")
            )
        )
        if not auth.startswith("Bearer ") or (self.token is not None and auth != f"Bearer {self.token}"):
            return _error(
                ArmError(401, "InvalidAuthenticationToken", "The access token is missing or invalid.")
            )
        if not request.query.get("api-version"):
            return _error(
                ArmError(400, "MissingApiVersionParameter", "The api-version query parameter is required.")
            )
        if m := _OPERATION_RE.match(request.path):
            return await self._handle_operation(m["kind"].lower(), m["op"])
        m = _POOL_RE.match(request.path)
        if not m:
            return _error(ArmError(404, "InvalidResourceType", f"no route for {request.path}"))
        sub, rg, cluster, name = m["sub"], m["rg"], m["cluster"], m["name"]
        if name is None:
            if request.method != "GET":
                return _error(ArmError(405, "MethodNotAllowed", "only GET on the collection"))
            return self._handle_list(request, sub, rg, cluster)
        key = self._key(sub, rg, cluster, name)
        if request.method == "GET":
            if err := self._take_injection("get", name):
                return _error(err)
            pool = self.pools.get(key)
            if pool is None:
                return _error(ArmError(404, "NotFound", "Agent Pool not found."))
            return web.json_response(pool)
        if request.method == "PUT":
            return self._handle_put(request, sub, rg, cluster, name, key, body)
        if request.method == "DELETE":
            return self._handle_delete(request, sub, name, key)
        return _error(ArmError(405, "MethodNotAllowed", f"{request.method} is not supported"))

    async def _handle_operation(self, kind: str, op_id: str) -> web.StreamResponse:
        op = self._operations.get(op_id)
        if op is None:
            return _error(ArmError(404, "NotFound", f"operation {op_id} not found"))
        await self._poll(op)
        headers = {"Retry-After": str(self.retry_after)}
        if kind == "operationresults":
            # The Location-header protocol: 202 while running, then 204 (delete) / 200 (create) or the error.
            if op.status == "InProgress":
                return web.Response(status=202, headers=headers)
            if op.status == "Failed" and op.error is not None:
                return _error(
                    op.error if op.error.status >= 400 else ArmError(400, op.error.code, op.error.message)
                )
            pool = self.pools.get(op.key)
            return web.json_response(pool) if pool is not None else web.Response(status=204)
        doc: dict[str, Any] = {
            "name": op_id,
            "status": op.status,
            "startTime": dt.datetime.now(dt.UTC).isoformat(),
        }
        if op.status == "Failed" and op.error is not None:
            doc["error"] = op.error.body()["error"]
        return web.json_response(doc, headers=headers)

    def _handle_list(self, request: web.Request, sub: str, rg: str, cluster: str) -> web.StreamResponse:
        if err := self._take_injection("list", None):
            return _error(err)
        prefix = self._key(sub, rg, cluster, "")[:3]
        pools = [p for k, p in sorted(self.pools.items()) if k[:3] == prefix]
        start = int(request.query.get("$skipToken", "0") or 0)
        if self.page_size > 0:
            page = pools[start : start + self.page_size]
            doc: dict[str, Any] = {"value": page}
            if start + self.page_size < len(pools):
                query = {**request.query, "$skipToken": str(start + self.page_size)}
                doc["nextLink"] = str(request.url.with_query(query))
            return web.json_response(doc)
        return web.json_response({"value": pools[start:]})

    def _handle_put(
        self,
        request: web.Request,
        sub: str,
        rg: str,
        cluster: str,
        name: str,
        key: tuple[str, str, str, str],
        body: Any,
    ) -> web.StreamResponse:
        if err := self._take_injection("put", name):
            return _error(err)
        existing = self.pools.get(key)
        if existing is not None:
            state = existing["properties"]["provisioningState"]
            if state in ("Creating", "Updating", "Deleting"):
                message = (
                    IN_PROGRESS_CREATE_MESSAGE
                    if state == "Creating"
                    else f"Operation is not allowed because there's an in progress {state.lower()} operation."
                )
                return _error(ArmError(409, "OperationNotAllowed", message))
        if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", name):
            return _error(
                ArmError(
                    400, "InvalidParameter", f"Agent pool name {name!r} must be 1-12 lowercase alphanumerics."
                )
            )
        props = body.get("properties") if isinstance(body, dict) else None
        if not isinstance(props, dict) or not props.get("vmSize"):
            return _error(ArmError(400, "InvalidParameter", "properties.vmSize is required."))
        disk = props.get("osDiskSizeGB")
        if disk is not None and disk != 0 and not 30 <= int(disk) <= 2048:
            return _error(
                ArmError(
                    400, "InvalidParameter", f"osDiskSizeGB {disk} is outside the allowed range 30-2048."
                )
            )
        failure = self._take_injection("operation", name)
        state = "Updating" if existing is not None else "Creating"
        pool = self._pool_doc(sub, rg, cluster, name, props, state)
        self.pools[key] = pool
        headers = self._start_operation(request, "update" if existing else "create", key, sub, failure)
        return web.json_response(pool, status=200 if existing is not None else 201, headers=headers)

    def _handle_delete(
        self, request: web.Request, sub: str, name: str, key: tuple[str, str, str, str]
    ) -> web.StreamResponse:
        if err := self._take_injection("delete", name):
            return _error(err)
        pool = self.pools.get(key)
        if pool is None:
            return web.Response(status=204)  # ARM: deleting a missing resource is a no-op
        if pool["properties"]["provisioningState"] == "Deleting":
            return _error(
                ArmError(
                    409, "OperationNotAllowed", "Operation is not allowed: the agent pool is being deleted."
                )
            )
        pool["properties"]["provisioningState"] = "Deleting"
        headers = self._start_operation(request, "delete", key, sub, None)
        return web.Response(status=202, headers=headers)


def _error(err: ArmError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers={"x-ms-error-code": err.code})


def write_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1/localhost (usable as its own CA) and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-arm.localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "fake-arm.crt"
    key_path = directory / "fake-arm.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


class FakeArmServer:
    """Runs a :class:`FakeArm` over HTTPS on loopback. Use ``async with FakeArmServer() as arm:``."""

    def __init__(self, arm: FakeArm | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.arm = arm or FakeArm()
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.ca_file: Path | None = None
        self.endpoint = ""

    async def start(self, cert_dir: Path | None = None) -> None:
        """Generate the certificate (in ``cert_dir`` or a temp dir) and start serving."""
        import ssl

        if cert_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fake-arm-")
            cert_dir = Path(self._tmp.name)
        cert, key = await asyncio.to_thread(write_self_signed_cert, cert_dir)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        await asyncio.to_thread(ctx.load_cert_chain, cert, key)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.arm.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=ctx)
        await site.start()
        port = int(self._runner.addresses[0][1])
        self.ca_file = cert
        self.endpoint = f"https://{self._host}:{port}"

    async def stop(self) -> None:
        """Stop serving and remove the temporary certificate."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._tmp is not None:
            await asyncio.to_thread(self._tmp.cleanup)
            self._tmp = None

    async def __aenter__(self) -> FakeArmServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
