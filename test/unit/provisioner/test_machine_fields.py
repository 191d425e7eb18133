"""Machine field readers and Kubernetes quantity conversion."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from provisioner import machine_fields as mf
from provisioner.machine_fields import MachineFieldError, Taint


def machine(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "karpenter.sh/v1alpha5",
        "kind": "Machine",
        "metadata": {
            "name": "ws1a2b3c4d5",
            "uid": "u-1",
            "creationTimestamp": "2025-01-02T03:04:05Z",
            "labels": {"kaito.sh/workspace": "w", "kaito.sh/workspacenamespace": "ns", "app": "x"},
            "annotations": {"kaito.sh/node-image-family": "AzureLinux"},
        },
        "spec": {
            "requirements": [
                {
                    "key": "node.kubernetes.io/instance-type",
                    "operator": "In",
                    "values": ["Standard_NC12s_v3", "B"],
                },
                {"key": "karpenter.sh/provisioner-name", "operator": "In", "values": ["default"]},
                {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
                {"key": "kubernetes.io/arch", "operator": "NotIn", "values": ["arm64"]},
            ],
            "taints": [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
            "startupTaints": [{"key": "boot", "effect": "NoExecute"}],
            "resources": {"requests": {"storage": "120Gi", "nvidia.com/gpu": "2"}},
            **spec,
        },
        "status": {"providerID": "kwok://n1", "nodeName": "n1"},
    }


def test_reads_metadata() -> None:
    m = machine()
    assert mf.machine_name(m) == "ws1a2b3c4d5"
    assert mf.machine_uid(m) == "u-1"
    assert mf.machine_labels(m)["kaito.sh/workspace"] == "w"
    assert mf.machine_annotations(m) == {"kaito.sh/node-image-family": "AzureLinux"}
    assert mf.is_kaito_machine(m)
    assert mf.creation_timestamp(m) == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert mf.provider_id(m) == "kwok://n1"
    assert mf.node_name(m) == "n1"


def test_helpers_do_not_mutate_or_alias_input() -> None:
    m = machine()
    before = copy.deepcopy(m)
    mf.machine_labels(m)["new"] = "x"
    mf.resource_requests(m)["storage"] = "1Gi"
    assert m == before


def test_missing_sections_are_tolerated() -> None:
    m: dict[str, Any] = {"metadata": {"name": "a"}}
    assert mf.instance_type(m) is None
    assert mf.taints(m) == []
    assert mf.machine_labels(m) == {}
    assert mf.storage_request(m) is None
    assert mf.provider_id(m) == ""
    assert not mf.is_kaito_machine(m)
    with pytest.raises(MachineFieldError):
        mf.machine_name({})


def test_instance_type_is_first_value_of_in_requirement() -> None:
    assert mf.instance_type(machine()) == "Standard_NC12s_v3"
    notin = machine(
        requirements=[{"key": "node.kubernetes.io/instance-type", "operator": "NotIn", "values": ["A"]}]
    )
    assert mf.instance_type(notin) is None
    with pytest.raises(MachineFieldError, match="no requirement for instance type"):
        mf.require_instance_type(notin)


def test_single_value_requirement_labels() -> None:
    labels = mf.single_value_requirement_labels(machine())
    assert labels == {"karpenter.sh/provisioner-name": "default", "kubernetes.io/os": "linux"}


def test_taints() -> None:
    m = machine()
    assert mf.taints(m) == [Taint("sku", "NoSchedule", "gpu")]
    assert mf.startup_taints(m) == [Taint("boot", "NoExecute")]
    assert Taint("sku", "NoSchedule", "gpu").to_aks() == "sku=gpu:NoSchedule"
    assert Taint("k", "NoExecute").to_aks() == "k=:NoExecute"
    assert Taint("k", "NoExecute").to_dict() == {"key": "k", "effect": "NoExecute"}
    with pytest.raises(MachineFieldError, match="effect"):
        mf.taints(machine(taints=[{"key": "a", "effect": "Sometimes"}]))
    with pytest.raises(MachineFieldError, match="no key"):
        mf.taints(machine(taints=[{"effect": "NoSchedule"}]))


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ("120Gi", Decimal(120 * 2**30)),
        ("100G", Decimal(10**11)),
        ("1Ti", Decimal(2**40)),
        ("1.5Gi", Decimal(3 * 2**29)),
        ("500m", Decimal("0.5")),
        ("1e3", Decimal(1000)),
        ("2E1", Decimal(20)),
        ("400", Decimal(400)),
        ("128974848", Decimal(128974848)),
        ("129e6", Decimal(129000000)),
        ("123Mi", Decimal(123 * 2**20)),
        (" 5k ", Decimal(5000)),
        (7, Decimal(7)),
    ],
)
def test_parse_quantity(quantity: str | int, expected: Decimal) -> None:
    assert mf.parse_quantity(quantity) == expected


@pytest.mark.parametrize("bad", ["", "Gi", "12Gb", "1.2.3", "10 Gi", "abc", "1Kii"])
def test_parse_quantity_rejects_garbage(bad: str) -> None:
    with pytest.raises(MachineFieldError):
        mf.parse_quantity(bad)


@pytest.mark.parametrize(
    ("quantity", "gib"),
    [
        ("120Gi", 120),
        ("100G", 94),
        ("1Ti", 1024),
        ("50Gi", 50),
        ("1Gi", 1),
        ("1", 1),
        ("0", 0),
        ("1025Mi", 2),
    ],
)
def test_quantity_to_gib_rounds_up(quantity: str, gib: int) -> None:
    assert mf.quantity_to_gib(quantity) == gib


def test_os_disk_size_requires_positive_storage() -> None:
    assert mf.os_disk_size_gib(machine()) == 120
    no_storage = machine(resources={"requests": {}})
    with pytest.raises(MachineFieldError, match=r"no spec\.resources\.requests\.storage"):
        mf.os_disk_size_gib(no_storage)
    with pytest.raises(MachineFieldError, match="more than 0"):
        mf.os_disk_size_gib(machine(resources={"requests": {"storage": "0"}}))
    with pytest.raises(MachineFieldError, match="negative"):
        mf.os_disk_size_gib(machine(resources={"requests": {"storage": "-1Gi"}}))


def test_creation_label_round_trip() -> None:
    when = datetime(2025, 6, 7, 8, 9, 10, tzinfo=UTC)
    label = mf.format_creation_label(when)
    assert label == "2025-06-07T08-09-10Z"
    assert ":" not in label
    assert mf.parse_creation_label(label) == when
    assert mf.parse_creation_label("yesterday") is None
