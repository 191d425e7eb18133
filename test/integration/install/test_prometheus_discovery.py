"""hack/prometheus.py against the local apiserver: a real Prometheus (Debian's binary) discovers, through
Kubernetes service discovery, exactly the endpoints the chart's ServiceMonitors select, scrapes them and
answers a query with what they served.

No pods run here: each metrics Service of the chart (rendered into this test's namespace, selector
removed) gets an EndpointSlice pointing to a real /metrics server on 127.0.0.1 that this test runs. A
decoy Service per wrong reason (webhook component, wrong port name, another namespace's selection)
points to a server of its own, which must never be scraped.
"""

from __future__ import annotations

import http.server
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from hack.localcluster import LocalCluster
from hack.prometheus import PrometheusServer, scrape_configs_from_servicemonitors
from test.integration.install.helpers import CHART, load_docs, run, tools_dir

METRICS_SERVICES = {"kaito-workspace-metrics": 3.0, "gpu-provisioner-metrics": 1.0}


@dataclass
class MetricsServer:
    """A /metrics endpoint on 127.0.0.1 serving ``kaito_workspace_count{state="Ready"} <value>``."""

    value: float
    server: http.server.ThreadingHTTPServer
    thread: threading.Thread
    scrapes: int = 0

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


def start_metrics_server(value: float) -> MetricsServer:
    registry = CollectorRegistry()
    Gauge("kaito_workspace_count", "Number of workspaces by state.", ["state"], registry=registry).labels(
        "Ready"
    ).set(value)
    body = generate_latest(registry)
    holder: list[MetricsServer] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/metrics":
                self.send_error(404)
                return
            holder[0].scrapes += 1
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name=f"metrics-{value}", daemon=True)
    ms = MetricsServer(value, server, thread)
    holder.append(ms)
    thread.start()
    return ms


@pytest.fixture
def metrics_servers() -> Iterator[dict[str, MetricsServer]]:
    """One server per metrics Service plus one per decoy; shut down and joined afterwards."""
    servers = {name: start_metrics_server(v) for name, v in METRICS_SERVICES.items()}
    servers.update({f"decoy-{i}": start_metrics_server(100.0 + i) for i in range(3)})
    try:
        yield servers
    finally:
        for s in servers.values():
            s.server.shutdown()
            s.server.server_close()
            s.thread.join(timeout=10)


@pytest.fixture
def test_namespace(control_plane: LocalCluster) -> Iterator[str]:
    name = f"t-prom-{secrets.token_hex(3)}"
    control_plane.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


def endpoint_slice(namespace: str, service: str, port_name: str, port: int) -> dict[str, Any]:
    """A slice for ``service`` with one ready endpoint on 127.0.0.1 (a pod's name as its target)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-test",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": ["127.0.0.1"],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "name": f"{service}-pod", "namespace": namespace},
            }
        ],
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
    }


def selectorless(service: dict[str, Any]) -> dict[str, Any]:
    """The Service as the chart renders it, minus its pod selector (its endpoints are ours to write)."""
    out = {**service, "spec": {k: v for k, v in service["spec"].items() if k != "selector"}}
    return out


def test_prometheus_scrapes_exactly_what_the_servicemonitors_select(
    control_plane: LocalCluster,
    test_namespace: str,
    metrics_servers: dict[str, MetricsServer],
    tmp_path: Path,
) -> None:
    rendered = load_docs(
        run([tools_dir() / "helm", "template", "kaito", CHART, "--namespace", test_namespace]).stdout
    )
    monitors = [o for o in rendered if o["kind"] == "ServiceMonitor"]
    services = {o["metadata"]["name"]: o for o in rendered if o["kind"] == "Service"}
    assert len(monitors) == 2 and set(METRICS_SERVICES) <= set(services)

    objects: list[dict[str, Any]] = []
    for name in METRICS_SERVICES:
        objects.append(selectorless(services[name]))
        objects.append(endpoint_slice(test_namespace, name, "http-metrics", metrics_servers[name].port))
    # Decoys: the webhook Service (component "webhook", not "metrics"), even with an http-metrics port;
    decoy_webhook = selectorless(services["kaito-workspace-webhook"])
    objects.append(decoy_webhook)
    objects.append(
        endpoint_slice(
            test_namespace, "kaito-workspace-webhook", "http-metrics", metrics_servers["decoy-0"].port
        )
    )
    # a Service labelled like ours whose port has another name;
    wrong_port = selectorless(services["kaito-workspace-metrics"])
    wrong_port = {**wrong_port, "metadata": {**wrong_port["metadata"], "name": "kaito-workspace-metrics-2"}}
    objects.append(wrong_port)
    objects.append(
        endpoint_slice(
            test_namespace, "kaito-workspace-metrics-2", "metrics", metrics_servers["decoy-1"].port
        )
    )
    for obj in objects:
        control_plane.apply(obj)
    # and ours again in a namespace the ServiceMonitors do not name.
    other = f"{test_namespace}-other"
    control_plane.kubectl("create", "namespace", other)
    try:
        elsewhere = selectorless(services["kaito-workspace-metrics"])
        elsewhere = {**elsewhere, "metadata": {**elsewhere["metadata"], "namespace": other}}
        control_plane.apply(elsewhere)
        control_plane.apply(
            endpoint_slice(other, "kaito-workspace-metrics", "http-metrics", metrics_servers["decoy-2"].port)
        )

        jobs = scrape_configs_from_servicemonitors(monitors, control_plane.kubeconfig, scrape_interval="1s")
        with PrometheusServer(jobs, workdir=tmp_path / "prometheus") as prom:
            targets = prom.wait_targets_up(count=2, timeout=60)
            by_job = {t["labels"]["job"]: t for t in targets}
            assert set(by_job) == set(METRICS_SERVICES)
            for name, t in by_job.items():
                assert t["scrapeUrl"] == f"http://127.0.0.1:{metrics_servers[name].port}/metrics"
                assert t["labels"]["namespace"] == test_namespace
                assert t["labels"]["service"] == name
                assert t["labels"]["endpoint"] == "http-metrics"
                assert t["labels"]["pod"] == f"{name}-pod"
            # Queried back from Prometheus' own storage, one series per Service.
            result = prom.wait_query('kaito_workspace_count{state="Ready"}', timeout=30)
            values = {r["metric"]["job"]: float(r["value"][1]) for r in result}
            assert values == METRICS_SERVICES
            # Discovery saw the decoys (they are Services in the watched namespaces) and dropped them.
            assert all(metrics_servers[f"decoy-{i}"].scrapes == 0 for i in range(3))
            assert len(prom.targets()) == 2
    finally:
        control_plane.kubectl("delete", "namespace", other, "--wait=false", check=False)


def test_selection_rules_follow_the_servicemonitor() -> None:
    """The relabel rules are derived from the objects: another label or port changes them."""
    sm: dict[str, Any] = {
        "kind": "ServiceMonitor",
        "metadata": {"name": "x", "namespace": "ns"},
        "spec": {
            "namespaceSelector": {"matchNames": ["ns"]},
            "selector": {"matchLabels": {"app.kubernetes.io/name": "x", "tier": "a.b"}},
            "endpoints": [{"port": "web", "path": "/m", "interval": "30s"}],
        },
    }
    (job,) = scrape_configs_from_servicemonitors([sm], Path("/k"))
    assert job["job_name"] == "serviceMonitor/ns/x/0"
    assert job["metrics_path"] == "/m" and job["scrape_interval"] == "30s"
    assert job["kubernetes_sd_configs"] == [
        {"role": "endpointslice", "kubeconfig_file": "/k", "namespaces": {"names": ["ns"]}}
    ]
    keeps = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert keeps == [
        {
            "action": "keep",
            "source_labels": [
                "__meta_kubernetes_service_label_app_kubernetes_io_name",
                "__meta_kubernetes_service_labelpresent_app_kubernetes_io_name",
            ],
            "regex": "(x);true",
        },
        {
            "action": "keep",
            "source_labels": [
                "__meta_kubernetes_service_label_tier",
                "__meta_kubernetes_service_labelpresent_tier",
            ],
            "regex": r"(a\.b);true",
        },
        {"action": "keep", "source_labels": ["__meta_kubernetes_endpointslice_port_name"], "regex": "web"},
    ]
    sm["spec"]["selector"] = {"matchExpressions": [{"key": "a", "operator": "Exists"}]}
    with pytest.raises(ValueError, match="matchExpressions"):
        scrape_configs_from_servicemonitors([sm], Path("/k"))
