"""The client's write path: frames leave in order, and back-pressure is respected."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rtchat_sdk import Client, Outbox
from tests.conftest import make_server

pytestmark = pytest.mark.timeout(30)


async def test_writes_wait_while_the_transport_pushes_back_and_keep_their_order() -> None:
    srv = make_server()
    release = asyncio.Event()
    seen: list[int] = []

    @srv.on("hold")
    async def hold(ctx: object) -> None:
        await release.wait()  # the server stops reading this connection meanwhile

    @srv.on("big")
    def big(ctx: object, data: dict[str, Any]) -> None:
        seen.append(data["i"])

    await srv.start("127.0.0.1", 0)
    try:
        async with Client(srv.url, outbox=Outbox(max_bytes=64_000_000)) as client:
            held = asyncio.create_task(client.emit("hold"))
            blob = "x" * 100_000
            # 20 MB, more than the socket buffers hold: the transport pauses writing.
            first = [
                asyncio.create_task(client.emit("big", {"i": i, "blob": blob})) for i in range(200)
            ]
            for _ in range(3):  # the tasks queue their frames; the next pass writes them
                await asyncio.sleep(0)
            assert client._link._write_blocked
            # Queued while the writer waits for the transport: written after the others.
            later = [
                asyncio.create_task(client.emit("big", {"i": i, "blob": blob}))
                for i in range(200, 250)
            ]
            for _ in range(3):
                await asyncio.sleep(0)
            assert client._link._write_blocked
            assert client._session.has_data_to_send()
            release.set()
            async with asyncio.timeout(20):
                await asyncio.gather(held, *first, *later)
            assert not client._link._write_blocked
            assert await client.request("echo", "after") == "after"
        assert seen == list(range(250))
        assert client.counters["sent"] == 252
    finally:
        release.set()
        await srv.close()


async def test_a_burst_of_requests_is_answered_in_order() -> None:
    srv = make_server()
    await srv.start("127.0.0.1", 0)
    try:
        async with Client(srv.url) as client:
            replies = await asyncio.gather(*(client.request("echo", i) for i in range(500)))
            assert replies == list(range(500))
            assert client.counters["sent"] == 500
    finally:
        await srv.close()
