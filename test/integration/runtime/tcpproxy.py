"""A loopback TCP proxy for fault injection in watch tests (asyncio, stdlib only).

* ``blackhole()``: connections open *now* stop forwarding in both directions but stay open -- a
  half-open watch as a dead NAT entry or a stuck load balancer produces; new connections work.
* ``cut()``: close every connection and refuse new ones (closed right after accept) until ``resume()``.
"""

from __future__ import annotations

import asyncio
import contextlib


class _Conn:
    def __init__(self) -> None:
        self.frozen = asyncio.Event()  # set -> stop forwarding
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._refusing = False
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._refusing:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        conn = _Conn()
        conn.writers = [writer, up_writer]
        self._conns.add(conn)
        conn.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, conn)),
            asyncio.create_task(self._pump(up_reader, writer, conn)),
        ]
        try:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            self._conns.discard(conn)
            for w in conn.writers:
                w.close()

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, conn: _Conn) -> None:
        try:
            while not conn.frozen.is_set():
                data = await src.read(65536)
                if not data:
                    break
                if conn.frozen.is_set():
                    break
                dst.write(data)
                await dst.drain()
            if conn.frozen.is_set():
                # Half-open: keep both sockets open, forward nothing, until the proxy closes.
                await asyncio.Event().wait()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()

    def blackhole(self) -> int:
        """Freeze every open connection (returns how many)."""
        for conn in self._conns:
            conn.frozen.set()
        return len(self._conns)

    async def cut(self) -> None:
        """Close every connection and refuse new ones until :meth:`resume`."""
        self._refusing = True
        conns = list(self._conns)
        for conn in conns:
            for t in conn.tasks:
                t.cancel()
        for conn in conns:
            await asyncio.gather(*conn.tasks, return_exceptions=True)

    def resume(self) -> None:
        """Accept and forward new connections again."""
        self._refusing = False

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            for t in conn.tasks:
                t.cancel()
        handlers = list(self._handlers)
        for t in handlers:
            t.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
