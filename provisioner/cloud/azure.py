"""Azure cloud provider: one Machine = one AKS agent pool (VirtualMachineScaleSets) of exactly one node.

Talks to Azure Resource Manager through the async azure-mgmt-containerservice client
(``agent_pools.get / begin_create_or_update / begin_delete / list``), authenticated by azure-identity.
The mapping follows upstream gpu-provisioner: pool name = Machine name, ``vmSize`` = the first
``node.kubernetes.io/instance-type`` requirement value, node labels = the Machine's labels plus
``karpenter.sh/provisioner-name`` / ``kaito.sh/machine-type`` / ``kaito.sh/creation-timestamp``, taints as
``key=value:effect``, ``osDiskSizeGB`` = the storage request in whole GiB. Unlike upstream, ARM errors are
classified into the typed CloudErrors of :mod:`provisioner.cloud.base`.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from azure.core.credentials import AccessToken
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import AioHttpTransport
from azure.mgmt.containerservice.aio import ContainerServiceClient
from azure.mgmt.containerservice.models import AgentPool

from provisioner import machine_fields as mf
from provisioner.cloud.base import (
    AuthFailed,
    CapacityUnavailable,
    CloudError,
    CloudProvider,
    Conflict,
    Instance,
    InstanceState,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    SkuUnavailable,
)
from provisioner.machine_fields import MachineDict, MachineFieldError, Taint

log = structlog.get_logger(__name__)

AGENTPOOL_LABEL = "agentpool"
AKS_AGENTPOOL_LABEL = "kubernetes.azure.com/agentpool"
NODE_IMAGE_FAMILY_ANNOTATION = "kaito.sh/node-image-family"

# AKS rejects osDiskSizeGB outside this range with InvalidParameter; 0 would mean "AKS default".
MIN_OS_DISK_GIB = 30
MAX_OS_DISK_GIB = 2048

# Upstream v0.3+: a Linux agent pool name is 1-12 lowercase alphanumerics starting with a letter.
POOL_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")

_PENDING_STATES = frozenset({"creating", "updating", "scaling", "upgrading", "starting", "stopping"})


class ConfigError(ValueError):
    """The environment does not describe a usable Azure configuration."""


# --- configuration -------------------------------------------------------------------------------


def _first(env: Mapping[str, str], *names: str) -> str:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return ""


TOKEN_FILE_NEEDS_ENDPOINT = (
    "ARM_TOKEN_FILE is set without ARM_ENDPOINT: a static token file outranks every configured identity "
    "and is meant for a fake or non-default ARM; set ARM_ENDPOINT to that ARM, or unset ARM_TOKEN_FILE to "
    "use the configured identity (workload identity, client secret or managed identity)"
)


@dataclass(frozen=True)
class AzureConfig:
    """Where the cluster lives in ARM and how to authenticate; see :meth:`from_env` for the variables."""

    subscription_id: str
    resource_group: str
    cluster_name: str
    tenant_id: str = ""
    client_id: str = ""
    client_secret: str = field(default="", repr=False)  # never printed
    federated_token_file: str = ""
    authority_host: str = ""
    deployment_mode: str = ""
    location: str = ""
    node_resource_group: str = ""
    arm_endpoint: str = ""
    """Override of the ARM base URL (a local fake ARM, a sovereign cloud); empty means public Azure."""
    ca_file: str = ""
    """A PEM CA bundle to trust for arm_endpoint (a fake ARM's self-signed certificate)."""
    api_version: str = ""
    """Pin the agentPools api-version; empty means the SDK's default."""
    polling_interval: float = 10.0
    """Seconds between long-running-operation polls when ARM sends no Retry-After."""
    operation_timeout: float = 1200.0
    """How long create/delete wait for ARM's long-running operation before handing back to the caller."""
    max_retries: int | None = None
    """azure-core retries of 408/429/5xx/transport errors per request; None keeps the SDK default (10)."""
    token_file: str = ""
    """A file holding a bearer token for ARM (a fake ARM in demos, or a token a sidecar refreshes).

    It outranks every identity, so it is accepted only together with ``arm_endpoint``: a stray
    ``ARM_TOKEN_FILE`` must not silently replace workload identity against public Azure."""

    def __post_init__(self) -> None:
        if self.token_file and not self.arm_endpoint:
            raise ConfigError(f"Azure configuration: {TOKEN_FILE_NEEDS_ENDPOINT}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AzureConfig:
        """Load from the variables upstream gpu-provisioner uses (plus their AZURE_* spellings).

        Required: ``ARM_SUBSCRIPTION_ID`` (or ``AZURE_SUBSCRIPTION_ID``), ``ARM_RESOURCE_GROUP`` (or
        ``AZURE_RESOURCE_GROUP``), ``AZURE_CLUSTER_NAME``. Identity: ``AZURE_TENANT_ID``,
        ``AZURE_CLIENT_ID``, ``AZURE_FEDERATED_TOKEN_FILE`` + ``AZURE_AUTHORITY_HOST`` (workload identity),
        ``AZURE_CLIENT_SECRET`` (service principal), ``DEPLOYMENT_MODE=managed`` (DefaultAzureCredential).
        Optional: ``LOCATION``/``AZURE_LOCATION``, ``AZURE_NODE_RESOURCE_GROUP``, ``ARM_ENDPOINT``,
        ``ARM_CA_FILE``, ``ARM_API_VERSION``, ``ARM_POLLING_INTERVAL``, ``ARM_OPERATION_TIMEOUT``,
        ``ARM_MAX_RETRIES``, ``ARM_TOKEN_FILE`` (a bearer token read from a file; for a fake ARM).
        Raises ConfigError naming every missing or malformed variable.
        """
        env = os.environ if env is None else env
        missing: list[str] = []
        subscription = _first(env, "ARM_SUBSCRIPTION_ID", "AZURE_SUBSCRIPTION_ID")
        if not subscription:
            missing.append("ARM_SUBSCRIPTION_ID (or AZURE_SUBSCRIPTION_ID)")
        resource_group = _first(env, "ARM_RESOURCE_GROUP", "AZURE_RESOURCE_GROUP")
        if not resource_group:
            missing.append("ARM_RESOURCE_GROUP (or AZURE_RESOURCE_GROUP)")
        cluster = _first(env, "AZURE_CLUSTER_NAME")
        if not cluster:
            missing.append("AZURE_CLUSTER_NAME")
        tenant = _first(env, "AZURE_TENANT_ID")
        client_id = _first(env, "AZURE_CLIENT_ID")
        secret = _first(env, "AZURE_CLIENT_SECRET")
        token_file = _first(env, "AZURE_FEDERATED_TOKEN_FILE")
        mode = _first(env, "DEPLOYMENT_MODE").lower()
        if (token_file or secret) and not (tenant and client_id):
            missing.append(
                "AZURE_TENANT_ID and AZURE_CLIENT_ID (needed with a federated token or client secret)"
            )
        errors = [f"missing {m}" for m in missing]
        if _first(env, "ARM_TOKEN_FILE") and not _first(env, "ARM_ENDPOINT"):
            errors.append(TOKEN_FILE_NEEDS_ENDPOINT)

        def number(name: str, default: float) -> float:
            raw = _first(env, name)
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                errors.append(f"{name}={raw!r} is not a number")
                return default
            if value < 0:
                errors.append(f"{name}={raw!r} must not be negative")
            return value

        polling = number("ARM_POLLING_INTERVAL", 10.0)
        timeout = number("ARM_OPERATION_TIMEOUT", 1200.0)
        retries_raw = _first(env, "ARM_MAX_RETRIES")
        max_retries: int | None = None
        if retries_raw:
            if retries_raw.isdigit():
                max_retries = int(retries_raw)
            else:
                errors.append(f"ARM_MAX_RETRIES={retries_raw!r} is not a non-negative integer")
        if errors:
            raise ConfigError("Azure configuration: " + "; ".join(errors))
        location = _first(env, "LOCATION", "AZURE_LOCATION")
        node_rg = _first(env, "AZURE_NODE_RESOURCE_GROUP")
        if not node_rg and location:
            # AKS's default node resource group name.
            node_rg = f"MC_{resource_group}_{cluster}_{location}"
        return cls(
            subscription_id=subscription,
            resource_group=resource_group,
            cluster_name=cluster,
            tenant_id=tenant,
            client_id=client_id,
            client_secret=secret,
            federated_token_file=token_file,
            authority_host=_first(env, "AZURE_AUTHORITY_HOST"),
            deployment_mode=mode,
            location=location,
            node_resource_group=node_rg,
            arm_endpoint=_first(env, "ARM_ENDPOINT"),
            ca_file=_first(env, "ARM_CA_FILE"),
            api_version=_first(env, "ARM_API_VERSION"),
            polling_interval=polling,
            operation_timeout=timeout,
            max_retries=max_retries,
            token_file=_first(env, "ARM_TOKEN_FILE"),
        )

    @property
    def configured_identity(self) -> str:
        """The identity the environment configures besides a token file ('' when none), for warnings."""
        if self.deployment_mode == "managed":
            return "DEPLOYMENT_MODE=managed (DefaultAzureCredential)"
        if self.federated_token_file:
            return f"workload identity (AZURE_FEDERATED_TOKEN_FILE, client {self.client_id})"
        if self.client_secret:
            return f"a client secret (client {self.client_id})"
        if self.client_id:
            return f"managed identity (client {self.client_id})"
        return ""

    @property
    def credential_kind(self) -> str:
        """Which azure-identity credential :func:`build_credential` picks.

        ``token_file`` when ARM_TOKEN_FILE is set (explicit, e.g. a fake ARM), else ``default``
        (DEPLOYMENT_MODE=managed, as upstream), else ``workload_identity`` when a federated token file is
        mounted (the self-hosted default), else ``client_secret``, else ``managed_identity``.
        """
        if self.token_file:
            return "token_file"
        if self.deployment_mode == "managed":
            return "default"
        if self.federated_token_file:
            return "workload_identity"
        if self.client_secret:
            return "client_secret"
        return "managed_identity"


class FileTokenCredential:
    """An async token credential that reads a bearer token from a file (re-read every few minutes).

    For talking to a fake ARM in demos, or to ARM with a token some other process keeps fresh.
    """

    # azure-core refreshes a token within 5 minutes of its expiry, so this re-reads about every 5 minutes.
    _LIFETIME_S = 600

    def __init__(self, path: str) -> None:
        self._path = Path(path)

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        """The file's content (stripped) as a token for any scope."""
        token = (await asyncio.to_thread(self._path.read_text)).strip()
        if not token:
            raise ClientAuthenticationError(message=f"token file {self._path} is empty")
        return AccessToken(token, int(time.time()) + self._LIFETIME_S)

    async def close(self) -> None:
        """Nothing to release."""

    async def __aenter__(self) -> FileTokenCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def build_credential(config: AzureConfig) -> AsyncTokenCredential:
    """The async azure-identity credential for ``config.credential_kind`` (the caller closes it)."""
    from azure.identity.aio import (
        ClientSecretCredential,
        DefaultAzureCredential,
        ManagedIdentityCredential,
        WorkloadIdentityCredential,
    )

    kind = config.credential_kind
    log.info("azure credential selected", kind=kind, client_id=config.client_id or None)
    if kind == "token_file" and config.configured_identity:
        log.warning(
            "ARM_TOKEN_FILE overrides the configured Azure identity: every ARM call uses the static token "
            "from the file; unset ARM_TOKEN_FILE to use the identity",
            ignored_identity=config.configured_identity,
            token_file=config.token_file,
            arm_endpoint=config.arm_endpoint,
        )
    extra: dict[str, Any] = {"authority": config.authority_host} if config.authority_host else {}
    if kind == "token_file":
        return FileTokenCredential(config.token_file)
    if kind == "default":
        return DefaultAzureCredential(managed_identity_client_id=config.client_id or None, **extra)
    if kind == "workload_identity":
        return WorkloadIdentityCredential(
            tenant_id=config.tenant_id,
            client_id=config.client_id,
            token_file_path=config.federated_token_file,
            **extra,
        )
    if kind == "client_secret":
        return ClientSecretCredential(config.tenant_id, config.client_id, config.client_secret, **extra)
    return ManagedIdentityCredential(client_id=config.client_id or None)


# --- names and provider IDs ----------------------------------------------------------------------


def validate_pool_name(name: str) -> str:
    """Return ``name`` if it is a valid AKS agent pool name, else raise InvalidRequest.

    The Machine name becomes the pool name, so it must be 1-12 lowercase letters/digits starting with
    a letter (AKS's rule for Linux pools; upstream v0.3+ enforces the same regexp).
    """
    if not POOL_NAME_RE.match(name):
        raise InvalidRequest(
            f"agentpool name({name}) is invalid: a Machine name becomes the AKS agent pool name and must be "
            "1-12 lowercase letters or digits starting with a letter",
            code="InvalidAgentPoolName",
        )
    return name


_PROVIDER_ID_RE = re.compile(
    r"^azure:///subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Compute/"
    r"virtualMachineScaleSets/(?P<vmss>[^/]+)/virtualMachines/(?P<vm>[^/]+)$"
)
_NODE_NAME_RE = re.compile(r"^(?P<vmss>aks-(?P<pool>[a-z0-9]+)-(?P<hash>\d+)-vmss)(?P<suffix>[0-9a-z]{6})$")


@dataclass(frozen=True)
class AzureProviderID:
    """A parsed AKS VMSS providerID."""

    subscription_id: str
    resource_group: str
    vmss_name: str
    instance_id: str

    @property
    def pool_name(self) -> str:
        """The agent pool: the second dash-separated token of ``aks-<pool>-<hash>-vmss`` (as upstream parses it)."""
        parts = self.vmss_name.split("-")
        if len(parts) < 4 or parts[0] != "aks" or parts[-1] != "vmss":
            raise InvalidRequest(
                f"VMSS name {self.vmss_name!r} is not an AKS node pool scale set", code="InvalidProviderID"
            )
        return parts[1]

    def __str__(self) -> str:
        return (
            f"azure:///subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}/providers/"
            f"Microsoft.Compute/virtualMachineScaleSets/{self.vmss_name}/virtualMachines/{self.instance_id}"
        )

    @classmethod
    def parse(cls, provider_id: str) -> AzureProviderID:
        """Parse ``azure:///subscriptions/S/resourceGroups/RG/providers/Microsoft.Compute/virtualMachineScaleSets/V/virtualMachines/N``."""
        match = _PROVIDER_ID_RE.match(provider_id)
        if not match:
            raise InvalidRequest(
                f"providerID {provider_id!r} is not an AKS VMSS providerID", code="InvalidProviderID"
            )
        return cls(match["sub"], match["rg"], match["vmss"], match["vm"])

    @classmethod
    def for_node(cls, subscription_id: str, node_resource_group: str, node_name: str) -> AzureProviderID:
        """The providerID AKS gives a VMSS node named ``aks-<pool>-<hash>-vmss<6 base-36 digits>``.

        The instance id is the base-36 suffix decoded (``vmss00000a`` -> 10); the resource group is
        lowercased as the Azure cloud provider writes it.
        """
        match = _NODE_NAME_RE.match(node_name)
        if not match:
            raise InvalidRequest(
                f"node name {node_name!r} is not an AKS VMSS node name", code="InvalidNodeName"
            )
        return cls(subscription_id, node_resource_group.lower(), match["vmss"], str(int(match["suffix"], 36)))


def pool_name_from_ref(ref: str) -> str:
    """The agent pool name for a Machine name or an Azure providerID."""
    if ref.startswith("azure://"):
        return AzureProviderID.parse(ref).pool_name
    return ref


# --- the agent pool body -------------------------------------------------------------------------


def is_gpu_vm_size(vm_size: str) -> bool:
    """Upstream's rule for ``kaito.sh/machine-type``: N-series sizes (``Standard_N...``) are GPU machines."""
    return vm_size.lower().startswith("standard_n")


def os_sku_for(machine: MachineDict) -> str:
    """``osSKU`` from annotation ``kaito.sh/node-image-family`` (case-insensitive); Ubuntu unless AzureLinux."""
    family = mf.machine_annotations(machine).get(NODE_IMAGE_FAMILY_ANNOTATION, "").strip().lower()
    return "AzureLinux" if family == "azurelinux" else "Ubuntu"


def os_disk_gib_for(machine: MachineDict) -> int:
    """The OS disk size for the pool: the storage request in GiB, raised to AKS's minimum of 30.

    Raises InvalidRequest when the request is missing, zero, malformed or beyond AKS's 2048 GiB limit.
    """
    try:
        gib = mf.os_disk_size_gib(machine)
    except MachineFieldError as e:
        raise InvalidRequest(str(e), code="InvalidStorageRequest") from e
    if gib > MAX_OS_DISK_GIB:
        raise InvalidRequest(
            f"machine {mf.machine_name(machine)} requests {gib} GiB of OS disk; AKS allows at most "
            f"{MAX_OS_DISK_GIB} GiB",
            code="InvalidStorageRequest",
        )
    return max(gib, MIN_OS_DISK_GIB)


def agent_pool_body(machine: MachineDict, *, now: datetime | None = None) -> dict[str, Any]:
    """The JSON body of the agent pool PUT for a Machine (``{"properties": {...}}``, as upstream sends).

    Raises InvalidRequest when the Machine cannot become a pool (bad name, no instance type, bad disk
    size, malformed taint).
    """
    try:
        validate_pool_name(mf.machine_name(machine))  # ARM takes the name from the URL, not the body
        vm_size = mf.require_instance_type(machine)
        node_taints = [t.to_aks() for t in mf.taints(machine)]
    except MachineFieldError as e:
        raise InvalidRequest(str(e), code="InvalidMachine") from e
    created = mf.creation_timestamp(machine) or now or datetime.now(UTC)
    labels = {mf.PROVISIONER_NAME_LABEL: "default"}
    labels.update(mf.machine_labels(machine))
    labels[mf.MACHINE_TYPE_LABEL] = "gpu" if is_gpu_vm_size(vm_size) else "cpu"
    labels[mf.CREATION_TIMESTAMP_LABEL] = mf.format_creation_label(created)
    return {
        "properties": {
            "type": "VirtualMachineScaleSets",
            "osType": "Linux",
            "osSKU": os_sku_for(machine),
            "count": 1,
            "vmSize": vm_size,
            "osDiskSizeGB": os_disk_gib_for(machine),
            "nodeLabels": labels,
            "nodeTaints": node_taints,
        }
    }


def is_managed_pool(node_labels: Mapping[str, str]) -> bool:
    """True for pools this provisioner created: our provisioner/machine-type labels plus a Kaito owner label.

    Anything else in the cluster (system pools, a user's own GPU pools) is never listed, so garbage
    collection cannot delete it.
    """
    return (
        mf.PROVISIONER_NAME_LABEL in node_labels
        and mf.MACHINE_TYPE_LABEL in node_labels
        and (mf.WORKSPACE_LABEL in node_labels or mf.RAGENGINE_LABEL in node_labels)
    )


def _parse_aks_taint(raw: str) -> Taint | None:
    key_value, _, effect = raw.rpartition(":")
    key, _, value = key_value.partition("=")
    if not key or not effect:
        return None
    return Taint(key=key, value=value, effect=effect)


def state_of(provisioning_state: str) -> InstanceState:
    """Map an ARM ``provisioningState`` to an InstanceState."""
    state = provisioning_state.lower()
    if state == "succeeded":
        return InstanceState.RUNNING
    if state in _PENDING_STATES:
        return InstanceState.PENDING
    if "deleting" in state:
        return InstanceState.DELETING
    if state in ("failed", "canceled", "cancelled"):
        return InstanceState.FAILED
    return InstanceState.UNKNOWN


def instance_from_pool(pool: Mapping[str, Any], *, provider_id: str = "") -> Instance:
    """Convert an agent pool (ARM JSON shape or the SDK model, which is a Mapping) to an Instance."""
    props = pool.get("properties") or {}
    name = str(pool.get("name") or "")
    vm_size = str(props.get("vmSize") or "")
    labels = {str(k): str(v) for k, v in (props.get("nodeLabels") or {}).items()}
    if vm_size:
        labels.setdefault(mf.INSTANCE_TYPE_LABEL, vm_size)
    taints = tuple(t for t in (_parse_aks_taint(str(r)) for r in props.get("nodeTaints") or []) if t)
    provisioning = str(props.get("provisioningState") or "")
    state = state_of(provisioning)
    failure: CloudError | None = None
    if state is InstanceState.FAILED:
        detail = (props.get("status") or {}).get("provisioningError")
        failure = (
            classify_provisioning_error(detail, pool=name, vm_size=vm_size)
            if isinstance(detail, Mapping)
            else CloudError(
                f"agent pool {name} is {provisioning} and Azure gave no reason", code=provisioning
            )
        )
    return Instance(
        name=name,
        provider_id=provider_id,
        instance_type=vm_size,
        labels=labels,
        taints=taints,
        capacity={},
        state=state,
        node_selector={AGENTPOOL_LABEL: name, AKS_AGENTPOOL_LABEL: name},
        machine_name=name,
        created_at=mf.parse_creation_label(labels.get(mf.CREATION_TIMESTAMP_LABEL, "")),
        image_id=str(props.get("nodeImageVersion") or ""),
        detail=provisioning,
        failure=failure,
    )


# --- error classification ------------------------------------------------------------------------

_QUOTA_CODES = frozenset(
    {"quotaexceeded", "insufficientvcpuquota", "errcode_insufficientvcpuquota", "operationnotallowed_quota"}
)
_SKU_CODES = frozenset(
    {
        "skunotavailable",
        "vmsizenotsupported",
        "notavailableforsubscription",
        "invalidvmsize",
        "skunotsupported",
    }
)
_CAPACITY_CODES = frozenset(
    {
        "allocationfailed",
        "zonalallocationfailed",
        "overconstrainedallocationrequest",
        "overconstrainedzonalallocationrequest",
        "allocationfailure",
    }
)
_CONFLICT_CODES = frozenset(
    {
        "conflict",
        "anotheroperationinprogress",
        "operationpreempted",
        "concurrentrequestconflict",
        "etagmismatch",
    }
)
_AUTH_CODES = frozenset(
    {"authorizationfailed", "linkedauthorizationfailed", "invalidauthenticationtoken", "authenticationfailed"}
)
_INVALID_CODES = frozenset(
    {
        "invalidparameter",
        "badrequest",
        "invalidrequestcontent",
        "propertychangenotallowed",
        "invalidrequestformat",
    }
)
_NOT_FOUND_CODES = frozenset(
    {"notfound", "resourcenotfound", "resourcegroupnotfound", "parentresourcenotfound"}
)
_EMBEDDED_CODE_RE = re.compile(r"""Code=\\?"?(?P<code>[A-Za-z_]+)""")
_MAX_MESSAGE = 800


def _field(err: Any, name: str) -> Any:
    # ARM error details arrive as azure-core ODataV4Format objects or as plain JSON mappings.
    return err.get(name) if isinstance(err, Mapping) else getattr(err, name, None)


def _collect(error: Any) -> tuple[list[str], list[str]]:
    """Codes and messages of an ARM error and all its nested details."""
    codes: list[str] = []
    texts: list[str] = []
    stack = [error] if error is not None else []
    while stack:
        err = stack.pop()
        if code := _field(err, "code"):
            codes.append(str(code))
        if message := _field(err, "message"):
            texts.append(str(message))
        stack.extend(_field(err, "details") or [])
    return codes, texts


def _with_embedded_codes(codes: list[str], text: str) -> list[str]:
    # AKS wraps VMSS failures: code ReconcileVMSSAgentPoolFailed, message 'Code="AllocationFailed" ...'.
    return codes + [m["code"] for m in _EMBEDDED_CODE_RE.finditer(text)]


def classify_azure_error(exc: BaseException, *, operation: str, pool: str, vm_size: str = "") -> CloudError:
    """Map an azure-core/azure-identity exception to a typed CloudError with an actionable message."""
    if isinstance(exc, CloudError):
        return exc
    what = f"{operation} agent pool {pool}" + (f" ({vm_size})" if vm_size else "")
    if isinstance(exc, ClientAuthenticationError) and not isinstance(exc.status_code, int):
        # Raised by azure-identity before any ARM call: the credential itself does not work.
        return AuthFailed(
            f"{what}: could not get an Azure token ({_short(str(exc))}); check the workload identity "
            "federated credential (or client secret) for AZURE_CLIENT_ID and AZURE_TENANT_ID",
            code="CredentialUnavailable",
        )
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return CloudError(
            f"{what}: cannot reach Azure Resource Manager: {_short(str(exc))}", code="Transport"
        )
    if not isinstance(exc, HttpResponseError):
        return CloudError(f"{what}: {type(exc).__name__}: {_short(str(exc))}", code=type(exc).__name__)
    codes, texts = _collect(getattr(exc, "error", None))
    response = getattr(exc, "response", None)
    header_code = response.headers.get("x-ms-error-code") if response is not None else None
    if header_code:
        codes.append(str(header_code))
    text = " ".join(texts) if texts else str(exc.message or exc)
    return classify_arm_error(_with_embedded_codes(codes, text), text, exc.status_code or 0, what)


def classify_provisioning_error(error: Mapping[str, Any], *, pool: str, vm_size: str = "") -> CloudError:
    """Classify an agent pool's ``properties.status.provisioningError`` (why a pool is Failed)."""
    codes, texts = _collect(error)
    text = " ".join(texts) or "no details"
    what = f"create agent pool {pool}" + (f" ({vm_size})" if vm_size else "")
    return classify_arm_error(_with_embedded_codes(codes, text), text, 0, what)


def classify_arm_error(codes: list[str], text: str, status: int, what: str) -> CloudError:
    """The classification rules: ARM error codes (incl. nested/embedded ones), message text, HTTP status."""
    lowered = {c.lower() for c in codes}
    lower_text = text.lower()
    code = codes[0] if codes else str(status)
    arm = _short(text)
    if status == 404 or lowered & _NOT_FOUND_CODES or "agent pool not found" in lower_text:
        return NotFound(f"{what}: not found: {arm}", code=code)
    if lowered & _QUOTA_CODES or "quota" in lower_text:
        return QuotaExceeded(
            f"{what}: Azure quota exceeded: {arm}. Request a quota increase for this VM family in the "
            "cluster's region (Azure portal > Subscriptions > Usage + quotas) or choose another instance type; "
            f"retrying every {QuotaExceeded.default_backoff / 60:.0f} minutes",
            code=code,
        )
    if (
        lowered & _SKU_CODES
        or "is not allowed in your subscription in location" in lower_text
        or "not available in location" in lower_text
    ):
        return SkuUnavailable(
            f"{what}: the VM size is not available to this subscription in the cluster's region: {arm}. "
            "Choose another instance type or deploy to a region that offers it",
            code=code,
        )
    if lowered & _CAPACITY_CODES:
        return CapacityUnavailable(
            f"{what}: Azure has no capacity for this VM size right now: {arm}. Will retry; consider "
            "another instance type or region if this persists",
            code=code,
        )
    if (
        lowered & _CONFLICT_CODES
        or "in progress" in lower_text
        or "another operation" in lower_text
        or (status == 409 and "operationnotallowed" not in lowered)
    ):
        return Conflict(f"{what}: another operation on this agent pool is in progress: {arm}", code=code)
    if status in (401, 403) or lowered & _AUTH_CODES:
        return AuthFailed(
            f"{what}: not authorized: {arm}. Grant the provisioner's identity Contributor on the AKS cluster",
            code=code,
        )
    if status == 400 or lowered & _INVALID_CODES:
        return InvalidRequest(f"{what}: Azure rejected the request: {arm}", code=code)
    return CloudError(f"{what}: Azure returned HTTP {status}: {arm}", code=code)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


# --- the provider --------------------------------------------------------------------------------


class AzureCloudProvider(CloudProvider):
    """AKS agent pools as instances. Build with :meth:`open` (owns its client) or pass a ready client."""

    name = "azure"

    def __init__(
        self,
        client: ContainerServiceClient,
        config: AzureConfig,
        *,
        closers: list[Any] | None = None,
    ) -> None:
        self._client = client
        self._config = config
        self._closers = closers or []
        self._closed = False

    @classmethod
    async def open(
        cls, config: AzureConfig, credential: AsyncTokenCredential | None = None
    ) -> AzureCloudProvider:
        """Build the ARM client for ``config`` (credential from :func:`build_credential` unless given).

        A credential built here is closed by :meth:`close`; a passed-in one stays the caller's.
        """
        closers: list[Any] = []
        try:
            if credential is None:
                credential = build_credential(config)
                closers.append(credential)
            kwargs: dict[str, Any] = {"polling_interval": config.polling_interval}
            if config.api_version:
                kwargs["api_version"] = config.api_version
            if config.max_retries is not None:
                kwargs["retry_total"] = config.max_retries
            if config.arm_endpoint:
                kwargs["base_url"] = config.arm_endpoint
            if config.ca_file:
                # Load the CA once, off the event loop; the SDK's connection_verify would re-read it per request.
                ctx = await asyncio.to_thread(ssl.create_default_context, cafile=config.ca_file)
                session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))
                closers.append(session)
                kwargs["transport"] = AioHttpTransport(session=session, session_owner=False)
            client = ContainerServiceClient(credential, config.subscription_id, **kwargs)
        except BaseException:
            for closer in reversed(closers):  # nothing half-built may leak its sockets
                await closer.close()
            raise
        return cls(client, config, closers=closers)

    async def close(self) -> None:
        """Close the ARM client and whatever :meth:`open` created."""
        if self._closed:
            return
        self._closed = True
        await self._client.close()
        for closer in reversed(self._closers):
            await closer.close()

    @property
    def config(self) -> AzureConfig:
        """The configuration this provider was built with."""
        return self._config

    async def _get_pool(self, pool: str, operation: str) -> AgentPool:
        cfg = self._config
        try:
            return await self._client.agent_pools.get(cfg.resource_group, cfg.cluster_name, pool)
        except Exception as e:
            raise classify_azure_error(e, operation=operation, pool=pool) from e

    async def create(self, machine: MachineDict) -> Instance:
        """Create the Machine's agent pool and wait for ARM's operation, or adopt the existing pool.

        An existing pool that is still being created/updated/deleted raises Conflict (retry later) rather
        than sending a second PUT; a Succeeded pool is returned as is; a Failed pool is PUT again.
        """
        body = agent_pool_body(machine)
        props = body["properties"]
        pool = mf.machine_name(machine)
        vm_size = str(props["vmSize"])
        cfg = self._config
        logger = log.bind(machine=pool, vm_size=vm_size, cluster=cfg.cluster_name)
        try:
            existing: AgentPool | None = await self._get_pool(pool, "create")
        except NotFound:
            existing = None
        if existing is not None:
            instance = instance_from_pool(existing)
            if instance.instance_type and instance.instance_type.lower() != vm_size.lower():
                raise InvalidRequest(
                    f"agent pool {pool} already exists with VM size {instance.instance_type}, but machine "
                    f"{pool} asks for {vm_size}; delete the machine so it is recreated",
                    code="PoolVmSizeMismatch",
                )
            if instance.state is InstanceState.RUNNING:
                logger.info("agent pool exists; adopting it")
                return instance
            if instance.state in (InstanceState.PENDING, InstanceState.DELETING):
                raise Conflict(
                    f"agent pool {pool} is {instance.detail or instance.state}; waiting for that operation",
                    code="OperationInProgress",
                )
            logger.info(
                "agent pool not healthy; sending the create again", provisioning_state=instance.detail
            )
        logger.info("creating agent pool", os_disk_gib=props["osDiskSizeGB"])
        try:
            poller = await self._client.agent_pools.begin_create_or_update(
                cfg.resource_group, cfg.cluster_name, pool, AgentPool(body)
            )
            async with asyncio.timeout(cfg.operation_timeout or None):
                result = await poller.result()
        except TimeoutError as e:
            raise Conflict(
                f"creating agent pool {pool} ({vm_size}) still in progress after {cfg.operation_timeout:.0f}s",
                code="OperationInProgress",
            ) from e
        except Exception as e:
            raise classify_azure_error(e, operation="create", pool=pool, vm_size=vm_size) from e
        instance = instance_from_pool(result)
        logger.info("agent pool created", provisioning_state=instance.detail)
        return instance

    async def get(self, ref: str) -> Instance:
        """The agent pool for a Machine name or providerID; raises NotFound when ARM has no such pool."""
        pool = pool_name_from_ref(ref)
        found = await self._get_pool(pool, "get")
        return instance_from_pool(found, provider_id=ref if ref.startswith("azure://") else "")

    async def list(self) -> list[Instance]:
        """All agent pools of the cluster that this provisioner created (see :func:`is_managed_pool`)."""
        cfg = self._config
        out: list[Instance] = []
        try:
            async for pool in self._client.agent_pools.list(cfg.resource_group, cfg.cluster_name):
                labels = (pool.get("properties") or {}).get("nodeLabels") or {}
                if is_managed_pool(labels):
                    out.append(instance_from_pool(pool))
        except Exception as e:
            raise classify_azure_error(e, operation="list", pool="*") from e
        return out

    async def delete(self, ref: str) -> None:
        """Delete the pool and wait for ARM's operation (bounded); NotFound when it is already gone.

        A pool already ``Deleting`` returns at once without a second DELETE (upstream v0.3.6+).
        """
        pool = pool_name_from_ref(ref)
        cfg = self._config
        existing = instance_from_pool(await self._get_pool(pool, "delete"))
        if existing.state is InstanceState.DELETING:
            return
        log.info("deleting agent pool", machine=pool, cluster=cfg.cluster_name)
        try:
            poller = await self._client.agent_pools.begin_delete(cfg.resource_group, cfg.cluster_name, pool)
            async with asyncio.timeout(cfg.operation_timeout or None):
                await poller.result()
        except TimeoutError:
            # Deletion goes on in Azure; the caller's next delete()/get() sees Deleting, then NotFound.
            log.info("agent pool deletion still in progress", machine=pool)
        except Exception as e:
            raise classify_azure_error(e, operation="delete", pool=pool) from e
