"""Several servers over one broker behave as one: here, two nodes sharing a MemoryBroker.

The broker's session records name the node that holds a session's live
connection, so a session resumed on another node closes its old connection
with 4006 (``session_replaced``) wherever that one is.
"""

from __future__ import annotations

import json

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from rtchat_sdk import protocol as p
from server_ref import MemoryBroker, Server

pytestmark = pytest.mark.timeout(15)


async def read_until_closed(ws: ClientConnection) -> None:
    while True:
        await ws.recv()


async def test_a_session_resumed_on_another_node_closes_the_old_connection_with_4006() -> None:
    broker = MemoryBroker()
    node_a, node_b = Server(broker=broker), Server(broker=broker)
    await node_a.start("127.0.0.1", 0)
    await node_b.start("127.0.0.1", 0)
    try:
        async with connect(node_a.url) as first:
            await first.send(json.dumps({"type": "hello", "protocol": 1}))
            welcome = json.loads(await first.recv())
            assert welcome["type"] == "welcome"
            resume = {"token": welcome["token"], "session": welcome["session"], "streams": []}
            async with connect(node_b.url) as second:
                await second.send(json.dumps({"type": "hello", "protocol": 1, "resume": resume}))
                again = json.loads(await second.recv())
                assert (again["type"], again["session"], again["resumed"]) == (
                    "welcome",
                    welcome["session"],
                    True,
                )
                with pytest.raises(ConnectionClosed) as closed:
                    await read_until_closed(first)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == p.CloseCode.SESSION_REPLACED
                assert node_a.session_ids() == []
                assert node_b.session_ids() == [welcome["session"]]
    finally:
        await node_b.close()
        await node_a.close()
