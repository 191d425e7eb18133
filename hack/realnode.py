#!/usr/bin/env python3
"""One real node in the local cluster: containerd + runc + bridge CNI + kubelet + kube-proxy.

It joins the ``full`` profile of ``hack/localcluster.py`` next to the kwok nodes, so pods of images
built by ``hack/images.py`` run in real containers. What this machine kind needs and why is recorded
in ``shared/reference/real-node.md``; in short:

* node IP ``10.245.0.1`` on the bridge ``cni0`` (the kernel has no dummy interface), pod CIDR
  ``10.245.0.0/24`` (kwok hands out fake pod IPs in 10.244.0.0/16);
* containerd ``restrict_oom_score_adj`` and kubelet ``oomScoreAdj: 0`` (no CAP_SYS_RESOURCE here),
  ``failCgroupV1: false`` with the ``cgroupfs`` driver (cgroup v1 host);
* pods reach the apiserver (which listens on 127.0.0.1 only) through the ``kubernetes`` Service: an
  in-process TCP forwarder on the node IP and an EndpointSlice pointing at it;
* the node carries the taint ``kaito.sh/real-node=true:NoSchedule`` and the label
  ``kaito.sh/real-node=true``: only pods that tolerate and select it land there, never pods meant for
  kwok GPU nodes.

The bridge, the netfilter tables and runc are machine-global, so one real node exists at a time: a
machine-wide lock (``~/.cache/kaito-py/realnode.lock``) is held for the node's lifetime and a second
start waits. Teardown removes every process, mount, bridge, netfilter chain, cgroup and sysctl change;
it also runs at every start, so whatever an interrupted run left behind is swept first.

State lives in ``~/.cache/kaito-py/realnode``: ``state/`` is per run and removed at teardown;
``containerd/`` (content store and snapshots) is kept, so images imported once are not imported again.

Library::

    with LocalCluster(profile="full") as cluster, RealNode(cluster) as node:
        node.load(ref, aliases=[...])

CLI: ``python hack/localcluster.py up --real-node`` (or ``run --real-node -- CMD``), and
``python hack/realnode.py teardown`` to sweep by hand. Needs root.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a script: make the repository's `hack` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hack import images
from hack.localcluster import free_port, pdeathsig_if_main_thread

if TYPE_CHECKING:
    from hack.localcluster import LocalCluster

HACK_DIR = Path(__file__).resolve().parent
NODE_NAME = "realnode"
NODE_IP = "10.245.0.1"
POD_CIDR = "10.245.0.0/24"
BRIDGE = "cni0"
APISERVER_FORWARD_PORT = 6443
LABEL_KEY = "kaito.sh/real-node"
TAINT = {"key": LABEL_KEY, "value": "true", "effect": "NoSchedule"}
# What a pod spec needs to run on the real node (and nothing else does).
TOLERATION = {"key": LABEL_KEY, "operator": "Equal", "value": "true", "effect": "NoSchedule"}
NODE_SELECTOR = {LABEL_KEY: "true"}
SYSCTLS = ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables")
# Host paths the runtime creates outside our directory; removed at teardown if they were not there.
HOST_DIRS = ("/run/containerd", "/var/lib/cni", "/var/log/containers", "/var/log/pods")
# Chains the kubelet makes that `kube-proxy --cleanup` does not remove: (table, chain).
KUBELET_CHAINS = (
    ("filter", "KUBE-FIREWALL"),
    ("filter", "KUBE-KUBELET-CANARY"),
    ("nat", "KUBE-KUBELET-CANARY"),
    ("mangle", "KUBE-KUBELET-CANARY"),
    ("mangle", "KUBE-IPTABLES-HINT"),
    ("filter", "KUBE-IPTABLES-HINT"),
    ("nat", "KUBE-IPTABLES-HINT"),
)


class RealNodeError(RuntimeError):
    """The real node could not be started or torn down."""


def _log(msg: str) -> None:
    print(f"[realnode] {msg}", file=sys.stderr, flush=True)


def home() -> Path:
    """The real node's directory in the cache."""
    return images.cache_root() / "realnode"


def state_dir() -> Path:
    """Per-run state: configs, sockets, runc and kubelet state, logs. Removed at teardown."""
    return home() / "state"


def build_node_binaries() -> Path:
    """Build (or find cached) kubelet, kube-proxy and crictl; their directory."""
    override = os.environ.get("KAITO_NODE_BIN_DIR")
    if override:
        return Path(override)
    out = subprocess.run(
        ["bash", str(HACK_DIR / "build-node-binaries.sh")], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def unmet_requirements() -> str | None:
    """Why a real node cannot start here, or None (tests skip with this reason)."""
    if os.geteuid() != 0:
        return "a real node needs root (containerd, runc, a bridge and netfilter rules)"
    return None


def _run(argv: Sequence[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RealNodeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


# --------------------------------------------------------------------------------------------------
# pods -> apiserver
# --------------------------------------------------------------------------------------------------


class TcpForwarder:
    """Forwards TCP connections from (host, port) to (target_host, target_port), on threads.

    The apiserver listens on 127.0.0.1 only; pods reach it through this forwarder on the node IP.
    """

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen, self.target = listen, target
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and start accepting."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(self.listen)
        s.listen(128)
        self._sock = s
        # The thread gets its own reference: stop() clears self._sock while accept() may be running.
        self._thread = threading.Thread(target=self._accept, args=(s,), name="apiserver-forward", daemon=True)
        self._thread.start()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return  # closed by stop()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [])
                for r in readable:
                    data = r.recv(65536)
                    if not data:
                        return
                    peers[r].sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns -= {a, b}
            for s in (a, b):
                s.close()

    def stop(self) -> None:
        """Stop accepting and cut every forwarded connection."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        with self._lock:
            conns, self._conns = set(self._conns), set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


# --------------------------------------------------------------------------------------------------
# Teardown (also the sweep of an interrupted run)
# --------------------------------------------------------------------------------------------------


def _pids_mentioning(needle: str) -> list[int]:
    """Processes whose command line contains ``needle`` (our state paths), not ourselves."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            found.append(int(d.name))
    return found


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (our own children stay zombies until reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill(pids: Sequence[int], grace: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _mounts_under(root: Path) -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].replace("\\040", " ")
        if target == str(root) or target.startswith(str(root) + "/"):
            out.append(target)
    return out


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _kubepods_cgroups() -> list[Path]:
    return [p for p in Path("/sys/fs/cgroup").glob("*/kubepods*") if p.is_dir()]


def _kubepods_pids() -> list[int]:
    """Processes still in the kubelet's pod cgroups (containers whose shim was killed)."""
    pids: set[int] = set()
    for root in _kubepods_cgroups():
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids |= {int(x) for x in procs.read_text().split()}
    return sorted(pids)


def leftovers() -> dict[str, Any]:
    """What of a real node exists on this machine now (empty values after a clean teardown).

    Tests assert on it; ``teardown()`` uses the same probes.
    """
    nft = _run(["nft", "list", "tables"], check=False).stdout
    chains = []
    for ipt in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            out = _run([ipt, "-t", table, "-S"], check=False).stdout
            chains += [
                f"{ipt}/{table}/{ln.split()[1]}" for ln in out.splitlines() if ln.startswith("-N KUBE-")
            ]
    return {
        "processes": _pids_mentioning(str(home())),
        "mounts": _mounts_under(home()),
        "bridge": Path(f"/sys/class/net/{BRIDGE}").exists(),
        "nft_tables": [ln for ln in nft.splitlines() if "kube-proxy" in ln],
        "kube_chains": chains,
        "cgroups": [str(p) for p in _kubepods_cgroups()],
        "state_dir": state_dir().exists(),
    }


def _host_record() -> Path:
    return home() / "host-before.json"


def _record_host() -> None:
    """Remember the sysctls and host dirs as they are before the node touches them (once)."""
    if _host_record().exists():
        return  # an interrupted run recorded the original values; keep them
    record = {
        "sysctls": {k: Path("/proc/sys", k).read_text().strip() for k in SYSCTLS},
        "absent_dirs": [d for d in HOST_DIRS if not Path(d).exists()],
    }
    tmp = _host_record().with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.rename(_host_record())


def _crictl(bin_dir: Path, sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    ep = f"unix://{sock}"
    return _run([str(bin_dir / "crictl"), "--config", "/dev/null", "-r", ep, "-i", ep, *args], check=False)


def teardown(bins: Path) -> None:
    """Remove everything a real node made, in the order that lets each step succeed. Idempotent.

    Caller holds the node lock. Works both after a clean run and after one killed mid-way.
    ``bins`` holds crictl and kube-proxy (``build_node_binaries()``).
    """
    st = state_dir()
    sock = st / "containerd" / "containerd.sock"
    # 1. the kubelet first, so nothing restarts what the next steps remove.
    _kill(_pids_mentioning(str(st / "kubelet")))
    # 2. pod sandboxes outlive the kubelet and containerd (shims): remove them through CRI, so CNI DEL
    #    runs. After a crash containerd may be gone while shims live: start it again for this.
    conf = st / "containerd" / "config.toml"
    started: subprocess.Popen[bytes] | None = None
    if conf.exists() and not _socket_alive(sock):
        started = subprocess.Popen(
            ["containerd", "--config", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _socket_alive(sock):
            time.sleep(0.1)
    if _socket_alive(sock):
        pods = _crictl(bins, sock, "pods", "-q").stdout.split()
        if pods:
            _crictl(bins, sock, "stopp", *pods)
            _crictl(bins, sock, "rmp", "-f", *pods)
    # 3. kube-proxy, then its rules (both modes).
    _kill(_pids_mentioning(str(st / "kube-proxy")))
    _run([str(bins / "kube-proxy"), "--cleanup"], check=False)
    # 4. containerd and any shim left.
    _kill(_pids_mentioning(str(st / "containerd")))
    if started is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            started.wait(5)
    _kill(_pids_mentioning(str(home())), grace=2)
    _kill(_kubepods_pids(), grace=2)
    # 5. the kubelet's own chains.
    for ipt in ("iptables", "ip6tables"):
        for parent in ("INPUT", "OUTPUT"):
            while _run([ipt, "-D", parent, "-j", "KUBE-FIREWALL"], check=False).returncode == 0:
                pass
        for table, chain in KUBELET_CHAINS:
            _run([ipt, "-t", table, "-F", chain], check=False)
            _run([ipt, "-t", table, "-X", chain], check=False)
    # 6. mounts under our dir (volume tmpfs, kubelet's rshared bind, sandbox shm, rootfs overlays,
    #    netns), deepest first.
    for target in sorted(_mounts_under(home()), key=len, reverse=True):
        if _run(["umount", target], check=False).returncode != 0:
            _run(["umount", "-l", target], check=False)
    # 7. the bridge, the sysctls, the host dirs the runtime made.
    _run(["ip", "link", "del", BRIDGE], check=False)
    if _host_record().exists():
        record = json.loads(_host_record().read_text())
        for key, value in record["sysctls"].items():
            Path("/proc/sys", key).write_text(value)
        for d in record["absent_dirs"]:
            _run(["rm", "-rf", d], check=False)
        _host_record().unlink()
    # 8. kubelet cgroups (cgroupfs driver, every v1 hierarchy), leaves first.
    for root in _kubepods_cgroups():
        for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()
    _run(["rm", "-rf", str(st)], check=False)


# --------------------------------------------------------------------------------------------------
# The machine-wide lock
# --------------------------------------------------------------------------------------------------


class MachineLock:
    """``~/.cache/kaito-py/realnode.lock``, re-entrant within this process.

    flock belongs to an open file, so a second flock from the same process would wait for itself; here
    the process holds one open file and counts holders. A test session holds it across its modules so
    another run cannot slip in between two of its nodes.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._file: IO[str] | None = None
        self._depth = 0

    def _flock(self) -> IO[str]:
        home().mkdir(parents=True, exist_ok=True)
        f = open(images.cache_root() / "realnode.lock", "w")  # noqa: SIM115 - kept open while held
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log("another real node runs on this machine; waiting for realnode.lock")
            fcntl.flock(f, fcntl.LOCK_EX)
        return f

    def acquire(self) -> None:
        """Take the lock (waiting for another process that holds it) or add a holder."""
        with self._mutex:
            if self._depth == 0:
                self._file = self._flock()
            self._depth += 1

    def release(self) -> None:
        """Drop a holder; the last one unlocks."""
        with self._mutex:
            self._depth -= 1
            if self._depth == 0 and self._file is not None:
                self._file.close()
                self._file = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for the ``with`` block."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    @contextlib.contextmanager
    def lent(self) -> Iterator[None]:
        """Unlock for the ``with`` block (a child process of ours needs the node), then take it back."""
        with self._mutex:
            depth, self._depth = self._depth, 0
            if self._file is not None:
                self._file.close()
                self._file = None
        try:
            yield
        finally:
            with self._mutex:
                if depth:
                    self._file = self._flock()
                self._depth = depth


MACHINE_LOCK = MachineLock()


# --------------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------------


class RealNode:
    """The real node joined to ``cluster`` (a started ``LocalCluster``, profile ``full``)."""

    def __init__(self, cluster: LocalCluster, bin_dir: Path | None = None, name: str = NODE_NAME) -> None:
        self.cluster = cluster
        self.bin_dir = bin_dir
        self.name = name
        self.pause_ref = ""
        self._locked = False
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self._forwarder: TcpForwarder | None = None

    # ---- paths ---------------------------------------------------------------------------------
    @property
    def socket(self) -> Path:
        """containerd's CRI/API socket."""
        return state_dir() / "containerd" / "containerd.sock"

    @property
    def logs_dir(self) -> Path:
        """One log file per process (containerd, kubelet, kube-proxy)."""
        return state_dir() / "logs"

    # ---- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> RealNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> None:
        """Take the machine-wide lock, sweep leftovers, start the node and wait until it is Ready."""
        reason = unmet_requirements()
        if reason:
            raise RealNodeError(reason)
        if self.bin_dir is None:
            self.bin_dir = build_node_binaries()
        self.pause_ref = images.build(["pause"])["pause"]
        MACHINE_LOCK.acquire()
        self._locked = True
        try:
            teardown(self.bin_dir)
            _record_host()
            self._start(time.monotonic() + timeout)
        except BaseException:
            self._dump_logs()
            self.stop()
            raise

    def _start(self, deadline: float) -> None:
        t0 = time.monotonic()
        st = state_dir()
        for d in ("containerd", "cni/net.d", "cni/ipam", "kubelet/root", "kubelet/pki", "kube-proxy", "logs"):
            (st / d).mkdir(parents=True, exist_ok=True)
        self._write_containerd_config()
        self._spawn("containerd", ["containerd", "--config", str(st / "containerd" / "config.toml")])
        self._wait(deadline, "containerd", lambda: _socket_alive(self.socket))
        self.load(self.pause_ref)

        # The bridge exists before the kubelet: its address is the node IP (no dummy interface here).
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "up"])
        for key in SYSCTLS:
            Path("/proc/sys", key).write_text("1")

        self._write_kubelet_identity()
        self._write_kubelet_config()
        assert self.bin_dir is not None
        self._spawn(
            "kubelet",
            [
                str(self.bin_dir / "kubelet"),
                f"--config={st / 'kubelet' / 'config.yaml'}",
                f"--kubeconfig={st / 'kubelet' / 'kubeconfig'}",
                f"--root-dir={st / 'kubelet' / 'root'}",
                f"--cert-dir={st / 'kubelet' / 'pki'}",
                f"--hostname-override={self.name}",
                f"--node-ip={NODE_IP}",
                f"--node-labels={LABEL_KEY}=true",
                "--v=1",
            ],
        )

        # pods -> apiserver: the forwarder on the node IP and the kubernetes Service's endpoints.
        port = int(self.cluster.server.rsplit(":", 1)[1])
        self._forwarder = TcpForwarder((NODE_IP, APISERVER_FORWARD_PORT), ("127.0.0.1", port))
        self._forwarder.start()
        self.cluster.apply(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "kubernetes-realnode",
                    "namespace": "default",
                    "labels": {
                        "kubernetes.io/service-name": "kubernetes",
                        "endpointslice.kubernetes.io/managed-by": "realnode.local",
                    },
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
                "ports": [{"name": "https", "port": APISERVER_FORWARD_PORT, "protocol": "TCP"}],
            }
        )
        # kube-proxy exits when its Node's IPs change under it: start it once the Node has its IP.
        self._wait(deadline, "kubelet", lambda: self._node().get("internal_ip") == NODE_IP)
        self._write_kube_proxy_config()
        self._spawn(
            "kube-proxy",
            [str(self.bin_dir / "kube-proxy"), f"--config={st / 'kube-proxy' / 'config.yaml'}", "--v=1"],
        )
        self._wait(deadline, "kubelet", lambda: self._node().get("ready", False))
        # kube-proxy's first sync makes its table: from then on Services work on the node.
        nft = ["nft", "list", "table", "ip", "kube-proxy"]
        self._wait(deadline, "kube-proxy", lambda: _run(nft, check=False).returncode == 0)
        _log(
            f"node {self.name} Ready in {time.monotonic() - t0:.1f}s ({NODE_IP}, pods {POD_CIDR}; "
            f"containerd {self.socket})"
        )

    def stop(self) -> None:
        """Tear the node down (see ``teardown``), delete its Node object, release the lock. Idempotent."""
        if not self._locked:
            return
        if self._forwarder is not None:
            self._forwarder.stop()
            self._forwarder = None
        try:
            if self.bin_dir is not None:
                teardown(self.bin_dir)
        finally:
            for p in self._procs.values():
                with contextlib.suppress(Exception):
                    p.wait(1)
            self._procs.clear()
            for f in self._logs.values():
                f.close()
            self._logs.clear()
            with contextlib.suppress(Exception):
                self.cluster.kubectl(
                    "delete", "node", self.name, "--ignore-not-found", "--wait=false", timeout=10
                )
                self.cluster.kubectl(
                    "delete",
                    "endpointslice",
                    "-n",
                    "default",
                    "kubernetes-realnode",
                    "--ignore-not-found",
                    timeout=10,
                )
            self._locked = False
            MACHINE_LOCK.release()

    # ---- images --------------------------------------------------------------------------------
    def images(self) -> set[str]:
        """Names of the images containerd holds for Kubernetes."""
        out = _run(
            ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", "images", "ls", "-q"]
        ).stdout
        return set(out.split())

    def load(self, ref: str, aliases: Sequence[str] = ()) -> None:
        """Make image ``ref`` (from hack/images.py) runnable here, also under ``aliases``.

        Content-tagged refs that containerd already holds (its store persists between runs) are only
        re-tagged. Older content tags of the same repository are removed (containerd then frees their
        content and snapshots), so the kept store does not grow with every source edit. Pods must use
        ``imagePullPolicy: Never`` or a name loaded here: nothing is pulled.
        """
        t0 = time.monotonic()
        have = self.images()
        if ref not in have:
            images.load(ref, str(self.socket))
            _log(f"loaded {ref} in {time.monotonic() - t0:.1f}s")
        if ref.startswith(images.REGISTRY + "/"):
            repo = ref.rsplit(":", 1)[0]
            stale = [n for n in have if n.startswith(repo + ":") and n != ref and n not in aliases]
            if stale:
                ctr = ["ctr", "--address", str(self.socket), "--namespace", "k8s.io"]
                _run([*ctr, "images", "rm", "--sync", *stale], check=False, timeout=300)
        for alias in aliases:
            _run(
                [
                    "ctr",
                    "--address",
                    str(self.socket),
                    "--namespace",
                    "k8s.io",
                    "images",
                    "tag",
                    "--force",
                    ref,
                    alias,
                ]
            )

    # ---- helpers -------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.logs_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs[name] = log
        self._procs[name] = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=pdeathsig_if_main_thread(),  # noqa: PLW1509 - only prctl, no locks
        )

    def _wait(self, deadline: float, name: str, check: Any) -> None:
        while not check():
            proc = self._procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RealNodeError(f"{name} exited during start-up:\n{self._log_tail(name)}")
            if time.monotonic() > deadline:
                raise RealNodeError(f"{name} not ready in time:\n{self._log_tail(name)}")
            time.sleep(0.2)

    def _log_tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join(
                (self.logs_dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:]
            )
        except OSError:
            return ""

    def _dump_logs(self) -> None:
        for name in ("containerd", "kubelet", "kube-proxy"):
            tail = self._log_tail(name)
            if tail:
                print(f"--- {name} ---\n{tail}", file=sys.stderr)

    def _node(self) -> dict[str, Any]:
        status, body = self.cluster.request("GET", f"/api/v1/nodes/{self.name}", timeout=5)
        if status != 200 or not isinstance(body, dict):
            return {}
        addrs = {a["type"]: a["address"] for a in body.get("status", {}).get("addresses", [])}
        conds = {c["type"]: c["status"] for c in body.get("status", {}).get("conditions", [])}
        return {"internal_ip": addrs.get("InternalIP"), "ready": conds.get("Ready") == "True"}

    # ---- configuration -------------------------------------------------------------------------
    def _write_containerd_config(self) -> None:
        st = state_dir()
        root = home() / "containerd"  # content store and snapshots: kept between runs
        cni = {
            "cniVersion": "1.0.0",
            "name": "realnode",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,  # nothing leaves the machine
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(st / "cni" / "ipam"),
                        "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                }
            ],
        }
        (st / "cni" / "net.d" / "10-realnode.conflist").write_text(json.dumps(cni, indent=1))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (st / "containerd" / "config.toml").write_text(
            f"""version = 2
root = "{root}"
state = "{st / "containerd" / "state"}"
[grpc]
  address = "{self.socket}"
[{cri}]
  sandbox_image = "{self.pause_ref}"
  # CAP_SYS_RESOURCE is not in this VM's bounding set: runc cannot lower oom_score_adj below ours.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{st / "runc"}"
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{st / "cni" / "net.d"}"
"""
        )

    def _write_kubelet_identity(self) -> None:
        """A client certificate ``system:node:<name>`` from the cluster CA, and RBAC's system:node role
        for the system:nodes group (the launcher's apiserver has no Node authorizer)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        pki = state_dir() / "kubelet" / "pki"
        ca_dir = self.cluster.workdir / "pki"
        ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"system:node:{self.name}"),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        (pki / "client.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (pki / "client.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (pki / "client.key").chmod(0o600)
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "local",
                    "cluster": {
                        "server": self.cluster.server,
                        "certificate-authority": str(ca_dir / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": "kubelet",
                    "user": {
                        "client-certificate": str(pki / "client.crt"),
                        "client-key": str(pki / "client.key"),
                    },
                }
            ],
            "contexts": [{"name": "default", "context": {"cluster": "local", "user": "kubelet"}}],
            "current-context": "default",
        }
        (state_dir() / "kubelet" / "kubeconfig").write_text(json.dumps(kubeconfig))
        self.cluster.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "realnode-system-nodes"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "system:node",
                },
                "subjects": [
                    {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}
                ],
            }
        )

    def _write_kubelet_config(self) -> None:
        st = state_dir()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            # containerd 1.6 has no RuntimeConfig RPC: the kubelet falls back to the configured driver.
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,  # this host is cgroup v1 (hybrid)
            "failSwapOn": False,
            "oomScoreAdj": 0,  # no CAP_SYS_RESOURCE
            # The apiserver reaches logs/exec/port-forward here (it prefers the InternalIP).
            "address": NODE_IP,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 0,
            # The launcher's apiserver has no kubelet client certificate.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "podCIDR": POD_CIDR,
            "clusterDomain": "cluster.local",
            "resolvConf": "/etc/resolv.conf",
            "podLogsDir": str(st / "pod-logs"),
            "volumePluginDir": str(st / "kubelet" / "volplugins"),
            "registerWithTaints": [TAINT],
            "evictionHard": {
                "memory.available": "200Mi",
                "nodefs.available": "2%",
                "imagefs.available": "2%",
            },
            # Never garbage-collect the imported images: nothing can pull them back.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
        }
        (st / "kubelet" / "config.yaml").write_text(json.dumps(config, indent=1))

    def _write_kube_proxy_config(self) -> None:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.cluster.kubeconfig)},
            "hostnameOverride": self.name,
            "mode": "nftables",
            "clusterCIDR": POD_CIDR,
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "nodePortAddresses": [f"{NODE_IP}/32"],
            # Leave the host's conntrack sysctls alone.
            "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }
        (state_dir() / "kube-proxy" / "config.yaml").write_text(json.dumps(config, indent=1))


def pod_placement() -> dict[str, Any]:
    """The nodeSelector and tolerations that put a pod on the real node (merge into a pod spec)."""
    return {"nodeSelector": dict(NODE_SELECTOR), "tolerations": [dict(TOLERATION)]}


def main(argv: Sequence[str] | None = None) -> int:
    """``teardown``: sweep what a real node left on this machine; ``leftovers``: print it as JSON."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["teardown"]:
        with MACHINE_LOCK.held():
            teardown(build_node_binaries())
        return 0
    if args == ["leftovers"]:
        print(json.dumps(leftovers(), indent=1))
        return 0
    print(
        "usage: realnode.py teardown|leftovers  (start a node with: localcluster.py up --real-node)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
