#!/usr/bin/env python3
"""A real Kubernetes control plane on loopback, from binaries built by ``hack/build-binaries.sh``.

Profiles:

* ``apiserver`` — etcd + kube-apiserver with RBAC on and an admin bearer token (``system:masters``).
* ``full`` — plus kube-controller-manager (GC, deployment/replicaset/statefulset/job/namespace/
  service-account controllers), kube-scheduler and kwok with node and pod stages, so a pod bound to a
  fake node becomes Running and Ready.

Every port is picked free on 127.0.0.1, every file lives in one temp dir, every process runs in its own
process group with a parent-death signal; ``stop()`` (also run at exit and on SIGTERM/SIGINT) kills them
and removes the dir. A run that was SIGKILLed leaves a dir whose owner pid is dead: the next start sweeps it.

Usable as a library (tests, demo) and as a CLI::

    python hack/localcluster.py up --profile full          # until Ctrl-C
    python hack/localcluster.py run --profile full -- CMD  # CMD runs with KUBECONFIG set

Only the standard library and ``cryptography`` are imported, so it runs from the operator's venv.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import ctypes
import datetime as dt
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HACK_DIR = Path(__file__).resolve().parent
REPO_ROOT = HACK_DIR.parent
TMP_PREFIX = "kaito-localcluster-"
PROFILES = ("apiserver", "full")

# Controllers the e2e tests and the demo rely on; everything else stays off to keep the plane light.
KCM_CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "node-lifecycle-controller",
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "job-controller",
    "disruption-controller",
    "endpointslice-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "ttl-after-finished-controller",
)


class ClusterError(RuntimeError):
    """The local control plane could not be started or stopped."""


def build_binaries() -> Path:
    """Build (or find cached) control-plane binaries and return their directory."""
    override = os.environ.get("KAITO_BIN_DIR")
    if override:
        return Path(override)
    out = subprocess.run(
        ["bash", str(HACK_DIR / "build-binaries.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now.

    The port is drawn below the kernel's ephemeral range: a port from bind(0) lies inside it and can be
    taken by any outgoing connection before the process it was meant for binds it.
    """
    low, _ = _ephemeral_range()
    rng = secrets.SystemRandom()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pdeathsig() -> None:
    # Runs in the child between fork and exec: die with the launcher, even if it is SIGKILLed.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def pdeathsig_if_main_thread() -> Any:
    """``preexec_fn`` for Popen: the parent-death signal, only when forking from the main thread.

    The signal fires when the *thread* that forked exits, so from a worker thread it would kill the
    child early; a start from a worker thread relies on stop()/atexit instead.
    """
    return _pdeathsig if threading.current_thread() is threading.main_thread() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_dirs() -> None:
    """Remove temp dirs of earlier runs whose launcher process is gone (e.g. after kill -9)."""
    root = Path(tempfile.gettempdir())
    for d in root.glob(TMP_PREFIX + "*"):
        pid_file = d / "launcher.pid"
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            # A dir without a pid file is a start that died before writing it; only old ones are safe.
            with contextlib.suppress(OSError):
                if time.time() - d.stat().st_mtime > 3600:
                    shutil.rmtree(d, ignore_errors=True)
            continue
        if not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Certificates and credentials
# --------------------------------------------------------------------------------------------------


def _write_pki(pki: Path) -> None:
    """CA, apiserver serving cert for loopback and the in-cluster names, service-account key pair."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    pki.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def pem_key(key: Any) -> bytes:
        return bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kaito-localcluster-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    srv_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
    ]
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (pki / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (pki / "ca.key").write_bytes(pem_key(ca_key))
    (pki / "apiserver.crt").write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    (pki / "apiserver.key").write_bytes(pem_key(srv_key))
    (pki / "sa.key").write_bytes(pem_key(sa_key))
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    for name in ("ca.key", "apiserver.key", "sa.key"):
        (pki / name).chmod(0o600)


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


@dataclass
class Component:
    """One control-plane process: how to start it and the handle of the running one."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log_file: Any = None

    def start(self) -> None:
        """Start the process in its own group, stdout/stderr appended to its log file."""
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - owned by the component until stop()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=pdeathsig_if_main_thread(),  # noqa: PLW1509 - only prctl, no locks
        )

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL after ``grace`` seconds."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
            # The group may hold helpers the main process forked; none may outlive the cluster.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.proc = None
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the component's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class LocalCluster:
    """A local control plane. Use as a context manager or call ``start()``/``stop()``."""

    profile: str = "apiserver"
    bin_dir: Path | None = None
    keep_workdir: bool = False
    workdir: Path = field(default_factory=Path)
    server: str = ""
    token: str = ""
    etcd_url: str = ""
    components: dict[str, Component] = field(default_factory=dict)
    _started: bool = False

    # ---- paths -----------------------------------------------------------------------------------
    @property
    def ca_file(self) -> Path:
        """CA that signed the apiserver's serving certificate."""
        return self.workdir / "pki" / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        """kubeconfig with the admin token."""
        return self.workdir / "kubeconfig"

    @property
    def kubectl_path(self) -> Path:
        """The version-matched kubectl built with the control plane."""
        assert self.bin_dir is not None
        return self.bin_dir / "kubectl"

    @property
    def logs_dir(self) -> Path:
        """Directory holding one log file per component."""
        return self.workdir / "logs"

    # ---- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Start every component of the profile and wait until the apiserver is ready."""
        if self.profile not in PROFILES:
            raise ClusterError(f"unknown profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        sweep_stale_dirs()
        if self.bin_dir is None:
            self.bin_dir = build_binaries()
        self.workdir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
        (self.workdir / "launcher.pid").write_text(str(os.getpid()))
        self.logs_dir.mkdir()
        atexit.register(self.stop)
        self._started = True
        try:
            self._start(time.monotonic() + timeout)
        except BaseException:
            self.dump_logs()
            self.stop()
            raise

    def _start(self, deadline: float) -> None:
        _write_pki(self.workdir / "pki")
        self.token = secrets.token_hex(24)
        (self.workdir / "tokens.csv").write_text(f'{self.token},kaito-admin,kaito-admin,"system:masters"\n')
        (self.workdir / "tokens.csv").chmod(0o600)

        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        self.server = f"https://127.0.0.1:{api_port}"
        self._write_kubeconfig()

        self._add(
            "etcd",
            [
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync=true",
                "--quota-backend-bytes=4294967296",
                "--log-level=warn",
            ],
        )
        self.components["etcd"].start()
        self._wait(deadline, "etcd", self._etcd_healthy)

        self._add("kube-apiserver", self._apiserver_args(api_port))
        self.components["kube-apiserver"].start()
        self._wait(deadline, "kube-apiserver", self._apiserver_ready)

        if self.profile == "full":
            self._start_full(deadline)

    def _start_full(self, deadline: float) -> None:
        pki = self.workdir / "pki"
        kc = str(self.kubeconfig)
        self._add(
            "kube-controller-manager",
            [
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                f"--controllers={','.join(KCM_CONTROLLERS)}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=false",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--concurrent-deployment-syncs=10",
                "--concurrent-replicaset-syncs=10",
                "--v=1",
            ],
        )
        self._add(
            "kube-scheduler",
            [
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--v=1",
            ],
        )
        self._add(
            "kwok",
            [
                f"--kubeconfig={kc}",
                f"--config={HACK_DIR / 'kwok' / 'kwok.yaml'}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--cidr=10.244.0.0/16",
                "--node-ip=10.96.0.1",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{free_port()}",
                "--v=INFO",
            ],
        )
        for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
            self.components[name].start()
        # The token controller creating the default ServiceAccount is the sign that KCM works.
        self._wait(deadline, "kube-controller-manager", self._default_serviceaccount_exists)
        for name in ("kube-scheduler", "kwok"):
            self._wait(deadline, name, lambda n=name: self.components[n].alive(), settle=1.0)

    def _add(self, name: str, args: list[str]) -> None:
        assert self.bin_dir is not None
        self.components[name] = Component(
            name=name, argv=[str(self.bin_dir / name), *args], log_path=self.logs_dir / f"{name}.log"
        )

    def _apiserver_args(self, port: int) -> list[str]:
        pki = self.workdir / "pki"
        args = [
            f"--etcd-servers={self.etcd_url}",
            f"--etcd-prefix=/registry-{secrets.token_hex(4)}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/16",  # room for thousands of Services (bench/scale.py)
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
            # logs/exec/port-forward/proxy to a real node (hack/realnode.py) go to the address its kubelet
            # listens on; its Hostname address would be tried first and the node proxy refuses loopback.
            "--kubelet-preferred-address-types=InternalIP",
            "--enable-priority-and-fairness=false",
            "--max-requests-inflight=0",
            "--max-mutating-requests-inflight=0",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            "--profiling=true",  # /debug/pprof for bench diagnosis (admin only)
            # A namespace's scheduler.alpha.kubernetes.io/defaultTolerations annotation: the real-node
            # e2e tests let one namespace's pods onto the tainted real node, manifests unchanged.
            "--enable-admission-plugins=PodTolerationRestriction",
            "--v=1",
        ]
        if self.profile == "apiserver":
            # No controller-manager creates default ServiceAccounts in this profile (as envtest does).
            args.append("--disable-admission-plugins=ServiceAccount")
        return args

    def _write_kubeconfig(self) -> None:
        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "kaito-local", "cluster": {"server": self.server, "certificate-authority-data": ca}}
            ],
            "users": [{"name": "kaito-admin", "user": {"token": self.token}}],
            "contexts": [
                {"name": "kaito-local", "context": {"cluster": "kaito-local", "user": "kaito-admin"}}
            ],
            "current-context": "kaito-local",
        }
        # JSON is valid YAML; kubectl and kubernetes-asyncio both read it.
        self.kubeconfig.write_text(json.dumps(cfg, indent=2))
        self.kubeconfig.chmod(0o600)

    def _wait(
        self, deadline: float, name: str, check: Any, settle: float = 0.0, interval: float = 0.1
    ) -> None:
        comp = self.components[name]
        while True:
            if not comp.alive():
                raise ClusterError(f"{name} exited during start-up:\n{comp.log_tail()}")
            if check():
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} did not become ready in time:\n{comp.log_tail()}")
            time.sleep(interval)
        if settle:
            end = time.monotonic() + settle
            while time.monotonic() < end:
                if not comp.alive():
                    raise ClusterError(f"{name} exited during start-up:\n{comp.log_tail()}")
                time.sleep(interval)

    # ---- probes ----------------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def request(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
        """A raw apiserver request as the admin; returns (status, decoded JSON or text)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self._ssl_context(), timeout=timeout) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def _apiserver_ready(self) -> bool:
        try:
            status, _ = self.request("GET", "/readyz", timeout=2)
        except (OSError, ssl.SSLError):
            return False
        return status == 200

    def _etcd_post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(self.etcd_url + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            result: dict[str, Any] = json.loads(r.read())
            return result

    def _etcd_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _default_serviceaccount_exists(self) -> bool:
        try:
            status, _ = self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default", timeout=2)
        except OSError:
            return False
        return status == 200

    # ---- operations tests need -------------------------------------------------------------------
    def etcd_revision(self) -> int:
        """etcd's current store revision."""
        return int(self._etcd_post("/v3/maintenance/status", {})["header"]["revision"])

    def compact_etcd(self) -> int:
        """Compact etcd at its current revision (physically) and return that revision."""
        rev = self.etcd_revision()
        try:
            self._etcd_post("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        except urllib.error.HTTPError as e:
            # Nothing was written since the last compaction (ours or the apiserver's): already done.
            if b"required revision has been compacted" not in e.read():
                raise
        return rev

    def etcd_revision_compacted(self, revision: int) -> bool:
        """True when etcd refuses to read at ``revision`` because it was compacted away."""
        body = {"key": base64.b64encode(b"/").decode(), "revision": str(revision), "limit": "1"}
        try:
            self._etcd_post("/v3/kv/range", body)
        except urllib.error.HTTPError as e:
            return b"required revision has been compacted" in e.read()
        return False

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver, leaving etcd (and everything else) running."""
        self.components["kube-apiserver"].stop()

    def start_apiserver(self, timeout: float = 60.0) -> None:
        """Start kube-apiserver again on the same port with the same flags; wait until ready."""
        comp = self.components["kube-apiserver"]
        if not comp.alive():
            comp.start()
        self._wait(time.monotonic() + timeout, "kube-apiserver", self._apiserver_ready)

    def restart_apiserver(self, timeout: float = 60.0) -> None:
        """Stop and start kube-apiserver (same port, same data)."""
        self.stop_apiserver()
        self.start_apiserver(timeout)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the version-matched kubectl against this cluster."""
        proc = subprocess.run(
            [str(self.kubectl_path), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def apply(self, manifest: dict[str, Any] | str) -> None:
        """Server-side apply a manifest (dict or YAML/JSON text) as the admin."""
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=text)

    def create_kwok_node(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        gpus: int = 0,
        taints: Sequence[dict[str, str]] = (),
        annotations: dict[str, str] | None = None,
    ) -> None:
        """Create a Node that kwok manages (Ready within a second or so), with optional GPUs."""
        capacity = {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "1Ti"}
        if gpus:
            capacity["nvidia.com/gpu"] = str(gpus)
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    **(labels or {}),
                },
                "annotations": {"kwok.x-k8s.io/node": "fake", **(annotations or {})},
            },
            "spec": {"taints": list(taints)},
            "status": {"capacity": capacity, "allocatable": capacity},
        }
        status, body = self.request("POST", "/api/v1/nodes", node)
        if status not in (200, 201):
            raise ClusterError(f"creating node {name}: {status} {body}")

    def client_configuration(self) -> Any:
        """A ``kubernetes_asyncio.client.Configuration`` for the admin (imported lazily)."""
        from kubernetes_asyncio.client import Configuration

        cfg = Configuration(
            host=self.server,
            api_key={"BearerToken": self.token},
            api_key_prefix={"BearerToken": "Bearer"},
        )
        cfg.ssl_ca_cert = str(self.ca_file)
        return cfg

    def env(self) -> dict[str, str]:
        """Environment for a child process: KUBECONFIG and PATH with the cluster's kubectl first."""
        assert self.bin_dir is not None
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def dump_logs(self, lines: int = 40) -> str:
        """The tail of every component's log (printed when a start fails)."""
        parts = [f"--- {c.name} ---\n{c.log_tail(lines)}" for c in self.components.values()]
        text = "\n".join(parts)
        if text:
            print(text, file=sys.stderr)
        return text

    def stop(self) -> None:
        """Stop every component (reverse start order) and remove the work dir. Idempotent."""
        if not self._started:
            return
        self._started = False
        for comp in reversed(list(self.components.values())):
            comp.stop()
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so cleanup runs on every way out."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("up", "run"):
        sp = sub.add_parser(name)
        sp.add_argument("--profile", choices=PROFILES, default="full")
        sp.add_argument("--kubeconfig-out", help="also copy the kubeconfig to this path")
        sp.add_argument("--timeout", type=float, default=60.0)
        sp.add_argument(
            "--real-node",
            action="store_true",
            help="also join a real node (containerd, kubelet, kube-proxy; hack/realnode.py; needs root)",
        )
    sub.choices["run"].add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("build", help="build or find the cached binaries and print their directory")
    args = p.parse_args(argv)

    if args.cmd == "build":
        print(build_binaries())
        return 0

    if args.real_node and args.profile != "full":
        p.error("--real-node needs --profile full (the scheduler and controllers)")
    cluster = LocalCluster(profile=args.profile)
    node: Any = None
    with _signals_raise():
        try:
            t0 = time.monotonic()
            cluster.start(timeout=args.timeout)
            if args.real_node:
                if __package__ in (None, ""):
                    sys.path.insert(0, str(REPO_ROOT))
                from hack.realnode import RealNode

                node = RealNode(cluster)
                node.start()
            print(
                f"local cluster ({args.profile}{', real node ' + node.name if node else ''}) ready in "
                f"{time.monotonic() - t0:.1f}s: {cluster.server}  kubeconfig={cluster.kubeconfig}",
                file=sys.stderr,
            )
            if args.kubeconfig_out:
                shutil.copyfile(cluster.kubeconfig, args.kubeconfig_out)
            if args.cmd == "up":
                signal.pause()
                return 0
            cmd = list(args.command)
            if cmd and cmd[0] == "--":
                cmd = cmd[1:]
            if not cmd:
                p.error("run needs a command after --")
            return subprocess.run(cmd, env=cluster.env(), check=False).returncode
        except KeyboardInterrupt:
            return 130
        finally:
            if node is not None:
                node.stop()
            cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
