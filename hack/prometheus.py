"""A real Prometheus server (Debian's ``prometheus`` binary) that scrapes what the chart's ServiceMonitors
select, for tests and by hand.

There is no Prometheus Operator here, so this module does its job for our ServiceMonitors: each endpoint
of each ServiceMonitor becomes a scrape job with Kubernetes service discovery and the relabel rules the
operator generates (keep the Service's ``matchLabels``, keep the named port, set ``job`` to the Service
name, ``namespace``/``service``/``pod``/``endpoint`` labels). The rules are derived from the rendered
ServiceMonitor objects, so a chart change that breaks selection breaks whoever uses this.

Interface::

    from hack.prometheus import PrometheusServer, scrape_configs_from_servicemonitors

    monitors = [o for o in rendered_chart if o["kind"] == "ServiceMonitor"]
    jobs = scrape_configs_from_servicemonitors(monitors, kubeconfig, scrape_interval="1s")
    with PrometheusServer(jobs, workdir=tmp_path) as prom:     # 127.0.0.1:<free port>, temp storage
        targets = prom.wait_targets_up(count=3, timeout=60)    # active targets, all health "up"
        series = prom.wait_query('kaito_workspace_count', timeout=30)   # instant-vector samples
        prom.query('up')                                       # one query, possibly empty

``kubeconfig`` is any kubeconfig Prometheus can read (token + CA, e.g. ``LocalCluster.kubeconfig``);
discovery uses it through ``kubeconfig_file``. Service discovery ``role`` is ``endpointslice`` by
default (what the local cluster's controller-manager maintains; the Prometheus Operator's
``serviceDiscoveryRole: EndpointSlice``); ``endpoints`` is available for clusters that run the
Endpoints controller. ``PrometheusServer`` owns its process: ``stop()`` (and leaving the ``with``)
terminates and awaits it; it also dies with the test process (parent-death signal).

Run by hand against a cluster: ``python -m hack.prometheus --kubeconfig K --servicemonitors F.yaml``
(prints the URL and serves until Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from hack.localcluster import Component, free_port

Obj = dict[str, Any]

ROLES = ("endpointslice", "endpoints")


def _label_name(key: str) -> str:
    """A Kubernetes label key as Prometheus spells it in ``__meta_*`` labels."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def _selector_rules(selector: Mapping[str, Any], where: str) -> list[Obj]:
    """``keep`` rules for a Service label selector (``matchLabels`` only: what our ServiceMonitors use)."""
    if selector.get("matchExpressions"):
        raise ValueError(f"{where}: spec.selector.matchExpressions is not supported here; use matchLabels")
    rules: list[Obj] = []
    for key, value in sorted((selector.get("matchLabels") or {}).items()):
        name = _label_name(key)
        rules.append(
            {
                "action": "keep",
                "source_labels": [
                    f"__meta_kubernetes_service_label_{name}",
                    f"__meta_kubernetes_service_labelpresent_{name}",
                ],
                "regex": f"({re.escape(str(value))});true",
            }
        )
    if not rules:
        raise ValueError(f"{where}: an empty selector would scrape every Service in the namespace")
    return rules


def scrape_configs_from_servicemonitors(
    monitors: Iterable[Mapping[str, Any]],
    kubeconfig: Path,
    *,
    role: str = "endpointslice",
    scrape_interval: str | None = None,
) -> list[Obj]:
    """Prometheus ``scrape_configs`` equivalent to what the Prometheus Operator makes of ``monitors``.

    One job per ServiceMonitor endpoint, named ``serviceMonitor/<namespace>/<name>/<index>`` as the
    operator names them. ``scrape_interval`` overrides the endpoints' intervals (tests want seconds).
    Endpoints must name their port (``port``); ``targetPort``, TLS and auth are not needed by ours and
    are refused rather than ignored.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    meta = "endpointslice" if role == "endpointslice" else "endpoint"
    jobs: list[Obj] = []
    for sm in monitors:
        if sm.get("kind") != "ServiceMonitor":
            raise ValueError(f"not a ServiceMonitor: {sm.get('kind')}")
        name = sm["metadata"]["name"]
        namespace = sm["metadata"].get("namespace") or "default"
        where = f"ServiceMonitor {namespace}/{name}"
        spec = sm.get("spec") or {}
        ns_sel = spec.get("namespaceSelector") or {}
        names = [namespace] if not ns_sel else (None if ns_sel.get("any") else list(ns_sel["matchNames"]))
        sd: Obj = {"role": role, "kubeconfig_file": str(kubeconfig)}
        if names is not None:
            sd["namespaces"] = {"names": names}
        selection = _selector_rules(spec.get("selector") or {}, where)
        for i, ep in enumerate(spec.get("endpoints") or ()):
            unsupported = set(ep) - {"port", "path", "scheme", "interval"}
            if unsupported or not ep.get("port"):
                raise ValueError(
                    f"{where} endpoint {i}: needs a port name; unsupported {sorted(unsupported)}"
                )
            port = ep["port"]
            job: Obj = {
                "job_name": f"serviceMonitor/{namespace}/{name}/{i}",
                "honor_labels": False,
                "metrics_path": ep.get("path") or "/metrics",
                "scheme": ep.get("scheme") or "http",
                "kubernetes_sd_configs": [sd],
                "relabel_configs": [
                    *selection,
                    {
                        "action": "keep",
                        "source_labels": [f"__meta_kubernetes_{meta}_port_name"],
                        "regex": re.escape(port),
                    },
                    {
                        "source_labels": [
                            f"__meta_kubernetes_{meta}_address_target_kind",
                            f"__meta_kubernetes_{meta}_address_target_name",
                        ],
                        "regex": "Pod;(.*)",
                        "target_label": "pod",
                    },
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
                    {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
                    {"target_label": "endpoint", "replacement": port},
                ],
            }
            interval = scrape_interval or ep.get("interval")
            if interval:
                job["scrape_interval"] = interval
                job["scrape_timeout"] = interval
            jobs.append(job)
    return jobs


class PrometheusError(RuntimeError):
    """Prometheus did not start, answered an error, or a wait ran out (the message carries its log)."""


class PrometheusServer:
    """A ``prometheus`` process on 127.0.0.1 with its own config and temp storage (see the module doc)."""

    def __init__(
        self,
        scrape_configs: Sequence[Mapping[str, Any]],
        *,
        workdir: Path | None = None,
        binary: str = "prometheus",
        evaluation_interval: str = "1s",
        rule_files: Sequence[Path] = (),
    ) -> None:
        path = shutil.which(binary)
        if path is None:
            raise PrometheusError(f"{binary} is missing: make sysdeps (Debian's prometheus package)")
        self.binary = path
        self.scrape_configs = [dict(c) for c in scrape_configs]
        self.evaluation_interval = evaluation_interval
        self.rule_files = list(rule_files)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._workdir = workdir
        self.port = 0
        self._component: Component | None = None

    @property
    def url(self) -> str:
        """Base URL of the HTTP API (valid once started)."""
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> Obj:
        """The prometheus.yml this server runs with."""
        cfg: Obj = {
            "global": {"scrape_interval": "1s", "evaluation_interval": self.evaluation_interval},
            "scrape_configs": self.scrape_configs,
        }
        if self.rule_files:
            cfg["rule_files"] = [str(p) for p in self.rule_files]
        return cfg

    def start(self, timeout: float = 30.0) -> None:
        """Write the config, start the process, wait until it reports ready."""
        if self._workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kaito-prometheus-")
            self._workdir = Path(self._tmp.name)
        workdir = self._workdir
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self.port = free_port()
        self._component = Component(
            "prometheus",
            [
                self.binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=info",
            ],
            workdir / "prometheus.log",
        )
        self._component.start()
        deadline = time.monotonic() + timeout
        while True:
            if not self._component.alive():
                self.stop()
                raise PrometheusError(f"prometheus exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PrometheusError(f"prometheus not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Terminate the process and wait for it (SIGKILL after 10 s); remove its temp storage."""
        if self._component is not None:
            self._component.stop(grace=10.0)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self._workdir = None

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log."""
        return self._component.log_tail(lines) if self._component is not None else ""

    # ---- HTTP API --------------------------------------------------------------------------------

    def api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data`` (PrometheusError on an error status)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise PrometheusError(f"{path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from e
        if body.get("status") != "success":
            raise PrometheusError(f"{path}: {body}")
        return body["data"]

    def targets(self) -> list[Obj]:
        """The active targets (``labels``, ``health``, ``lastError``, ``scrapeUrl``, ...)."""
        data = self.api("targets", {"state": "active"})
        return list(data["activeTargets"])

    def query(self, promql: str) -> list[Obj]:
        """An instant query; the result vector (``metric`` labels and ``value`` [time, "string"])."""
        data = self.api("query", {"query": promql})
        if data["resultType"] != "vector":
            raise PrometheusError(f"{promql!r} is a {data['resultType']}, not an instant vector")
        return list(data["result"])

    def wait_targets_up(
        self, count: int, *, jobs: Iterable[str] | None = None, timeout: float = 60.0
    ) -> list[Obj]:
        """Wait until exactly ``count`` active targets (of ``jobs``, by ``job`` label, if given) exist
        and all are up; return them. On timeout the error lists what was seen."""
        wanted = set(jobs) if jobs is not None else None
        deadline = time.monotonic() + timeout
        seen: list[Obj] = []
        while True:
            seen = [t for t in self.targets() if wanted is None or t["labels"].get("job") in wanted]
            if len(seen) == count and all(t["health"] == "up" for t in seen):
                return seen
            if time.monotonic() > deadline:
                summary = [
                    (t["scrapeUrl"], t["labels"].get("job"), t["health"], t["lastError"]) for t in seen
                ]
                raise PrometheusError(
                    f"wanted {count} targets up, saw {summary} after {timeout}s\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def wait_query(self, promql: str, *, timeout: float = 30.0) -> list[Obj]:
        """Wait until ``promql`` returns a non-empty vector; return it."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if result:
                return result
            if time.monotonic() > deadline:
                raise PrometheusError(f"{promql!r} stayed empty for {timeout}s\n{self.log_tail()}")
            time.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve Prometheus for the ServiceMonitors in a YAML file until interrupted."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--kubeconfig", type=Path, required=True)
    p.add_argument("--servicemonitors", type=Path, required=True, help="YAML stream (e.g. helm template)")
    p.add_argument("--role", choices=ROLES, default="endpointslice")
    p.add_argument("--scrape-interval", default=None)
    args = p.parse_args(argv)
    docs = [d for d in yaml.safe_load_all(args.servicemonitors.read_text()) if d]
    monitors = [d for d in docs if d.get("kind") == "ServiceMonitor"]
    jobs = scrape_configs_from_servicemonitors(
        monitors, args.kubeconfig, role=args.role, scrape_interval=args.scrape_interval
    )
    with PrometheusServer(jobs) as prom:
        print(prom.url, flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    raise SystemExit(main())
