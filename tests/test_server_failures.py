"""An operation that fails half-way (a broker error) never leaves a message unanswered."""

from __future__ import annotations

import asyncio
import logging

import pytest

from rtchat_sdk import Client, ConnectionState, ReconnectPolicy
from server_ref import MemoryBroker, Server

pytestmark = pytest.mark.timeout(20)


class ForgetfulBroker(MemoryBroker):
    """Fails to store the first reply it is given, as a broker that lost its link would."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    async def remember_reply(self, session_id: str, message_id: int, reply: str) -> None:
        if self.failures == 0:
            self.failures += 1
            raise ConnectionError("the store is unreachable")
        await super().remember_reply(session_id, message_id, reply)


async def test_a_failed_operation_closes_with_1011_and_the_client_resends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = ForgetfulBroker()
    server = Server(broker=broker)
    calls: list[object] = []

    @server.on("echo")
    def echo(ctx: object, data: object) -> object:
        calls.append(data)
        return data

    await server.start("127.0.0.1", 0)
    states: list[ConnectionState] = []
    try:
        policy = ReconnectPolicy(initial_delay=0.01)
        async with Client(server.url, reconnect=policy) as client:
            client.on_state_change(states.append)
            with caplog.at_level(logging.ERROR, logger="server_ref"):
                reply = await asyncio.wait_for(client.request("echo", {"n": 1}), 10)
            counters = client.counters
    finally:
        await server.close()
    assert reply == {"n": 1}
    assert broker.failures == 1
    # The first run's reply was lost with the broker error; the resend ran it again
    # (at least once is all a lost dedupe record allows), and the client was told
    # by a reconnect, not left waiting.
    assert calls == [{"n": 1}, {"n": 1}]
    assert counters["reconnects"] == 1
    assert counters["resent"] == 1
    assert ConnectionState.RECONNECTING in states
    assert "server operation failed" in caplog.text
