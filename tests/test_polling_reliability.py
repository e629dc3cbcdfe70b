"""The reliability scenarios of ``test_resume.py`` with the client on HTTP long polling.

The server is a real one whose port is served through the ASGI app under
uvicorn (``Server(transport=uvicorn_listener)``, as ``rtchat-server --asgi``);
the polling client reaches it through the fault proxy. A link that breaks
briefly is recovered on the same polling connection (its requests asked
again); one that stays down past that resumes the session on a new one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from rtchat_sdk import Client, ConnectionState, ReconnectPolicy
from server_ref import Context, Server
from server_ref.asgi import uvicorn_listener
from tests.faultproxy import FaultProxy
from tests.helpers import Inbox
from tests.test_resume import take_offline, wait_state

pytestmark = pytest.mark.timeout(40)

FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.3)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server(transport=uvicorn_listener)
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.close()


@pytest.fixture
async def proxy(server: Server) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(server.port) as p:
        yield p


def polling(url: str) -> Client:
    return Client(url, transports=("polling",), reconnect=FAST)


async def test_a_link_down_past_the_retries_resumes_and_replays_what_was_missed(
    server: Server, proxy: FaultProxy
) -> None:
    async with Client(server.url) as sender, polling(proxy.url) as receiver:
        inbox = Inbox(receiver)
        await sender.join("r")
        await receiver.join("r")
        session = receiver.session_id
        await sender.publish("r", "m", 0)
        await inbox.wait_for(1)
        await take_offline(receiver, proxy)  # refused: the retries run out, it reconnects
        for i in range(1, 6):
            await sender.publish("r", "m", i)  # the receiver is away
        proxy.refuse(False)
        await wait_state(receiver, ConnectionState.CONNECTED)
        await sender.publish("r", "m", 6)
        assert await inbox.settle(server) == list(range(7))
        assert receiver.session_id == session
        assert receiver.counters["gaps"] == 0
        assert receiver.counters["reconnects"] >= 1


async def test_messages_sent_while_down_wait_in_the_outbox_and_go_in_order(
    server: Server, proxy: FaultProxy
) -> None:
    async with Client(server.url) as watcher, polling(proxy.url) as sender:
        inbox = Inbox(watcher)
        await watcher.join("r")
        await sender.join("r")
        await take_offline(sender, proxy)
        sends = [asyncio.ensure_future(sender.publish("r", "m", i)) for i in range(20)]
        await asyncio.sleep(0)  # let them queue
        assert sender.outbox_size == 20
        proxy.refuse(False)
        offsets = await asyncio.gather(*sends)
        assert offsets == list(range(1, 21))
        assert await inbox.settle(server) == list(range(20))


async def test_a_request_whose_answer_is_cut_runs_once(server: Server, proxy: FaultProxy) -> None:
    calls: list[int] = []
    started = asyncio.Event()
    release = asyncio.Event()

    @server.on("count")
    async def count(ctx: Context, n: int) -> int:
        calls.append(n)
        started.set()
        await release.wait()
        return n * 2

    async with polling(proxy.url) as client:
        pending = asyncio.ensure_future(client.request("count", 21))
        await asyncio.wait_for(started.wait(), 5)
        proxy.drop()  # processed; the poll that would carry the reply is cut
        release.set()
        assert await pending == 42
        assert calls == [21]
