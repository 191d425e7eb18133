"""hack/realnode.TcpForwarder: the pods' path to the apiserver (node IP:6443 -> 127.0.0.1:<port>).
Real sockets on loopback: bytes both ways, many connections, and stop() cutting live connections."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from hack.localcluster import free_port
from hack.realnode import TcpForwarder


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def test_forwards_both_ways_on_concurrent_connections(echo: int) -> None:
    fwd = TcpForwarder(("127.0.0.1", free_port()), ("127.0.0.1", echo))
    fwd.start()
    try:
        conns = [socket.create_connection(fwd.listen, timeout=5) for _ in range(5)]
        payload = bytes(range(256)) * 1024  # 256 KiB: several recv/sendall rounds
        for i, c in enumerate(conns):
            c.sendall(payload[i:])
        for i, c in enumerate(conns):
            assert _recv_exactly(c, len(payload) - i) == payload[i:]
        for c in conns:
            c.close()
    finally:
        fwd.stop()


def test_stop_cuts_live_connections_and_the_listener(echo: int) -> None:
    fwd = TcpForwarder(("127.0.0.1", free_port()), ("127.0.0.1", echo))
    fwd.start()
    c = socket.create_connection(fwd.listen, timeout=5)
    c.sendall(b"ping")
    assert _recv_exactly(c, 4) == b"ping"
    fwd.stop()
    assert c.recv(10) == b""  # the forwarded connection was closed
    c.close()
    with pytest.raises(OSError):
        socket.create_connection(fwd.listen, timeout=2)


def test_a_refused_upstream_closes_the_client() -> None:
    fwd = TcpForwarder(("127.0.0.1", free_port()), ("127.0.0.1", free_port()))
    fwd.start()
    try:
        c = socket.create_connection(fwd.listen, timeout=5)
        assert c.recv(10) == b""
        c.close()
    finally:
        fwd.stop()
