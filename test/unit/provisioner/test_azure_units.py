"""Pure parts of the Azure provider: pool names, PUT body, providerIDs, error classification, config."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ODataV4Format,
    ServiceRequestError,
)

from provisioner.cloud.azure import (
    AzureConfig,
    AzureProviderID,
    ConfigError,
    FileTokenCredential,
    agent_pool_body,
    build_credential,
    classify_azure_error,
    instance_from_pool,
    is_managed_pool,
    pool_name_from_ref,
    validate_pool_name,
)
from provisioner.cloud.base import (
    AuthFailed,
    CapacityUnavailable,
    CloudError,
    Conflict,
    InstanceState,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    SkuUnavailable,
)
from provisioner.machine_fields import Taint


def machine(name: str = "ws1a2b3c4d5", storage: str | None = "120Gi", **meta: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "metadata": {
            "name": name,
            "labels": {"kaito.sh/workspace": "w", "kaito.sh/workspacenamespace": "ns"},
            **meta,
        },
        "spec": {
            "requirements": [
                {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["Standard_NC12s_v3"]}
            ],
            "taints": [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
            "resources": {"requests": {"storage": storage} if storage else {}},
        },
    }
    return m


# --- pool names and providerIDs ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "ws1a2b3c4d5", "abcdefghijkl", "gpu0"])
def test_valid_pool_names(name: str) -> None:
    assert validate_pool_name(name) == name


@pytest.mark.parametrize("name", ["", "1abc", "abcdefghijklm", "ws-1", "Ws1", "ws_1", "ws.1"])
def test_invalid_pool_names(name: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        validate_pool_name(name)
    assert not e.value.retryable
    assert "agentpool name" in e.value.message


PID = (
    "azure:///subscriptions/S/resourceGroups/mc_rg_cluster_eastus/providers/Microsoft.Compute/"
    "virtualMachineScaleSets/aks-ws1a2b3c4d5-12345678-vmss/virtualMachines/0"
)


def test_provider_id_parse_and_format_round_trip() -> None:
    pid = AzureProviderID.parse(PID)
    assert pid.subscription_id == "S"
    assert pid.resource_group == "mc_rg_cluster_eastus"
    assert pid.vmss_name == "aks-ws1a2b3c4d5-12345678-vmss"
    assert pid.instance_id == "0"
    assert pid.pool_name == "ws1a2b3c4d5"
    assert str(pid) == PID
    assert pool_name_from_ref(PID) == "ws1a2b3c4d5"
    assert pool_name_from_ref("ws1a2b3c4d5") == "ws1a2b3c4d5"


@pytest.mark.parametrize(
    "bad",
    [
        "kwok://node",
        "azure:///subscriptions/S/resourcegroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/v/virtualMachines/0",
        "azure:///subscriptions/S/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm0",
    ],
)
def test_provider_id_rejects_non_vmss_ids(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        AzureProviderID.parse(bad)


def test_provider_id_with_foreign_vmss_name_has_no_pool() -> None:
    pid = AzureProviderID.parse(PID.replace("aks-ws1a2b3c4d5-12345678-vmss", "myscaleset"))
    with pytest.raises(InvalidRequest):
        _ = pid.pool_name


def test_provider_id_for_node_decodes_base36_instance() -> None:
    pid = AzureProviderID.for_node("S", "MC_rg_cluster_eastus", "aks-gpu0-12345678-vmss00000a")
    assert str(pid) == (
        "azure:///subscriptions/S/resourceGroups/mc_rg_cluster_eastus/providers/Microsoft.Compute/"
        "virtualMachineScaleSets/aks-gpu0-12345678-vmss/virtualMachines/10"
    )
    assert pid.pool_name == "gpu0"
    with pytest.raises(InvalidRequest):
        AzureProviderID.for_node("S", "rg", "node-1")


# --- the PUT body --------------------------------------------------------------------------------


def test_agent_pool_body_matches_upstream_shape() -> None:
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    body = agent_pool_body(machine(), now=now)
    assert body == {
        "properties": {
            "type": "VirtualMachineScaleSets",
            "osType": "Linux",
            "osSKU": "Ubuntu",
            "count": 1,
            "vmSize": "Standard_NC12s_v3",
            "osDiskSizeGB": 120,
            "nodeLabels": {
                "karpenter.sh/provisioner-name": "default",
                "kaito.sh/workspace": "w",
                "kaito.sh/workspacenamespace": "ns",
                "kaito.sh/machine-type": "gpu",
                "kaito.sh/creation-timestamp": "2025-01-02T03-04-05Z",
            },
            "nodeTaints": ["sku=gpu:NoSchedule"],
        }
    }


def test_agent_pool_body_details() -> None:
    m = machine(storage="100G", annotations={"kaito.sh/node-image-family": "AZURELINUX"})
    m["spec"]["requirements"][0]["values"] = ["Standard_D4s_v3"]
    m["metadata"]["labels"]["karpenter.sh/provisioner-name"] = "custom"
    props = agent_pool_body(m)["properties"]
    assert props["osDiskSizeGB"] == 94  # 10^11 bytes = 93.1 GiB, rounded up
    assert props["osSKU"] == "AzureLinux"
    assert props["nodeLabels"]["kaito.sh/machine-type"] == "cpu"
    assert props["vmSize"] == "Standard_D4s_v3"  # a CPU size goes to AKS unchanged
    assert props["nodeLabels"]["karpenter.sh/provisioner-name"] == "custom"  # the Machine's label wins
    assert agent_pool_body(machine(storage="1Ti"))["properties"]["osDiskSizeGB"] == 1024
    # AKS rejects disks under 30 GiB; a small request gets the minimum rather than a failed launch.
    assert agent_pool_body(machine(storage="10Gi"))["properties"]["osDiskSizeGB"] == 30


@pytest.mark.parametrize(
    ("m", "match"),
    [
        (machine(storage=None), "storage"),
        (machine(storage="0"), "more than 0"),
        (machine(storage="3Ti"), "at most 2048"),
        (machine(storage="lots"), "invalid quantity"),
        (machine(name="ws-1"), "agentpool name"),
    ],
)
def test_agent_pool_body_rejects_bad_machines(m: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        agent_pool_body(m)


def test_agent_pool_body_requires_instance_type() -> None:
    m = machine()
    m["spec"]["requirements"] = []
    with pytest.raises(InvalidRequest, match="instance type"):
        agent_pool_body(m)


def test_instance_from_pool() -> None:
    pool = {
        "name": "ws1",
        "properties": {
            "vmSize": "Standard_NC6s_v3",
            "provisioningState": "Creating",
            "nodeLabels": {"kaito.sh/creation-timestamp": "2025-01-02T03-04-05Z", "a": "b"},
            "nodeTaints": ["sku=gpu:NoSchedule", "k=:NoExecute", "garbage"],
            "nodeImageVersion": "img",
        },
    }
    inst = instance_from_pool(pool, provider_id=PID)
    assert inst.name == inst.machine_name == "ws1"
    assert inst.state is InstanceState.PENDING
    assert inst.provider_id == PID
    assert inst.labels["node.kubernetes.io/instance-type"] == "Standard_NC6s_v3"
    assert inst.taints == (Taint("sku", "NoSchedule", "gpu"), Taint("k", "NoExecute"))
    assert inst.node_selector == {"agentpool": "ws1", "kubernetes.azure.com/agentpool": "ws1"}
    assert inst.created_at == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert inst.image_id == "img"
    for state, expected in [
        ("Succeeded", InstanceState.RUNNING),
        ("Deleting", InstanceState.DELETING),
        ("Failed", InstanceState.FAILED),
        ("Canceled", InstanceState.FAILED),
        ("Upgrading", InstanceState.PENDING),
        ("Weird", InstanceState.UNKNOWN),
    ]:
        pool["properties"]["provisioningState"] = state  # type: ignore[index]
        assert instance_from_pool(pool).state is expected, state


def test_is_managed_pool() -> None:
    ours = {
        "karpenter.sh/provisioner-name": "default",
        "kaito.sh/machine-type": "gpu",
        "kaito.sh/workspace": "w",
    }
    assert is_managed_pool(ours)
    assert is_managed_pool({**ours, "kaito.sh/ragengine": "r"})
    assert not is_managed_pool({})  # a system pool
    assert not is_managed_pool({"kaito.sh/workspace": "w"})  # a user's pool that merely carries the label
    assert not is_managed_pool({k: v for k, v in ours.items() if k != "kaito.sh/workspace"})


# --- error classification ------------------------------------------------------------------------


def arm_error(
    status: int, code: str, message: str, details: list[dict[str, str]] | None = None
) -> HttpResponseError:
    """An HttpResponseError as azure-core builds it from an ARM error body (status, ODataV4 error)."""
    err = HttpResponseError(message=f"({code}) {message}")
    err.status_code = status
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    err.error = ODataV4Format({"error": body})
    return err


QUOTA_TEXT = (
    "Operation could not be completed as it results in exceeding approved standardNCSv3Family Cores quota. "
    "Current Limit: 0, Additional Required: 12"
)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (arm_error(404, "NotFound", "Agent Pool not found."), NotFound),
        (arm_error(409, "QuotaExceeded", QUOTA_TEXT), QuotaExceeded),
        (arm_error(400, "OperationNotAllowed", QUOTA_TEXT), QuotaExceeded),
        (
            arm_error(
                400,
                "SkuNotAvailable",
                "The requested VM size is currently not available in location 'eastus'.",
            ),
            SkuUnavailable,
        ),
        (
            arm_error(
                400,
                "BadRequest",
                "The VM size Standard_ND96 is not allowed in your subscription in location 'westus'",
            ),
            SkuUnavailable,
        ),
        (arm_error(200, "AllocationFailed", "Allocation failed."), CapacityUnavailable),
        (arm_error(409, "ZonalAllocationFailed", "no capacity in zone"), CapacityUnavailable),
        (arm_error(200, "OverconstrainedAllocationRequest", "too constrained"), CapacityUnavailable),
        (
            arm_error(
                200, "ReconcileVMSSAgentPoolFailed", 'Code="AllocationFailed" Message="Allocation failed."'
            ),
            CapacityUnavailable,
        ),
        (
            arm_error(
                200, "ReconcileVMSSAgentPoolFailed", "failed", [{"code": "QuotaExceeded", "message": "cores"}]
            ),
            QuotaExceeded,
        ),
        (
            arm_error(
                409,
                "OperationNotAllowed",
                "Operation is not allowed because there's an in progress create node pool operation",
            ),
            Conflict,
        ),
        (arm_error(409, "Conflict", "Another operation is in progress"), Conflict),
        (arm_error(409, "AnotherOperationInProgress", "busy"), Conflict),
        (arm_error(403, "AuthorizationFailed", "The client does not have authorization"), AuthFailed),
        (arm_error(400, "InvalidParameter", "osDiskSizeGB 5 is outside the allowed range"), InvalidRequest),
        (arm_error(500, "InternalServerError", "oops"), CloudError),
        (
            ClientAuthenticationError("AADSTS700024: client assertion is not within its valid time range"),
            AuthFailed,
        ),
        (ServiceRequestError("connection refused"), CloudError),
        (RuntimeError("boom"), CloudError),
    ],
)
def test_classify(exc: BaseException, kind: type[CloudError]) -> None:
    got = classify_azure_error(exc, operation="create", pool="ws1", vm_size="Standard_NC12s_v3")
    assert type(got) is kind
    assert "ws1" in got.message


def test_classified_errors_carry_reason_backoff_and_advice() -> None:
    quota = classify_azure_error(arm_error(409, "QuotaExceeded", QUOTA_TEXT), operation="create", pool="ws1")
    assert quota.reason == "QuotaExceeded"
    assert quota.backoff >= 60  # minutes, not a hot loop
    assert "quota increase" in quota.message and "standardNCSv3Family" in quota.message
    assert quota.code == "QuotaExceeded"
    conflict = classify_azure_error(arm_error(409, "Conflict", "in progress"), operation="create", pool="ws1")
    assert conflict.reason == "OperationInProgress"
    assert 1 <= conflict.backoff <= 60  # seconds
    sku = classify_azure_error(arm_error(400, "SkuNotAvailable", "nope"), operation="create", pool="ws1")
    assert sku.reason == "SkuUnavailable" and "another instance type" in sku.message
    capacity = classify_azure_error(arm_error(200, "AllocationFailed", "x"), operation="create", pool="ws1")
    assert capacity.reason == "InsufficientCapacity" and capacity.retryable
    invalid = classify_azure_error(arm_error(400, "InvalidParameter", "x"), operation="create", pool="ws1")
    assert not invalid.retryable


def test_classified_message_is_bounded() -> None:
    err = classify_azure_error(arm_error(500, "X", "y" * 5000), operation="get", pool="ws1")
    assert len(err.message) < 1000


def test_classify_passes_cloud_errors_through() -> None:
    original = Conflict("busy")
    assert classify_azure_error(original, operation="create", pool="p") is original


# --- configuration -------------------------------------------------------------------------------

BASE_ENV = {"ARM_SUBSCRIPTION_ID": " sub ", "ARM_RESOURCE_GROUP": "rg", "AZURE_CLUSTER_NAME": "c"}


def test_config_from_env_minimal_uses_managed_identity() -> None:
    cfg = AzureConfig.from_env(BASE_ENV)
    assert (cfg.subscription_id, cfg.resource_group, cfg.cluster_name) == ("sub", "rg", "c")
    assert cfg.credential_kind == "managed_identity"
    assert cfg.arm_endpoint == "" and cfg.node_resource_group == ""
    assert cfg.polling_interval == 10.0


def test_config_accepts_azure_spellings_and_derives_node_rg() -> None:
    cfg = AzureConfig.from_env(
        {
            "AZURE_SUBSCRIPTION_ID": "s",
            "AZURE_RESOURCE_GROUP": "r",
            "AZURE_CLUSTER_NAME": "c",
            "LOCATION": "eastus",
        }
    )
    assert (cfg.subscription_id, cfg.resource_group) == ("s", "r")
    assert cfg.node_resource_group == "MC_r_c_eastus"
    # ARM_* wins over AZURE_* (upstream's names first)
    both = AzureConfig.from_env({**BASE_ENV, "AZURE_SUBSCRIPTION_ID": "other"})
    assert both.subscription_id == "sub"


def test_config_workload_identity() -> None:
    cfg = AzureConfig.from_env(
        {
            **BASE_ENV,
            "AZURE_TENANT_ID": "t",
            "AZURE_CLIENT_ID": "cid",
            "AZURE_FEDERATED_TOKEN_FILE": "/var/run/secrets/azure/tokens/azure-identity-token",
            "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/",
        }
    )
    assert cfg.credential_kind == "workload_identity"
    assert cfg.authority_host == "https://login.microsoftonline.com/"


def test_config_client_secret_is_never_printed() -> None:
    cfg = AzureConfig.from_env(
        {**BASE_ENV, "AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "cid", "AZURE_CLIENT_SECRET": "s3cr3t-value"}
    )
    assert cfg.credential_kind == "client_secret"
    assert "s3cr3t-value" not in repr(cfg)


def test_config_managed_mode_uses_default_credential() -> None:
    cfg = AzureConfig.from_env({**BASE_ENV, "DEPLOYMENT_MODE": "Managed", "AZURE_FEDERATED_TOKEN_FILE": ""})
    assert cfg.credential_kind == "default"


def test_config_overrides() -> None:
    cfg = AzureConfig.from_env(
        {
            **BASE_ENV,
            "ARM_ENDPOINT": "https://127.0.0.1:8443",
            "ARM_CA_FILE": "/tmp/ca.pem",
            "ARM_POLLING_INTERVAL": "0.5",
            "ARM_OPERATION_TIMEOUT": "60",
            "AZURE_NODE_RESOURCE_GROUP": "nodes",
            "LOCATION": "westus",
        }
    )
    assert cfg.arm_endpoint == "https://127.0.0.1:8443"
    assert cfg.ca_file == "/tmp/ca.pem"
    assert cfg.polling_interval == 0.5 and cfg.operation_timeout == 60
    assert cfg.node_resource_group == "nodes"


def test_config_reports_every_problem() -> None:
    with pytest.raises(ConfigError) as e:
        AzureConfig.from_env({"AZURE_CLIENT_SECRET": "s3cr3t-value", "ARM_POLLING_INTERVAL": "soon"})
    text = str(e.value)
    for needle in (
        "ARM_SUBSCRIPTION_ID",
        "ARM_RESOURCE_GROUP",
        "AZURE_CLUSTER_NAME",
        "AZURE_TENANT_ID",
        "soon",
    ):
        assert needle in text
    assert "s3cr3t-value" not in text
    with pytest.raises(ConfigError, match="negative"):
        AzureConfig.from_env({**BASE_ENV, "ARM_OPERATION_TIMEOUT": "-1"})


def test_config_token_file_and_retries() -> None:
    cfg = AzureConfig.from_env(
        {
            **BASE_ENV,
            "ARM_TOKEN_FILE": "/run/token",
            "ARM_ENDPOINT": "https://127.0.0.1:8443",
            "ARM_MAX_RETRIES": "3",
        }
    )
    assert cfg.credential_kind == "token_file"
    assert cfg.max_retries == 3
    assert AzureConfig.from_env(BASE_ENV).max_retries is None
    with pytest.raises(ConfigError, match="ARM_MAX_RETRIES"):
        AzureConfig.from_env({**BASE_ENV, "ARM_MAX_RETRIES": "many"})


def test_failed_pool_carries_its_classified_provisioning_error() -> None:
    pool: dict[str, Any] = {
        "name": "ws1",
        "properties": {
            "vmSize": "Standard_NC6s_v3",
            "provisioningState": "Failed",
            "status": {
                "provisioningError": {
                    "code": "ReconcileVMSSAgentPoolFailed",
                    "message": 'Code="AllocationFailed" Message="Allocation failed."',
                }
            },
        },
    }
    inst = instance_from_pool(pool)
    assert inst.state is InstanceState.FAILED
    assert isinstance(inst.failure, CapacityUnavailable)
    assert "ws1" in inst.failure.message
    del pool["properties"]["status"]
    bare = instance_from_pool(pool)
    assert type(bare.failure) is CloudError and "no reason" in bare.failure.message
    pool["properties"]["provisioningState"] = "Succeeded"
    assert instance_from_pool(pool).failure is None


WORKLOAD_IDENTITY = {
    "AZURE_TENANT_ID": "t",
    "AZURE_CLIENT_ID": "cid",
    "AZURE_FEDERATED_TOKEN_FILE": "/var/run/secrets/azure/tokens/azure-identity-token",
}


def test_a_stray_token_file_does_not_replace_workload_identity() -> None:
    """ARM_TOKEN_FILE outranks every identity, so without ARM_ENDPOINT (a fake or non-default ARM) it is
    refused with a message naming both variables -- not silently used against public Azure."""
    with pytest.raises(ConfigError) as e:
        AzureConfig.from_env({**BASE_ENV, **WORKLOAD_IDENTITY, "ARM_TOKEN_FILE": "/tmp/token"})
    assert "ARM_TOKEN_FILE" in str(e.value) and "ARM_ENDPOINT" in str(e.value)
    with pytest.raises(ConfigError, match="ARM_ENDPOINT"):
        AzureConfig(subscription_id="s", resource_group="r", cluster_name="c", token_file="/tmp/token")


def test_token_file_over_a_configured_identity_is_warned_about(tmp_path: Path) -> None:
    """With ARM_ENDPOINT the token file is used, and the identity it overrides is named in a warning."""
    token = tmp_path / "token"
    token.write_text("t0ken")
    cfg = AzureConfig.from_env(
        {**BASE_ENV, **WORKLOAD_IDENTITY, "ARM_TOKEN_FILE": str(token), "ARM_ENDPOINT": "https://127.0.0.1:1"}
    )
    assert cfg.credential_kind == "token_file"
    with structlog.testing.capture_logs() as logs:
        credential = build_credential(cfg)
    assert isinstance(credential, FileTokenCredential)
    (warning,) = [e for e in logs if e["log_level"] == "warning"]
    assert "overrides the configured Azure identity" in warning["event"]
    assert "workload identity" in warning["ignored_identity"]
    # Without a configured identity (a fake ARM in a demo) there is nothing to warn about.
    plain = AzureConfig.from_env(
        {**BASE_ENV, "ARM_TOKEN_FILE": str(token), "ARM_ENDPOINT": "https://127.0.0.1:1"}
    )
    with structlog.testing.capture_logs() as logs:
        build_credential(plain)
    assert [e for e in logs if e["log_level"] == "warning"] == []
