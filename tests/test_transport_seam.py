"""The transport seam: a server runs on any ``Listener``, not only WebSocket.

An in-memory transport (no sockets) implements ``transports/base.py`` and is
handed to ``Server(transport=...)``; the real hub and driver behind it speak
the protocol exactly as they do over WebSocket.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from rtchat_sdk import protocol as p
from server_ref import Server, ServerConfig
from server_ref.transports import Endpoint, Listener, Transport

pytestmark = pytest.mark.timeout(10)


class MemoryTransport(Transport):
    """One in-memory connection: what the server writes lands in ``frames``."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        self.aborted = False

    def write(self, data: bytes) -> None:
        value = json.loads(data)
        for frame in value if isinstance(value, list) else [value]:
            self.frames.put_nowait(frame)

    def pending_bytes(self) -> int:
        return 0

    async def close(self, code: int, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result((code, reason))

    def abort(self) -> None:
        self.aborted = True


class MemoryListener(Listener):
    """Accepts connections made by the test with ``connect``."""

    def __init__(self, endpoint: Endpoint, config: ServerConfig) -> None:
        self.endpoint = endpoint
        self.config = config
        self.started_on: tuple[str, int] | None = None
        self.accepting = False

    async def start(self, host: str, port: int) -> None:
        self.started_on = (host, port)
        self.accepting = True

    @property
    def port(self) -> int:
        assert self.started_on is not None
        return self.started_on[1]

    def stop_accepting(self) -> None:
        self.accepting = False

    async def wait_closed(self) -> None:
        return None

    def connect(self) -> tuple[int, MemoryTransport]:
        assert self.accepting
        transport = MemoryTransport()
        return self.endpoint.opened(transport), transport


async def test_a_server_on_an_in_memory_transport_speaks_the_protocol() -> None:
    listeners: list[MemoryListener] = []

    def factory(endpoint: Endpoint, config: ServerConfig) -> MemoryListener:
        listener = MemoryListener(endpoint, config)
        listeners.append(listener)
        return listener

    server = Server(ServerConfig(max_frame_bytes=4096), transport=factory)

    @server.on("echo")
    def echo(ctx: Any, data: Any) -> Any:
        return data

    await server.start("127.0.0.1", 9999)
    try:
        (listener,) = listeners
        assert listener.started_on == ("127.0.0.1", 9999)
        assert listener.config.max_frame_bytes == 4096  # the factory gets the server's config
        assert server.port == 9999

        conn, transport = listener.connect()
        hello = {"type": "hello", "protocol": p.PROTOCOL_VERSION, "batch": True}
        await server.received(conn, json.dumps(hello))
        welcome = await asyncio.wait_for(transport.frames.get(), 2)
        assert welcome["type"] == "welcome"
        assert transport.batching  # the hub's Batching command reached the transport

        request = {"type": "request", "id": 1, "ns": "/", "event": "echo", "data": {"x": 1}}
        await server.received(conn, json.dumps(request))
        reply = await asyncio.wait_for(transport.frames.get(), 2)
        assert reply == {"type": "reply", "id": 1, "data": {"x": 1}}

        await server.received(conn, "not json")
        error = await asyncio.wait_for(transport.frames.get(), 2)
        assert error["type"] == "error"
        assert error["code"] == p.ErrorCode.BAD_JSON
    finally:
        await server.close(timeout=1)
    assert not listener.accepting
    assert await asyncio.wait_for(transport.closed, 2) == (
        p.CloseCode.GOING_AWAY,
        "server shutting down",
    )
