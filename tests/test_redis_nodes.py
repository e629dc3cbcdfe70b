"""Several nodes on one Redis behave as one server (in-process nodes, each with its own broker).

Each node is a ``Server`` with its own ``RedisBroker`` (its own connections,
pub/sub and relay), as separate processes would have; they share only Redis,
under a key prefix of the test's own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from rtchat_sdk import Client, Delivery
from rtchat_sdk import protocol as p
from server_ref import Context, Server, ServerConfig
from server_ref.broker.redis import RedisBroker
from tests.redis_support import cleanup, exchange, new_prefix, require_redis

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

Nodes = Callable[[int], Awaitable[list[Server]]]
ROOM = p.room_stream(p.DEFAULT_NAMESPACE, "r")


async def read_until_closed(ws: ClientConnection) -> None:
    while True:
        await ws.recv()


@pytest.fixture
async def nodes() -> AsyncIterator[Nodes]:
    """``await nodes(n)``: n started nodes sharing one Redis prefix; all closed at the end."""
    url = await require_redis()
    prefix = new_prefix()
    started: list[Server] = []

    async def start(count: int) -> list[Server]:
        made = []
        for _ in range(count):
            server = Server(ServerConfig(), broker=RedisBroker(url, prefix=prefix))

            @server.on("whoami")
            def whoami(ctx: Context) -> str:
                return ctx.session_id

            await server.start("127.0.0.1", 0)
            started.append(server)
            made.append(server)
        return made

    try:
        yield start
    finally:
        for server in started:
            await server.close()
        await cleanup(url, prefix)


async def test_clients_on_two_nodes_get_each_others_messages_once_in_order(nodes: Nodes) -> None:
    node_a, node_b = await nodes(2)
    async with Client(node_a.url) as alice, Client(node_b.url) as bob:
        await exchange(alice, bob, 2_000)


async def test_concurrent_publishes_from_two_nodes_make_one_gap_free_sequence(
    nodes: Nodes,
) -> None:
    node_a, node_b = await nodes(2)
    offsets = await asyncio.gather(
        *(node.publish("r", "m", i) for i in range(200) for node in (node_a, node_b))
    )
    assert sorted(offsets) == list(range(1, 401))


async def test_a_direct_send_reaches_a_session_on_another_node(nodes: Nodes) -> None:
    node_a, node_b = await nodes(2)
    async with Client(node_b.url) as bob:
        got: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()

        @bob.on("hi")
        def hi(data: str, meta: Delivery) -> None:
            got.set_result((data, meta.offset))

        assert bob.session_id is not None
        await node_a.send_to(bob.session_id, "hi", "from a")
        assert await asyncio.wait_for(got, 5) == ("from a", 1)


async def test_a_session_resumed_on_another_node_keeps_its_rooms_and_closes_the_old_link(
    nodes: Nodes,
) -> None:
    node_a, node_b = await nodes(2)
    async with connect(node_a.url) as first:
        await first.send(json.dumps({"type": "hello", "protocol": 1}))
        welcome = json.loads(await first.recv())
        await first.send(json.dumps({"type": "join", "id": 1, "room": "r"}))
        joined = json.loads(await first.recv())
        await first.send(json.dumps({"type": "request", "id": 2, "event": "whoami"}))
        assert json.loads(await first.recv())["data"] == welcome["session"]
        epoch = joined["data"]["epoch"]
        await node_b.publish("r", "m", "while it moves")
        resume = {
            "token": welcome["token"],
            "session": welcome["session"],
            "streams": [{"stream": ROOM, "epoch": epoch, "offset": 0, "ns": "/", "room": "r"}],
            "last_reply": 0,
        }
        async with connect(node_b.url) as second:
            await second.send(json.dumps({"type": "hello", "protocol": 1, "resume": resume}))
            again = json.loads(await second.recv())
            assert (again["type"], again["session"], again["resumed"]) == (
                "welcome",
                welcome["session"],
                True,
            )
            # The old link is closed with 4006 by its node, wherever it is.
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(read_until_closed(first), 10)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == p.CloseCode.SESSION_REPLACED
            # Replayed from the shared log; the resent request gets its first reply.
            replayed = json.loads(await second.recv())
            assert (replayed["type"], replayed["offset"], replayed["data"]) == (
                "message",
                1,
                "while it moves",
            )
            await second.send(json.dumps({"type": "request", "id": 2, "event": "whoami"}))
            assert json.loads(await second.recv())["data"] == welcome["session"]
            assert node_b.session_ids() == [welcome["session"]]


async def test_a_publish_resent_to_another_node_gets_its_first_offset(nodes: Nodes) -> None:
    node_a, node_b = await nodes(2)
    async with connect(node_a.url) as first:
        await first.send(json.dumps({"type": "hello", "protocol": 1}))
        welcome = json.loads(await first.recv())
        await first.send(json.dumps({"type": "join", "id": 1, "room": "r"}))
        await first.recv()
        publish = {"type": "publish", "id": 2, "room": "r", "event": "m", "data": "once"}
        await first.send(json.dumps(publish))
        acked = json.loads(await first.recv())
        await first.close(code=p.CloseCode.GOING_AWAY)  # dropped, not a goodbye
    resume = {"token": welcome["token"], "session": welcome["session"], "last_reply": 1}
    async with connect(node_b.url) as second:
        await second.send(json.dumps({"type": "hello", "protocol": 1, "resume": resume}))
        assert json.loads(await second.recv())["resumed"] is True
        await second.send(json.dumps(publish))  # its reply was lost: sent again
        again = json.loads(await second.recv())
        assert again == acked
    assert (await node_b.broker.position(ROOM))[1] == 1
