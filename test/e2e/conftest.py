"""Session-level guard for every e2e suite: no test credential in anything the runs captured.

After each e2e test (before its fixtures are torn down, while its namespace still exists) the
hook below notes the test's process logs and takes a snapshot of what the system wrote about the
test's namespace: Events, the status of Workspaces, Jobs, Pods and Machines (termination messages
live in Pod status). When the session ends, :func:`no_credentials_leaked` greps all of it for the
values in :mod:`test.e2e.credentials`, the admin token and any JSON Web Token, and fails on a hit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hack.localcluster import LocalCluster
from test.e2e.credentials import captured_logs, scan, secret_values

_log_paths: set[Path] = set()
_log_roots: set[Path] = set()
_snapshots: list[tuple[str, str]] = []
_clusters: list[LocalCluster] = []


def _process_logs(value: Any) -> list[Path]:
    procs = getattr(value, "procs", None)
    items = list(procs.values()) if isinstance(procs, dict) else list(procs or [])
    if hasattr(value, "log_path"):
        items.append(value)
    return [p.log_path for p in items if isinstance(getattr(p, "log_path", None), Path)]


def _snapshot(cluster: LocalCluster, namespace: str) -> str:
    """What the system wrote about ``namespace``: Event messages and object statuses, as JSON lines."""
    lines: list[str] = []
    for kind in ("events", "workspaces", "jobs", "pods", "machines"):
        proc = cluster.kubectl("get", kind, "-n", namespace, "-o", "json", check=False)
        if proc.returncode != 0:
            continue
        for obj in json.loads(proc.stdout or "{}").get("items") or []:
            # A Pod's spec holds the user's own input (the data URL in env): only what was written back.
            written = obj.get("message") if kind == "events" else obj.get("status")
            name = (obj.get("metadata") or {}).get("name")
            lines.append(json.dumps({"kind": kind, "name": name, "written": written}))
    return "\n".join(lines)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    funcargs: dict[str, Any] = getattr(item, "funcargs", {})
    tmp = funcargs.get("tmp_path")
    if isinstance(tmp, Path):
        _log_roots.add(tmp)
    for value in funcargs.values():
        _log_paths.update(_process_logs(value))
        if isinstance(value, LocalCluster) and value not in _clusters:
            _clusters.append(value)
    namespace = funcargs.get("namespace")
    cluster = next((v for v in funcargs.values() if isinstance(v, LocalCluster)), None)
    if isinstance(namespace, str) and cluster is not None:
        try:
            _snapshots.append((f"cluster objects of {item.nodeid}", _snapshot(cluster, namespace)))
        except Exception as e:  # the scan must not turn a cleanup hiccup into a test failure
            print(f"snapshot of {namespace} failed: {e}")
    return (yield)


@pytest.fixture(scope="session", autouse=True)
def no_credentials_leaked() -> Iterator[None]:
    """Fail the session when a test credential shows up in a captured log, Event, status or termination
    message of any e2e run."""
    yield
    texts = captured_logs(_log_roots)
    seen = {where for where, _ in texts}
    for path in sorted(_log_paths):
        if str(path) not in seen and path.exists():
            texts.append((str(path), path.read_text(errors="replace")))
    texts.extend(_snapshots)
    hits = scan(texts, secret_values(c.token for c in _clusters))
    if hits:
        pytest.fail(
            f"{len(hits)} credential(s) leaked into logs, Events or status:\n" + "\n".join(hits[:50]),
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    """Keep each test's call report on its item (``request.node.rep_call``): fixtures print the
    controllers' logs on teardown when the test failed."""
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep
