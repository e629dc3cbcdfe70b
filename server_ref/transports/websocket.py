"""The WebSocket transport, over websockets' asyncio server.

Writes take one path: ``write`` frames the data at once (or adds it to the
connection's batch) and the connection's bytes reach the socket at the end
of the event-loop pass, so what one pass produced for a connection (the
replies to messages that arrived together, the deliveries of a batch of
publishes) leaves in one ``send()`` system call instead of one each, and,
for a client that accepts batches, in one WebSocket message of at most
``max_frame_bytes``. The reader waits for the socket to drain when the
transport says its buffer is full, as ``ws.send()`` did for each frame.
websockets' exceptions stop here.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from rtchat_sdk import protocol as p
from rtchat_sdk.wsio import write_framed

from ..config import ServerConfig
from .addresses import client_address, forwarded_for, trusted_networks
from .base import Endpoint, Listener, Transport, bearer_token
from .http_front import HttpService, front_for
from .origins import origin_allowed

__all__ = ["WebSocketListener", "WebSocketTransport", "websocket_listener"]

log = logging.getLogger("server_ref")

_WRITE_NOW_BYTES = 64 * 1024
"""Unwritten bytes past which ``write`` writes at once instead of at the end of the pass."""


class _Writer:
    """The end-of-pass write for every connection of one listener."""

    __slots__ = ("_loop", "_unwritten")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._unwritten: list[WebSocketTransport] = []

    def due(self, transport: WebSocketTransport) -> None:
        if not self._unwritten:
            self._loop.call_soon(self._write_pending)
        self._unwritten.append(transport)

    def _write_pending(self) -> None:
        transports, self._unwritten = self._unwritten, []
        for transport in transports:
            transport.write_out()


class WebSocketTransport(Transport):
    """One websockets connection."""

    kind = "websocket"

    __slots__ = ("_writer", "batch", "batch_bytes", "max_frame_bytes", "unwritten", "ws")

    def __init__(self, ws: ServerConnection, writer: _Writer, max_frame_bytes: int) -> None:
        self.ws = ws
        self._writer = writer
        self.max_frame_bytes = max_frame_bytes
        self.batching = False
        self.unwritten = 0
        """Bytes framed (or batched) and not yet handed to the socket."""
        self.batch: list[bytes] = []
        self.batch_bytes = 0

    def write(self, data: bytes) -> None:
        protocol = self.ws.protocol
        if protocol.state is not State.OPEN:
            return  # as ws.send() would refuse
        if self.batching:
            if self.batch and self.batch_bytes + len(data) + 2 > self.max_frame_bytes:
                self._seal()
            self.batch.append(data)
            self.batch_bytes += len(data) + 1
        else:
            protocol.send_text(data)
        if not self.unwritten:  # the first frame since the last write: one is due
            self._writer.due(self)
        self.unwritten += len(data)
        if self.unwritten >= _WRITE_NOW_BYTES:
            self.write_out()

    def pending_bytes(self) -> int:
        transport = self.ws.transport
        if transport is None:
            return 0
        return transport.get_write_buffer_size() + self.unwritten

    def _seal(self) -> None:
        """Frame the batched frames as one WebSocket message (a lone frame as itself)."""
        batch = self.batch
        if not batch:
            return
        protocol = self.ws.protocol
        if protocol.state is State.OPEN:
            protocol.send_text(batch[0] if len(batch) == 1 else p.encode_batch(batch))
        batch.clear()
        self.batch_bytes = 0

    def write_out(self) -> None:
        """Hand everything framed for the connection to the socket, in one write."""
        if self.unwritten == 0:
            return  # written already (a large batch, or back-pressure)
        self.unwritten = 0
        self._seal()
        try:
            write_framed(self.ws)
        except Exception:  # as websockets does: a connection we cannot write to is dead
            log.debug("write failed", exc_info=True)
            self.abort()

    async def close(self, code: int, reason: str) -> None:
        self._seal()  # what was queued goes before the close frame
        await self.ws.close(code, reason)

    def abort(self) -> None:
        if self.ws.transport is not None:
            self.ws.transport.abort()

    async def drain(self) -> None:
        """Wait while the socket's buffer is above its high-water mark."""
        if self.ws.paused:
            self.write_out()
            try:
                await self.ws.drain()
            except Exception:  # the connection was lost: the reader sees it next
                log.debug("connection lost while draining", exc_info=True)


class WebSocketListener(Listener):
    """websockets' server feeding an ``Endpoint``, with plain HTTP (long polling, health,
    ``/rtchat.js``) on the same port through ``http_front``."""

    def __init__(self, endpoint: Endpoint, config: ServerConfig) -> None:
        self._endpoint = endpoint
        self._max_frame_bytes = config.max_frame_bytes
        self._compression = config.compression
        self._config = config
        self._trusted = trusted_networks(config.trusted_proxies)
        self.http = HttpService(endpoint, config)
        """The plain HTTP requests on the port, long polling among them."""
        self._front = front_for(self.http, config)
        self._server: WsServer | None = None
        self._writer: _Writer | None = None
        self._port: int | None = None

    async def start(self, host: str, port: int) -> None:
        self._writer = _Writer(asyncio.get_running_loop())
        self._server = await serve(
            self._handle,
            host,
            port,
            create_connection=self._front,
            max_size=self._max_frame_bytes,
            ping_interval=None,  # rtchat's own heartbeats run at the app level
            compression="deflate" if self._compression else None,
            ssl=self._config.server_ssl(),  # the front then reads decrypted bytes
            process_request=self._check_origin,
        )
        self._port = next(iter(self._server.sockets)).getsockname()[1]

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server is not started")
        return self._port

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets (to tune their options)."""
        return [] if self._server is None else list(self._server.sockets)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=False)

    async def wait_closed(self) -> None:
        await self.http.close()
        if self._server is not None:
            await self._server.wait_closed()

    def _check_origin(self, ws: ServerConnection, request: Request) -> Response | None:
        """403 for a handshake from a page whose origin is not allowed (origins.py)."""
        if origin_allowed(self._config.allowed_origins, request.headers.get("Origin")):
            return None
        return ws.respond(403, "origin not allowed\n")

    async def _handle(self, ws: ServerConnection) -> None:
        assert self._writer is not None  # set by start(), before any connection
        transport = WebSocketTransport(ws, self._writer, self._max_frame_bytes)
        headers = list(ws.request.headers.raw_items()) if ws.request else []
        transport.bearer = bearer_token(headers)
        peer = ws.remote_address
        transport.address = client_address(
            str(peer[0]) if peer else None, forwarded_for(headers), self._trusted
        )
        endpoint = self._endpoint
        conn = endpoint.opened(transport)
        try:
            async for text in ws:
                await endpoint.received(conn, text)
                if ws.paused:  # the socket is above its high-water mark: back-pressure
                    await transport.drain()
        except ConnectionClosed:
            pass
        finally:
            goodbye = ws.protocol.close_rcvd
            await endpoint.closed(conn, None if goodbye is None else goodbye.code)


def websocket_listener(endpoint: Endpoint, config: ServerConfig) -> WebSocketListener:
    """The default ``ListenerFactory``: WebSocket with the config's frame limit and compression."""
    return WebSocketListener(endpoint, config)
