"""The blocking wrapper, used from a plain thread as a script would."""

from __future__ import annotations

import asyncio
import queue
from typing import Any

import pytest

from rtchat_sdk import ClientClosed, ConnectionState, UnknownEvent
from rtchat_sdk.sync import SyncClient
from server_ref import Server

pytestmark = pytest.mark.timeout(20)


def script(url: str) -> dict[str, Any]:
    """What a non-async user writes."""
    got: queue.Queue[Any] = queue.Queue()
    with SyncClient(url) as alice, SyncClient(url) as bob:
        bob.on("chat")(got.put)
        alice.join("lobby")
        bob.join("lobby")
        offset = alice.publish("lobby", "chat", {"text": "hi"})
        reply = alice.request("echo", {"n": 1})
        try:
            alice.request("missing")
        except UnknownEvent as exc:
            error = exc.code
        state = alice.state
    return {
        "offset": offset,
        "reply": reply,
        "error": error,
        "delivered": got.get(timeout=5),
        "state": state,
        "after": alice.state,
    }


async def test_blocking_client_from_a_thread(server: Server) -> None:
    result = await asyncio.to_thread(script, server.url)
    assert result == {
        "offset": 1,
        "reply": {"n": 1},
        "error": "unknown_event",
        "delivered": {"text": "hi"},
        "state": ConnectionState.CONNECTED,
        "after": ConnectionState.CLOSED,
    }


async def test_closed_sync_client_refuses_calls(server: Server) -> None:
    def run() -> None:
        client = SyncClient(server.url)
        client.connect()
        client.close()
        with pytest.raises(ClientClosed):
            client.connect()

    await asyncio.to_thread(run)
