"""The checked-in CRDs are exactly what the generator makes, and carry the promised shape."""

from __future__ import annotations

from typing import Any

import yaml

from hack.gen_crds import main as gen_main
from kaito.api.crdgen import all_crds, default_crd_dir, machine_crd, workspace_crd


def test_checked_in_crds_are_up_to_date() -> None:
    for name, text in all_crds().items():
        path = default_crd_dir() / name
        assert path.exists(), f"{path} missing: run python hack/gen_crds.py"
        assert path.read_text() == text, f"{path} is stale: run python hack/gen_crds.py"
    assert gen_main(["--check"]) == 0


def test_check_mode_reports_stale_files(tmp_path: Any) -> None:
    (tmp_path / "kaito.sh_workspaces.yaml").write_text("stale\n")
    assert gen_main(["--check", "--out", str(tmp_path)]) == 1
    assert gen_main(["--out", str(tmp_path)]) == 0
    assert gen_main(["--check", "--out", str(tmp_path)]) == 0


def _rules(node: dict[str, Any]) -> list[str]:
    return [v["rule"] for v in node.get("x-kubernetes-validations", [])]


def test_workspace_crd_shape() -> None:
    crd = workspace_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "workspaces.kaito.sh"
    assert spec["names"]["shortNames"] == ["wk", "wks"]
    assert spec["scope"] == "Namespaced"
    versions = {v["name"]: v for v in spec["versions"]}
    assert set(versions) == {"v1alpha1", "v1beta1"}
    assert versions["v1alpha1"]["storage"] is True and versions["v1beta1"]["storage"] is False
    assert versions["v1alpha1"]["schema"] == versions["v1beta1"]["schema"]
    for v in versions.values():
        assert v["served"] is True
        assert v["subresources"] == {"status": {}}
        cols = v["additionalPrinterColumns"]
        default_cols = [c["name"].upper() for c in cols if not c.get("priority")]
        wide_cols = [c["name"].upper() for c in cols if c.get("priority") == 1]
        assert default_cols == ["INSTANCE", "RESOURCEREADY", "INFERENCEREADY", "WORKSPACEREADY", "AGE"]
        assert wide_cols == ["JOBSTARTED", "WORKSPACESUCCEEDED", "STATE"]


def test_workspace_schema_defaults_and_cel_rules() -> None:
    schema = workspace_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    props = schema["properties"]
    assert any("has(self.inference) || has(self.tuning)" in r for r in _rules(schema))
    assert any("!(has(self.inference) && has(self.tuning))" in r for r in _rules(schema))
    res = props["resource"]["properties"]
    assert res["count"]["default"] == 1 and res["count"]["minimum"] == 1
    for field in ("count", "instanceType", "labelSelector"):
        assert "self == oldSelf" in _rules(res[field]), field
    assert any("matchLabels" in r for r in _rules(res["labelSelector"]))
    inference = props["inference"]["properties"]
    assert "self == oldSelf" in _rules(inference["preset"])
    assert inference["preset"]["properties"]["accessMode"]["default"] == "public"
    assert inference["adapters"]["items"]["properties"]["strength"]["default"] == "1.0"
    assert inference["template"]["x-kubernetes-preserve-unknown-fields"] is True
    tuning = props["tuning"]["properties"]
    assert "self == oldSelf" in _rules(tuning["preset"])
    assert any("oldSelf" in r for r in _rules(tuning["method"]))
    # Required fields are reported by has() rules with a message saying what to set (not a bare
    # "Required value"), so they leave the schema's own required lists.
    required_rules = {
        r["fieldPath"]: r
        for r in props["tuning"]["x-kubernetes-validations"]
        if r.get("reason") == "FieldValueRequired"
    }
    assert set(required_rules) == {".input", ".output", ".preset", ".method"}
    assert "required" not in props["tuning"]
    assert "has(self.labelSelector)" in _rules(props["resource"]) and "required" not in props["resource"]
    assert "has(self.resource)" in _rules(schema) and "required" not in schema
    # A field's own rules (immutability) join its model's rules (preset.name required).
    assert _rules(tuning["preset"]) == ["has(self.name)", "self == oldSelf"]
    name_rule = next(r for r in schema["x-kubernetes-validations"] if "metadata.name" in r["rule"])
    assert name_rule["fieldPath"] == ".metadata.name"
    # Structural: no unresolved refs, unions or titles anywhere.
    text = yaml.safe_dump(schema)
    for banned in ("$ref", "allOf", "title:", "additionalProperties: true"):
        assert banned not in text


def test_machine_crd_shape() -> None:
    crd = machine_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "machines.karpenter.sh"
    assert spec["scope"] == "Cluster"
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha5" and version["subresources"] == {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]["properties"]
    assert schema["spec"]["x-kubernetes-preserve-unknown-fields"] is True
    assert schema["status"]["x-kubernetes-preserve-unknown-fields"] is True
    requests = schema["spec"]["properties"]["resources"]["properties"]["requests"]
    assert requests["additionalProperties"]["x-kubernetes-int-or-string"] is True
    assert "providerID" in schema["status"]["properties"]
