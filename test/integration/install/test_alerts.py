"""The alerting rules: proven by ``promtool test rules`` (the real binary, Debian's prometheus package),
and shipped identically as a raw rules file, a kustomize PrometheusRule and the chart's PrometheusRule.

alerts_test.yaml holds the cases: every alert fires in one and stays quiet in another.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from test.integration.install.helpers import CONFIG, load_docs, render_helm, render_kustomize

HERE = Path(__file__).resolve().parent
ALERTS = CONFIG / "prometheus" / "alerts.yaml"
CASES = HERE / "alerts_test.yaml"


def promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run Debian's promtool (its exit status is for the caller to judge)."""
    path = shutil.which("promtool")
    assert path, "promtool is missing: make sysdeps (Debian's prometheus package)"
    return subprocess.run(
        [path, *map(str, args)], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def raw_groups() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert isinstance(groups, list) and groups
    return groups


def alert_names(groups: list[dict[str, Any]]) -> set[str]:
    return {r["alert"] for g in groups for r in g["rules"] if "alert" in r}


def prometheus_rules(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == "PrometheusRule"]


def run_promtool_tests(rules: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run alerts_test.yaml's cases against ``rules`` (a copy of the cases pointing at that file)."""
    cases = yaml.safe_load(CASES.read_text())
    cases["rule_files"] = [str(rules)]
    case_file = tmp_path / "cases.yaml"
    case_file.write_text(yaml.safe_dump(cases, sort_keys=False))
    return promtool("test", "rules", case_file)


def test_rules_file_is_valid() -> None:
    proc = promtool("check", "rules", ALERTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_proves_every_alert() -> None:
    proc = promtool("test", "rules", CASES, cwd=HERE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(CASES.read_text())["tests"]:
        for check in case.get("alert_rule_test") or ():
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = alert_names(raw_groups())
    assert names - fired == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"


def test_broken_rules_fail_the_cases(tmp_path: Path) -> None:
    """The cases can fail: with every threshold doubled, the firing cases no longer fire."""
    broken = tmp_path / "alerts.yaml"
    text = ALERTS.read_text()
    for threshold in ("> 3600", "> 1800", "> 0.1", "< 1"):
        assert threshold in text, threshold
    broken.write_text(
        text.replace("> 3600", "> 7200").replace("> 1800", "> 3600").replace("> 0.1", "> 1.5")
        .replace("< 1", "< 0")
    )  # fmt: skip
    proc = run_promtool_tests(broken, tmp_path)
    assert proc.returncode != 0
    failed = {n for n in alert_names(raw_groups()) if f"alertname: {n}," in proc.stdout + proc.stderr}
    assert failed == alert_names(raw_groups()), proc.stdout


def test_chart_renders_the_raw_rules_and_they_pass_the_same_cases(tmp_path: Path) -> None:
    (rule,) = prometheus_rules(render_helm())
    assert rule["spec"]["groups"] == raw_groups()
    rendered = tmp_path / "chart-rules.yaml"
    rendered.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    proc = run_promtool_tests(rendered, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kustomize_prometheusrule_holds_the_raw_rules() -> None:
    (rule,) = prometheus_rules(render_kustomize())
    assert rule["spec"]["groups"] == raw_groups(), (
        "config/prometheus/prometheusrule.yaml differs from alerts.yaml: copy alerts.yaml's groups into it"
    )


@pytest.mark.parametrize(
    ("settings", "groups"),
    [
        ((), ["kaito-workspace", "gpu-provisioner"]),
        (("provisioner.enabled=false",), ["kaito-workspace"]),
        (("metrics.serviceMonitor.enabled=false",), []),
        (("metrics.serviceMonitor.enabled=false", "metrics.prometheusRule.enabled=true"),
         ["kaito-workspace", "gpu-provisioner"]),
        (("metrics.prometheusRule.enabled=false",), []),
    ],
)  # fmt: skip
def test_chart_rule_switches(settings: tuple[str, ...], groups: list[str]) -> None:
    args = [a for s in settings for a in ("--set", s)]
    rules = prometheus_rules(render_helm(*args))
    assert [g["name"] for r in rules for g in r["spec"]["groups"]] == groups


def test_chart_rule_labels_reach_the_object() -> None:
    (rule,) = prometheus_rules(render_helm("--set", "metrics.prometheusRule.labels.release=prom"))
    assert rule["metadata"]["labels"]["release"] == "prom"
    assert rule["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kaito"


def test_raw_rules_file_is_not_a_kubernetes_object() -> None:
    """alerts.yaml is for rule_files; kustomize must not pick it up as a resource."""
    assert all("kind" not in d for d in load_docs(ALERTS.read_text()))
