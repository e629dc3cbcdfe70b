"""A fault-injecting TCP proxy for tests: clients connect to it, it forwards to
the server, and a test can break the link the ways real networks do.

* ``drop()``: close every proxied connection at once (both sides see EOF/RST);
* ``blackhole(True)``: keep TCP up but forward nothing, like a middlebox that
  silently discards traffic (a half-open link);
* ``delay(s)``: hold every chunk ``s`` seconds before forwarding (order kept);
* ``cut_mid_frame()``: forward half of the next server->client chunk, then
  drop the connection, so the client sees a truncated WebSocket frame;
* ``refuse(True)``: accept new connections and close them at once;
* ``end_blackhole()``: stop discarding, and drop the links that lost bytes to
  the blackhole and are still up (see its docstring).

``FaultProxy(port, read_buffer=n)`` makes the proxy's connections to the
server read through a receive buffer of about ``n`` bytes (kernel and proxy
both), like a narrow link, instead of loopback's megabytes.

It listens on 127.0.0.1 only. Every task it starts is tracked and stopped by
``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FaultProxy", "ProxyStats"]


@dataclass
class ProxyStats:
    accepted: int = 0
    refused: int = 0
    drops: int = 0
    cuts: int = 0
    blackholes: int = 0
    holed_drops: int = 0
    delays: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    faults: list[str] = field(default_factory=list)


class _Link:
    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.client_reader, self.client_writer = client
        self.server_reader, self.server_writer = server
        self.tasks: list[asyncio.Task[None]] = []
        self.cut_next = False
        self.discarded = 0

    def abort(self) -> None:
        for writer in (self.client_writer, self.server_writer):
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()


class FaultProxy:
    """TCP proxy 127.0.0.1:<port> -> target, with faults on demand."""

    def __init__(
        self, target_port: int, target_host: str = "127.0.0.1", *, read_buffer: int | None = None
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.read_buffer = read_buffer
        self.stats = ProxyStats()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._blackholed = False
        self._delay = 0.0
        self._refusing = False
        self._new_link = asyncio.Event()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def links(self) -> int:
        return len(self._links)

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_for_links(self, count: int) -> None:
        """Wait until at least ``count`` connections are being proxied."""
        while len(self._links) < count:
            self._new_link.clear()
            await self._new_link.wait()

    # ------------------------------------------------------------------
    # Faults

    def drop(self) -> int:
        """Abort every proxied connection; returns how many."""
        links = list(self._links)
        for link in links:
            link.abort()
        self.stats.drops += 1
        self.stats.faults.append(f"drop({len(links)})")
        return len(links)

    def blackhole(self, on: bool = True) -> None:
        """Silently discard traffic in both directions while on."""
        if on and not self._blackholed:
            self.stats.blackholes += 1
            self.stats.faults.append("blackhole")
        self._blackholed = on

    def end_blackhole(self) -> int:
        """Stop discarding traffic; returns how many links were dropped doing so.

        Discarding bytes and then forwarding again would leave a hole in the
        middle of a live TCP stream, which no real network produces (TCP
        retransmits what a middlebox lost). A real blackhole either heals
        before anyone notices (that is the ``delay`` fault) or the link dies.
        So a link that lost bytes and is still up (its peers have not yet
        noticed) is dropped here, as its heartbeats would have dropped it.
        """
        holed = [link for link in self._links if link.discarded]
        for link in holed:
            link.abort()
        self.stats.holed_drops += len(holed)
        self._blackholed = False
        return len(holed)

    def delay(self, seconds: float) -> None:
        """Hold each forwarded chunk this long (0 to stop)."""
        if seconds > 0:
            self.stats.delays += 1
            self.stats.faults.append(f"delay({seconds:.3f})")
        self._delay = seconds

    def cut_mid_frame(self) -> None:
        """Forward half of each link's next server->client chunk, then drop it."""
        for link in self._links:
            link.cut_next = True
        self.stats.cuts += 1
        self.stats.faults.append("cut")

    def refuse(self, on: bool = True) -> None:
        """Close new connections immediately while on."""
        self._refusing = on

    # ------------------------------------------------------------------

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.read_buffer is None:
            return await asyncio.open_connection(self.target_host, self.target_port)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Before connecting, so that the window offered to the server is small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.read_buffer)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, (self.target_host, self.target_port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=self.read_buffer)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.stats.refused += 1
            writer.transport.abort()
            return
        try:
            upstream = await self._connect_upstream()
        except OSError:
            self.stats.refused += 1
            writer.transport.abort()
            return
        self.stats.accepted += 1
        link = _Link((reader, writer), upstream)
        self._links.add(link)
        self._new_link.set()
        up = self._spawn(self._pump(link, link.client_reader, link.server_writer, upward=True))
        down = self._spawn(self._pump(link, link.server_reader, link.client_writer, upward=False))
        link.tasks = [up, down]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(up, down, return_exceptions=True)
        self._links.discard(link)
        link.abort()

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upward: bool,
    ) -> None:
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                if self._delay:
                    await asyncio.sleep(self._delay)
                if self._blackholed:
                    link.discarded += len(chunk)
                    continue
                if not upward and link.cut_next and len(chunk) > 1:
                    writer.write(chunk[: len(chunk) // 2])
                    with contextlib.suppress(ConnectionError):
                        await writer.drain()
                    break
                writer.write(chunk)
                if upward:
                    self.stats.bytes_up += len(chunk)
                else:
                    self.stats.bytes_down += len(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            link.abort()
