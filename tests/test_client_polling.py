"""The Python client over HTTP long polling: chosen, or fallen back to when the WebSocket
upgrade is refused; and resuming without loss when the polling connection breaks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rtchat_sdk import Client, Delivery, ReconnectPolicy
from server_ref import ServerConfig
from server_ref.asgi import RtchatApp, create_app
from tests.faultproxy import FaultProxy
from tests.test_asgi import echo_server, serving

pytestmark = pytest.mark.timeout(30)

FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.3)


class Received:
    def __init__(self, client: Client) -> None:
        self.items: list[tuple[Any, int]] = []
        self.changed = asyncio.Event()
        client.on("m")(self.add)

    def add(self, data: Any, meta: Delivery) -> None:
        self.items.append((data, meta.offset))
        self.changed.set()

    async def wait_for(self, count: int) -> list[tuple[Any, int]]:
        async with asyncio.timeout(15):
            while len(self.items) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.items


@contextlib.asynccontextmanager
async def proxied(app: RtchatApp) -> AsyncIterator[tuple[FaultProxy, Client, Client, Received]]:
    """``app`` under uvicorn; a polling client through a fault proxy and a WebSocket
    publisher, both in room ``r``: (proxy, poller, publisher, what the poller received)."""
    async with (
        serving(app) as base,
        FaultProxy(int(base.rsplit(":", 1)[1])) as proxy,
        Client(proxy.url, transports=("polling",), reconnect=FAST) as poller,
        Client(base.replace("http://", "ws://")) as publisher,
    ):
        received = Received(poller)
        await poller.join("r")
        await publisher.join("r")
        yield proxy, poller, publisher, received


async def test_a_polling_client_requests_joins_publishes_and_receives() -> None:
    async with serving(create_app(echo_server())) as base:
        ws = base.replace("http://", "ws://")
        async with Client(ws, transports=("polling",)) as poller, Client(ws) as other:
            assert (poller.transport, other.transport) == ("polling", "websocket")
            assert await poller.request("echo", {"n": 1}, timeout=5) == {"n": 1}
            received = Received(poller)
            await poller.join("r")
            await other.join("r")
            offsets = [await other.publish("r", "m", i) for i in range(30)]
            assert await received.wait_for(30) == list(zip(range(30), offsets, strict=True))
            back = Received(other)
            await poller.publish("r", "m", "from polling")
            assert (await back.wait_for(1))[0][0] == "from polling"


async def test_a_refused_websocket_upgrade_falls_back_to_polling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(create_app(echo_server(), websocket=False)) as base:
        ws = base.replace("http://", "ws://")
        async with Client(ws) as client:
            assert client.transport == "polling"
            assert await client.request("echo", "over http", timeout=5) == "over http"
        assert "trying HTTP long polling" in caplog.text
        with pytest.raises(Exception, match="cannot connect"):
            async with Client(ws, transports=("websocket",)):
                pass


async def test_a_lost_polling_connection_resumes_its_session_and_loses_nothing() -> None:
    app = create_app(echo_server())
    async with serving(app) as base:
        ws = base.replace("http://", "ws://")
        async with (
            Client(ws, transports=("polling",), reconnect=FAST) as poller,
            Client(ws) as publisher,
        ):
            received = Received(poller)
            await poller.join("r")
            await publisher.join("r")
            session = poller.session_id
            for i in range(40):
                await publisher.publish("r", "m", i)
                if i == 15:  # the server forgets the polling connection (as after its
                    # idle timeout): the client's next request gets 404 and it reconnects
                    for connection in list(app.polling.connections.values()):
                        await app.polling._finish(connection, None)
            items = await received.wait_for(40)
            assert [data for data, _ in items] == list(range(40))
            assert poller.session_id == session  # resumed, not a new session
            assert poller.counters["reconnects"] >= 1
            assert poller.counters["gaps"] == 0


async def test_dropped_http_connections_are_asked_again_on_the_same_polling_connection() -> None:
    async with proxied(create_app(echo_server())) as (proxy, poller, publisher, received):
        for i in range(40):
            await publisher.publish("r", "m", i)
            if i in (10, 25):
                proxy.drop()  # every TCP connection of the poller, mid-poll
        items = await received.wait_for(40)
        assert [data for data, _ in items] == list(range(40))
        assert poller.counters["reconnects"] == 0  # one polling connection throughout
        assert proxy.stats.drops == 2


async def test_many_requests_at_once_are_split_over_posts_within_the_servers_limit() -> None:
    config = ServerConfig(poll_max_frames=10)
    async with serving(create_app(echo_server(config))) as base:
        ws = base.replace("http://", "ws://")
        async with Client(ws, transports=("polling",)) as client:
            answers = await asyncio.gather(
                *(client.request("echo", i, timeout=10) for i in range(250))
            )
            assert answers == list(range(250))


async def test_a_poll_answer_cut_mid_body_is_delivered_by_the_next_poll_once() -> None:
    app = create_app(echo_server())
    async with proxied(app) as (proxy, poller, publisher, received):
        (sid,) = app.polling.connections
        async with asyncio.timeout(5):  # the client's next poll is held
            while not app.polling.connections[sid].holding:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        proxy.cut_mid_frame()  # the held poll's answer will be cut half-way
        await publisher.publish("r", "m", "cut")
        assert await received.wait_for(1) == [("cut", 1)]
        assert await poller.request("echo", "after", timeout=5) == "after"
        assert proxy.stats.cuts == 1
        assert list(app.polling.connections) == [sid]  # the same connection
        assert poller.counters["reconnects"] == 0
        assert len(received.items) == 1
