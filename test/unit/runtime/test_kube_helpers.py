"""REST helper pieces that need no server: paths, keys, typed errors, backoff, election config."""

from __future__ import annotations

import pytest
from kubernetes_asyncio.client import Configuration

from kaito.runtime.informer import Backoff
from kaito.runtime.kube import (
    CONFIGMAPS,
    LEASES,
    NODES,
    ApiError,
    Resource,
    api_client_for,
    object_key,
    owner_reference,
    split_key,
)
from kaito.runtime.leader_election import LeaderElectionConfig


def test_resource_paths() -> None:
    assert CONFIGMAPS.path() == "/api/v1/configmaps"
    assert CONFIGMAPS.path("ns") == "/api/v1/namespaces/ns/configmaps"
    assert CONFIGMAPS.path("ns", "a") == "/api/v1/namespaces/ns/configmaps/a"
    assert NODES.path("ignored", "n1") == "/api/v1/nodes/n1"
    assert LEASES.path("kaito-system", "x") == "/apis/coordination.k8s.io/v1/namespaces/kaito-system/leases/x"
    ws = Resource("kaito.sh", "v1alpha1", "workspaces", True, "Workspace")
    assert ws.path("ns", "w", "status") == "/apis/kaito.sh/v1alpha1/namespaces/ns/workspaces/w/status"
    assert ws.api_version == "kaito.sh/v1alpha1" and CONFIGMAPS.api_version == "v1"
    assert str(ws) == "workspaces.kaito.sh" and str(CONFIGMAPS) == "configmaps"


def test_keys() -> None:
    assert object_key({"metadata": {"namespace": "ns", "name": "a"}}) == "ns/a"
    assert object_key({"metadata": {"name": "node"}}) == "node"
    assert split_key("ns/a") == ("ns", "a") and split_key("node") == (None, "node")


def test_api_error_from_status() -> None:
    e = ApiError.from_status(409, b'{"kind":"Status","reason":"AlreadyExists","message":"exists","code":409}')
    assert e.already_exists and not e.conflict and e.status == 409 and e.message == "exists"
    c = ApiError.from_status(409, {"reason": "Conflict", "code": 409})
    assert c.conflict and not c.already_exists
    g = ApiError.from_status(200, {"reason": "Expired", "code": 410})  # an ERROR watch event
    assert g.expired and g.status == 410
    assert ApiError.from_status(404, b"not json").not_found
    assert ApiError(503).retryable and ApiError(429).retryable and not ApiError(403).retryable


def test_owner_reference() -> None:
    owner = {"apiVersion": "kaito.sh/v1alpha1", "kind": "Workspace", "metadata": {"name": "w", "uid": "u"}}
    ref = owner_reference(owner)
    assert ref == {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "name": "w",
        "uid": "u",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_backoff_grows_caps_and_resets() -> None:
    now = [0.0]
    b = Backoff(initial=0.8, maximum=30.0, jitter=1.0, reset_after=120.0, clock=lambda: now[0])
    delays = []
    for _ in range(8):
        delays.append(b.next())
        now[0] += 1
    bases = [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]
    for d, base in zip(delays, bases, strict=True):
        assert base <= d <= 2 * base
    now[0] += 121  # healthy for longer than reset_after
    assert b.next() <= 1.6


def test_leader_election_config_rules() -> None:
    LeaderElectionConfig("l", "ns").validate()  # 15 / 10 / 2
    with pytest.raises(ValueError):
        LeaderElectionConfig("l", "ns", lease_duration=10, renew_deadline=10).validate()
    with pytest.raises(ValueError):
        LeaderElectionConfig("l", "ns", renew_deadline=2.4, retry_period=2).validate()
    a, b = LeaderElectionConfig("l", "ns"), LeaderElectionConfig("l", "ns")
    assert a.identity != b.identity and "_" in a.identity


async def test_api_client_resolves_the_proxy_once_and_skips_per_request_env_lookups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    for var in ("https_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)

    cfg = Configuration(host="https://apiserver.example:6443")
    async with api_client_for(cfg) as api:
        assert cfg.proxy == "http://proxy.example:3128"
        assert api.rest_client.pool_manager.trust_env is False

    bypassed = Configuration(host="https://internal.example:6443")
    async with api_client_for(bypassed) as api:
        assert not bypassed.proxy
        assert api.rest_client.pool_manager.trust_env is False
