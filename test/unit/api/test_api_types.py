"""Workspace and Machine types: upstream manifests parse unchanged; helpers behave."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from kaito.api.conditions import Condition, ConditionType, find_condition, set_condition
from kaito.api.machine import Machine
from kaito.api.quantity import QuantityError, format_gib, parse_quantity, to_gib
from kaito.api.workspace import Workspace

SAMPLES = Path(__file__).resolve().parents[3] / "config" / "samples"

UPSTREAM_EXAMPLES = [
    # examples/inference/kaito_workspace_falcon_7b_aws.yaml (v0.4.0)
    """
apiVersion: kaito.sh/v1alpha1
kind: Workspace
metadata:
  name: workspace-falcon-7b-aws
resource:
  instanceType: "g5.4xlarge"
  labelSelector:
    matchLabels:
      apps: falcon-7b
inference:
  preset:
    name: "falcon-7b"
""",
    # examples/inference/kaito_workspace_llama2_7b.yaml (private image)
    """
apiVersion: kaito.sh/v1alpha1
kind: Workspace
metadata:
  name: workspace-llama-2-7b
resource:
  instanceType: "Standard_NC12s_v3"
  labelSelector:
    matchLabels:
      apps: llama-2-7b
inference:
  preset:
    name: "llama-2-7b"
    accessMode: private
    presetOptions:
      image: <YOUR IMAGE URL>
      imagePullSecrets:
        - <IMAGE PULL SECRETS>
""",
    # examples/inference/kaito_workspace_falcon_7b_with_adapters.yaml
    """
apiVersion: kaito.sh/v1alpha1
kind: Workspace
metadata:
  name: workspace-falcon-7b
resource:
  instanceType: "Standard_NC12s_v3"
  labelSelector:
    matchLabels:
      apps: falcon-7b
inference:
  preset:
    name: "falcon-7b"
  adapters:
    - source:
        name: "falcon-7b-adapter"
        image: "<YOUR_IMAGE>"
      strength: "0.2"
""",
    # v0.4.6 style: v1beta1 with an inference config
    """
apiVersion: kaito.sh/v1beta1
kind: Workspace
metadata:
  name: workspace-deepseek-r1-distill-qwen-14b
resource:
  instanceType: "Standard_NC24ads_A100_v4"
  labelSelector:
    matchLabels:
      apps: deepseek-r1-distill-qwen-14b
inference:
  preset:
    name: "deepseek-r1-distill-qwen-14b"
  config: "ds-inference-params"
""",
]


def _samples() -> list[Path]:
    return sorted(SAMPLES.glob("*.yaml"))


def test_seed_samples_exist() -> None:
    names = {p.name for p in _samples()}
    assert {"kaito_workspace_phi_3.yaml", "kaito_workspace_phi_3_with_adapters.yaml"} <= names
    assert len(names) >= 3


@pytest.mark.parametrize("text", [p.read_text() for p in _samples()] + UPSTREAM_EXAMPLES)
def test_upstream_manifests_parse_and_round_trip(text: str) -> None:
    raw = yaml.safe_load(text)
    ws = Workspace.model_validate(raw)
    out = ws.to_dict()

    # Everything the user wrote comes back unchanged (defaults may be added, nothing lost or renamed).
    def contains(big: object, small: object) -> bool:
        if isinstance(small, dict):
            return isinstance(big, dict) and all(k in big and contains(big[k], v) for k, v in small.items())
        return big == small

    assert contains(out, raw), (out, raw)
    assert ws.resource.count == 1


def test_defaults_match_spec() -> None:
    ws = Workspace.model_validate(yaml.safe_load(UPSTREAM_EXAMPLES[2]))
    assert ws.inference is not None and ws.inference.preset is not None
    assert ws.inference.preset.access_mode == "public"
    adapters = ws.inference.adapters or []
    assert adapters[0].strength == "0.2"
    no_strength = Workspace.model_validate(
        {
            **yaml.safe_load(UPSTREAM_EXAMPLES[2]),
            "inference": {"preset": {"name": "falcon-7b"}, "adapters": [{}]},
        }
    )
    assert no_strength.inference is not None and (no_strength.inference.adapters or [])[0].strength == "1.0"


def test_label_selector_as_map() -> None:
    ws = Workspace.model_validate(
        {
            "metadata": {"name": "x"},
            "resource": {
                "labelSelector": {
                    "matchLabels": {"a": "1"},
                    "matchExpressions": [
                        {"key": "b", "operator": "In", "values": ["2"]},
                        {"key": "c", "operator": "In", "values": ["3", "4"]},
                    ],
                }
            },
            "inference": {"preset": {"name": "phi-2"}},
        }
    )
    assert ws.resource.label_selector.as_map() == {"a": "1", "b": "2"}
    assert ws.preset_name() == "phi-2"


def test_quantities() -> None:
    assert parse_quantity("1Gi") == 1024**3
    assert parse_quantity("500m") == Decimal("0.5")
    assert parse_quantity("1e3") == 1000
    assert parse_quantity("400") == 400
    assert to_gib("16.5Gi") == Decimal("16.5")
    assert format_gib(Decimal("16.50")) == "16.5Gi"
    with pytest.raises(QuantityError):
        parse_quantity("16 GB")


def test_set_condition_only_moves_transition_time_on_status_change() -> None:
    conds: list[Condition] = []
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    t1 = datetime(2025, 1, 2, tzinfo=UTC)
    assert set_condition(conds, ConditionType.RESOURCE_READY, "False", "Pending", "waiting", 1, now=t0)
    assert not set_condition(conds, ConditionType.RESOURCE_READY, "False", "Pending", "waiting", 1, now=t1)
    assert set_condition(conds, ConditionType.RESOURCE_READY, "False", "Pending", "still waiting", 1, now=t1)
    found = find_condition(conds, ConditionType.RESOURCE_READY)
    assert found is not None and found.last_transition_time == t0
    assert set_condition(conds, ConditionType.RESOURCE_READY, "True", "Ready", "", 2, now=t1)
    assert found.last_transition_time == t1 and found.observed_generation == 2
    dumped = found.model_dump(by_alias=True, mode="json")
    assert dumped["lastTransitionTime"].startswith("2025-01-02T00:00:00")


def test_machine_keeps_unknown_fields() -> None:
    raw = {
        "apiVersion": "karpenter.sh/v1alpha5",
        "kind": "Machine",
        "metadata": {"name": "ws0123456789", "labels": {"kaito.sh/workspace": "w"}},
        "spec": {
            "requirements": [
                {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["Standard_NC6s_v3"]}
            ],
            "resources": {"requests": {"storage": "50Gi", "nvidia.com/gpu": 1}},
            "taints": [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
            "machineTemplateRef": {"name": "ws0123456789"},
            "somethingNew": {"x": 1},
        },
        "status": {
            "providerID": "azure:///x",
            "nodeName": "aks-ws0123456789-1-vmss000000",
            "conditions": [{"type": "Ready", "status": "True", "severity": "Info"}],
            "lastPodEventTime": "2025-01-01T00:00:00Z",
        },
    }
    m = Machine.model_validate(raw)
    assert m.spec.instance_type() == "Standard_NC6s_v3"
    assert m.status is not None and m.status.is_ready()
    out = m.to_dict()
    assert out["spec"]["somethingNew"] == {"x": 1}
    assert out["status"]["lastPodEventTime"] == "2025-01-01T00:00:00Z"
    assert out["status"]["providerID"] == "azure:///x"
    assert out["spec"]["resources"]["requests"] == {"storage": "50Gi", "nvidia.com/gpu": "1"}


def test_validation_errors_are_described_without_input_values() -> None:
    """A pydantic error (echoed into an InvalidSpec Event and admission responses) names the field and
    the problem, never the value given -- a signed URL or a token may be that value."""
    from pydantic import ValidationError

    from kaito.api.meta import describe_validation_error
    from kaito.api.workspace import Workspace

    signed = "https://blob.example/d.json?sig=s1gn4ture"
    doc = {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": "w", "namespace": "n"},
        "tuning": {"preset": {"name": "p"}, "method": "qlora", "input": {"urls": signed}, "output": {}},
    }
    try:
        Workspace.model_validate(doc)
    except ValidationError as e:
        assert "s1gn4ture" in str(e), "the case must be one whose pydantic text quotes the input"
        described = describe_validation_error(e)
    else:
        raise AssertionError("the document should not validate")
    assert "tuning.input.urls" in described
    assert "s1gn4ture" not in described and "blob.example" not in described, described
