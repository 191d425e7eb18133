"""Unit tests of the launcher's pure parts (no binaries started)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hack import localcluster
from hack.localcluster import TMP_PREFIX, ClusterError, LocalCluster, free_port, sweep_stale_dirs


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_sweep_removes_dirs_of_dead_launchers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{TMP_PREFIX}stale"
    live = tmp_path / f"{TMP_PREFIX}live"
    for d, pid in ((stale, dead.pid), (live, os.getpid())):
        d.mkdir()
        (d / "launcher.pid").write_text(str(pid))
    sweep_stale_dirs()
    assert not stale.exists()
    assert live.exists()


def test_unknown_profile_is_a_clear_error() -> None:
    with pytest.raises(ClusterError, match=r"unknown profile 'kind'.*apiserver, full"):
        LocalCluster(profile="kind").start()


def test_pki_has_loopback_serving_cert(tmp_path: Path) -> None:
    from cryptography import x509

    localcluster._write_pki(tmp_path)
    cert = x509.load_pem_x509_certificate((tmp_path / "apiserver.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert "kubernetes.default.svc" in sans.get_values_for_type(x509.DNSName)
    assert (tmp_path / "sa.key").stat().st_mode & 0o077 == 0


def test_free_port_avoids_the_ephemeral_range() -> None:
    low, _ = localcluster._ephemeral_range()
    ports = {free_port() for _ in range(20)}
    assert all(10000 <= p < max(low, 10001) for p in ports)
