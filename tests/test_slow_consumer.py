"""A client that stops reading is disconnected with 4005, not buffered forever."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from rtchat_sdk import Client, ReconnectPolicy
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


async def test_slow_handlers_pause_reading_and_the_client_resumes_without_loss() -> None:
    srv = make_server(ServerConfig(max_pending_bytes=64 * 1024, history_size=10_000))
    await srv.start("127.0.0.1", 0)
    try:
        release = asyncio.Event()
        got: list[int] = []
        all_in = asyncio.Event()
        total = 2000
        slow = Client(
            srv.url,
            max_pending_deliveries=10,
            reconnect=ReconnectPolicy(initial_delay=0.05, max_delay=0.1),
        )

        @slow.on("n")
        async def handle(data: dict[str, int]) -> None:
            await release.wait()
            got.append(data["i"])
            if len(got) == total:
                all_in.set()

        async with slow, Client(srv.url) as publisher:
            await slow.join("feed")
            await publisher.join("feed")
            pad = "p" * 16 * 1024  # 32 MiB in all: more than every buffer on the way
            for i in range(total):
                await publisher.publish("feed", "n", {"i": i, "pad": pad})
            release.set()
            await asyncio.wait_for(all_in.wait(), 20)
            assert got == list(range(total))
            assert slow.counters["reconnects"] >= 1  # it was cut off as a slow consumer
            assert slow.counters["gaps"] == 0
    finally:
        await srv.close(timeout=1)
