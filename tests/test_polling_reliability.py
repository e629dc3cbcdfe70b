"""The reliability scenarios of ``test_resume.py`` with the client on HTTP long polling.

The server is a real one, run twice: with its built-in listener (websockets'
port, plain HTTP through ``http_front``, as ``rtchat-server``) and served
through the ASGI app under uvicorn (``Server(transport=uvicorn_listener)``, as
``rtchat-server --asgi``); the polling client reaches it through the fault proxy. A link that breaks
briefly is recovered on the same polling connection (its requests asked
again); one that stays down past that resumes the session on a new one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rtchat_sdk import Client, ReconnectPolicy
from server_ref import Server
from server_ref.asgi import uvicorn_listener
from tests.faultproxy import FaultProxy
from tests.test_resume import (
    cut_request_runs_once,
    dropped_link_replays_what_was_missed,
    sent_while_down_goes_in_order,
)

pytestmark = pytest.mark.timeout(40)

FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.3)


@pytest.fixture(params=["builtin", "uvicorn"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    srv = Server(transport=uvicorn_listener) if request.param == "uvicorn" else Server()
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
    await dropped_link_replays_what_was_missed(server, proxy, polling)


async def test_messages_sent_while_down_wait_in_the_outbox_and_go_in_order(
    server: Server, proxy: FaultProxy
) -> None:
    await sent_while_down_goes_in_order(server, proxy, polling)


async def test_a_request_whose_answer_is_cut_runs_once(server: Server, proxy: FaultProxy) -> None:
    client = await cut_request_runs_once(server, proxy, polling)
    assert client.counters["reconnects"] == 0  # asked again on the same polling connection
