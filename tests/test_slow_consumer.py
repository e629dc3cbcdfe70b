"""A client that stops reading is disconnected with 4005, not buffered forever."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from rtchat_sdk import Client
from server_ref import ServerConfig
from tests.conftest import make_server

pytestmark = pytest.mark.timeout(30)


async def drain_until_closed(ws: ClientConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await ws.recv()


async def test_a_consumer_that_stops_reading_is_closed_with_4005() -> None:
    srv = make_server(ServerConfig(max_pending_bytes=256 * 1024))
    await srv.start("127.0.0.1", 0)
    try:
        # max_queue=1: once one frame waits unread, websockets stops reading the
        # socket, so the server's send buffer is what fills up.
        slow = await connect(srv.url, proxy=None, max_queue=1)
        await slow.send(json.dumps({"type": "hello", "protocol": 1}))
        await slow.send(json.dumps({"type": "join", "id": 1, "room": "firehose"}))
        async with Client(srv.url) as publisher:
            await publisher.join("firehose")
            blob = "x" * 8192
            # Bounded: 2,000 x 8 KiB = 16 MiB, far above every buffer on the way.
            for i in range(2000):
                await publisher.publish("firehose", "blob", {"i": i, "blob": blob})
        # Reading again, the slow client drains what was buffered, then sees the close.
        async with asyncio.timeout(15):
            await drain_until_closed(slow)
        assert slow.close_code == 4005
    finally:
        await srv.close(timeout=1)
