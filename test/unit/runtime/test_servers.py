"""Probe and metrics servers over real HTTP; /metrics parses and carries controller-runtime's names."""

from __future__ import annotations

import io
import json
import logging

import aiohttp
import structlog
from prometheus_client.parser import text_string_to_metric_families

from kaito.runtime import metrics
from kaito.runtime.controller import Controller, Result
from kaito.runtime.health import HttpServer, Probes, metrics_app
from kaito.runtime.kube import REST_CLIENT_REQUESTS
from kaito.runtime.leader_election import micro_time
from kaito.runtime.logging import configure_logging

SPEC_NAMES = {
    "controller_runtime_reconcile_total",
    "controller_runtime_reconcile_errors_total",
    "controller_runtime_reconcile_time_seconds",
    "controller_runtime_max_concurrent_reconciles",
    "controller_runtime_active_workers",
    "workqueue_depth",
    "workqueue_adds_total",
    "workqueue_queue_duration_seconds",
    "workqueue_work_duration_seconds",
    "workqueue_retries_total",
    "workqueue_unfinished_work_seconds",
    "workqueue_longest_running_processor_seconds",
    "leader_election_master_status",
    "rest_client_requests_total",
}


async def test_probes_report_checks() -> None:
    probes = Probes()
    ready = False
    probes.add_ready_check("informers-synced", lambda: ready)
    server = HttpServer(probes.app(), "127.0.0.1", 0, "probes")
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{server.port}"
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200 and await r.text() == "ok"
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 500
            async with http.get(f"{base}/readyz?verbose") as r:
                assert "[-]informers-synced failed" in await r.text()
            ready = True
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 200
    finally:
        await server.stop()


async def test_metrics_endpoint_parses_and_has_spec_names() -> None:
    async def reconcile(key: str) -> Result | None:
        return None

    Controller("servers-test", reconcile, workers=2)  # registers its label sets at 0
    metrics.LEADER_ELECTION_MASTER_STATUS.labels("servers-test").set(0)
    REST_CLIENT_REQUESTS.labels("200", "GET", "127.0.0.1:1").inc()
    server = HttpServer(metrics_app(), "127.0.0.1", 0, "metrics")
    await server.start()
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{server.port}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    finally:
        await server.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    names = set()
    for fam in families.values():
        for sample in fam.samples:
            names.add(sample.name)
        names.add(fam.name)
    missing = {n for n in SPEC_NAMES if n not in names and n.removesuffix("_total") not in families}
    assert not missing, f"missing metric names: {sorted(missing)}"
    results = {
        s.labels["result"]
        for s in families["controller_runtime_reconcile"].samples
        if s.labels.get("controller") == "servers-test"
    }
    assert results == {"success", "error", "requeue", "requeue_after"}, "all results initialised at 0"
    assert "_created" not in text


def test_json_logs_redact_secrets_and_carry_context() -> None:
    buf = io.StringIO()
    configure_logging(json_output=True, level="info")
    try:
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=buf))
        with structlog.contextvars.bound_contextvars(key="ns/a", reconcile_id="r-1"):
            structlog.get_logger("t").info("hello", token="s3cr3t", bearer_token="x", count=3)
        structlog.get_logger("t").debug("hidden")
        line = json.loads(buf.getvalue().strip().splitlines()[-1])
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert line["msg"] == "hello" and line["key"] == "ns/a" and line["reconcile_id"] == "r-1"
    assert line["token"] == "[redacted]" and line["bearer_token"] == "[redacted]" and line["count"] == 3
    assert line["level"] == "info" and line["timestamp"].endswith("Z")
    assert "s3cr3t" not in buf.getvalue() and "hidden" not in buf.getvalue()


def test_micro_time_is_utc_with_six_digits() -> None:
    from datetime import datetime, timedelta, timezone

    t = micro_time(datetime(2026, 1, 2, 5, 4, 5, 7, tzinfo=timezone(timedelta(hours=2))))
    assert t == "2026-01-02T03:04:05.000007Z"
