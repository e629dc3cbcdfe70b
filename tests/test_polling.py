"""HTTP long polling (PROTOCOL.md §1.1) from raw HTTP, as a client in another language
would speak it: open, poll with acks, send, goodbye, and the limits. Each test runs
against both servers of it: the built-in one (websockets' port, plain HTTP through
``http_front``) and the ASGI app under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from rtchat_sdk import Client
from server_ref import ServerConfig
from server_ref.asgi import create_app
from server_ref.transports.polling import Polling
from server_ref.transports.websocket import WebSocketListener
from tests.test_asgi import echo_server, serving

pytestmark = pytest.mark.timeout(30)

HELLO = {"type": "hello", "protocol": 1}
SERVERS = ["builtin", "uvicorn"]


class Served:
    """A running server: its http:// URL, its long-polling state, and how to close it."""

    def __init__(self, url: str, polling: Polling, close: Callable[[], Awaitable[None]]) -> None:
        self.url = url
        self.polling = polling
        self.close = close


@contextlib.asynccontextmanager
async def served(kind: str, config: ServerConfig | None = None) -> AsyncIterator[Served]:
    server = echo_server(config)
    if kind == "uvicorn":
        app = create_app(server)
        async with serving(app) as url:
            yield Served(url, app.polling, app.close)
        return
    await server.start("127.0.0.1", 0)
    try:
        assert isinstance(server.listener, WebSocketListener)
        url = f"http://127.0.0.1:{server.port}"
        yield Served(url, server.listener.http.polling, server.close)
    finally:
        await server.close()


@pytest.fixture(params=SERVERS)
async def srv(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    config = ServerConfig(poll_timeout=0.5, poll_idle_timeout=1.0, poll_max_frames=5)
    async with served(request.param, config) as running:
        yield running


@pytest.fixture
def base(srv: Served) -> str:
    return srv.url


async def held(polling: Polling, sid: str) -> None:
    """Until the server holds a poll of ``sid`` (its request has arrived)."""
    async with asyncio.timeout(5):
        while not polling.connections[sid].holding:  # noqa: ASYNC110 (no event to await)
            await asyncio.sleep(0.005)


class Poller:
    """A polling connection driven by hand: the frames it got, and its ack."""

    def __init__(self, http: httpx.AsyncClient, sid: str) -> None:
        self.http = http
        self.sid = sid
        self.ack = 0

    async def poll(self, ack: int | None = None) -> dict[str, Any]:
        answer = await self.http.get(
            "/poll", params={"sid": self.sid, "ack": self.ack if ack is None else ack}
        )
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    async def frames(self) -> list[dict[str, Any]]:
        """The next batch's frames (acknowledging the one before)."""
        body = await self.poll()
        self.ack = body["cursor"]
        frames: list[dict[str, Any]] = body["frames"]
        return frames

    async def send(self, *frames: dict[str, Any]) -> None:
        answer = await self.http.post("/poll", params={"sid": self.sid}, json=list(frames))
        assert (answer.status_code, answer.json()) == (200, {"ok": True})


async def open_poller(http: httpx.AsyncClient, *frames: dict[str, Any]) -> Poller:
    answer = await http.post("/poll", json=[HELLO, *frames])
    assert answer.status_code == 200, answer.text
    return Poller(http, answer.json()["sid"])


async def test_hello_welcome_and_a_request_round_trip_over_polls(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as http:
        poller = await open_poller(http)
        assert len(poller.sid) >= 22  # at least 128 bits, URL-safe
        (welcome,) = await poller.frames()
        assert welcome["type"] == "welcome"
        await poller.send({"type": "request", "id": 1, "event": "echo", "data": {"n": 1}})
        assert await poller.frames() == [{"type": "reply", "id": 1, "data": {"n": 1}}]


async def test_a_lost_poll_answer_is_sent_again_unchanged_and_then_forgotten(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as http:
        poller = await open_poller(http)
        await poller.frames()  # the welcome
        await poller.send({"type": "request", "id": 1, "event": "echo", "data": "x"})
        first = await poller.poll()  # ... and this answer never reached the client
        again = await poller.poll()  # same ack: the same batch
        assert again == first
        assert again["frames"] == [{"type": "reply", "id": 1, "data": "x"}]
        poller.ack = again["cursor"]
        assert await poller.frames() == []  # acknowledged: not sent a third time
        answer = await http.get("/poll", params={"sid": poller.sid, "ack": 0})
        assert answer.status_code == 400  # forgotten batches cannot be asked for


async def test_a_new_poll_answers_the_held_one_empty(srv: Served) -> None:
    async with httpx.AsyncClient(base_url=srv.url) as http:
        poller = await open_poller(http)
        await poller.frames()
        first = asyncio.ensure_future(poller.poll())
        await held(srv.polling, poller.sid)
        newer = asyncio.ensure_future(poller.poll())
        assert await asyncio.wait_for(first, 5) == {"cursor": poller.ack, "frames": []}
        await poller.send({"type": "request", "id": 1, "event": "echo", "data": 2})
        body = await asyncio.wait_for(newer, 5)
        assert body["frames"] == [{"type": "reply", "id": 1, "data": 2}]


async def test_an_idle_poll_is_answered_empty_after_poll_timeout(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as http:
        poller = await open_poller(http)
        await poller.frames()
        assert await poller.poll() == {"cursor": poller.ack, "frames": []}


async def test_deliveries_reach_a_polling_member_in_order_in_batches(base: str) -> None:
    ws = base.replace("http://", "ws://")
    async with httpx.AsyncClient(base_url=base) as http, Client(ws) as publisher:
        poller = await open_poller(http, {"type": "join", "id": 1, "room": "r"})
        frames = await poller.frames()
        assert [f["type"] for f in frames] == ["welcome", "reply"]
        await publisher.join("r")
        offsets = [await publisher.publish("r", "m", i) for i in range(12)]
        got: list[dict[str, Any]] = []
        while len(got) < 12:
            batch = await poller.frames()
            assert len(batch) <= 5  # poll_max_frames
            got += batch
        assert [f["offset"] for f in got] == offsets
        assert [f["data"] for f in got] == list(range(12))


async def test_goodbye_ends_the_connection_and_its_session(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as http:
        poller = await open_poller(http)
        await poller.frames()
        answer = await http.delete("/poll", params={"sid": poller.sid})
        assert answer.status_code == 200
        after = await http.get("/poll", params={"sid": poller.sid, "ack": poller.ack})
        assert (after.status_code, after.json()) == (404, {"error": "unknown_session"})


async def test_a_silent_connection_is_dropped_and_its_session_stays_resumable(
    srv: Served,
) -> None:
    url = srv.url
    async with httpx.AsyncClient(base_url=url) as http:
        poller = await open_poller(http)
        (welcome,) = await poller.frames()
        async with asyncio.timeout(10):  # dropped after 1 s without a request
            while poller.sid in srv.polling.connections:  # noqa: ASYNC110 (the sweeper's timer)
                await asyncio.sleep(0.05)
        gone = await http.get("/poll", params={"sid": poller.sid, "ack": poller.ack})
        assert (gone.status_code, gone.json()) == (404, {"error": "unknown_session"})
        async with connect(url.replace("http://", "ws://")) as raw:
            resume = {"token": welcome["token"], "session": welcome["session"]}
            await raw.send(json.dumps({**HELLO, "resume": resume}))
            again = json.loads(await raw.recv())
            assert (again["session"], again["resumed"]) == (welcome["session"], True)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 400),
        (b'{"type": "hello"}', 400),  # not an array
        (b"[1, 2]", 400),  # not objects
        (b'[{"type": "request", "id": 1, "event": "echo"}]', 400),  # no hello first
    ],
)
async def test_bad_opening_bodies_are_refused_with_a_clear_error(
    base: str, body: bytes, status: int
) -> None:
    async with httpx.AsyncClient(base_url=base) as http:
        answer = await http.post("/poll", content=body)
        assert answer.status_code == status
        assert "error" in answer.json()


async def test_bodies_over_the_limits_are_refused_whole(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as http:
        poller = await open_poller(http)
        await poller.frames()
        too_many = [{"type": "emit", "id": i, "event": "echo"} for i in range(1, 7)]
        answer = await http.post("/poll", params={"sid": poller.sid}, json=too_many)
        assert answer.status_code == 413
        huge = b'[{"type":"emit","id":1,"event":"echo","data":"' + b"x" * (1 << 20) + b'"}]'
        answer = await http.post("/poll", params={"sid": poller.sid}, content=huge)
        assert answer.status_code == 413
        # Nothing of either was taken: the next message gets id 1's answer.
        await poller.send({"type": "request", "id": 1, "event": "echo", "data": "ok"})
        assert await poller.frames() == [{"type": "reply", "id": 1, "data": "ok"}]


@pytest.mark.parametrize("kind", SERVERS)
async def test_a_server_shutdown_reaches_a_held_poll_with_the_close(kind: str) -> None:
    async with served(kind) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        poller = await open_poller(http)
        await poller.frames()
        first = asyncio.ensure_future(poller.poll())
        await held(srv.polling, poller.sid)
        await srv.close()
        body = await asyncio.wait_for(first, 5)
        assert [f["code"] for f in body["frames"]] == ["shutting_down"]
        assert body["close"]["code"] == 1001


@pytest.mark.parametrize("kind", SERVERS)
async def test_polling_connections_count_against_max_connections_and_the_extra_is_refused(
    kind: str,
) -> None:
    """Held polls per node are bounded: at most one per connection, and connections by
    ``max_connections``; one past it gets ``overloaded`` and the close in its first batch."""
    config = ServerConfig(max_connections=1, overload_retry_after=2.0)
    async with served(kind, config) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        first = await open_poller(http)
        assert [f["type"] for f in await first.frames()] == ["welcome"]
        second = await open_poller(http)
        body = await second.poll()
        assert [(f["type"], f["code"], f["retry_after"]) for f in body["frames"]] == [
            ("error", "overloaded", 2.0)
        ]
        assert body["close"]["code"] == 1013
        gone = await http.get("/poll", params={"sid": second.sid, "ack": body["cursor"]})
        assert gone.status_code == 404
        await first.send({"type": "request", "id": 1, "event": "echo", "data": "still here"})
        assert await first.frames() == [{"type": "reply", "id": 1, "data": "still here"}]


@pytest.mark.parametrize("kind", SERVERS)
async def test_a_held_poll_whose_client_went_away_is_answered_at_once(kind: str) -> None:
    """A closed tab leaves no poll held until poll_timeout (a graceful shutdown would
    wait for it)."""
    async with served(kind, ServerConfig(poll_timeout=20)) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as http:
            poller = await open_poller(http)
            await poller.frames()
        host, port = srv.url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        query = f"sid={poller.sid}&ack={poller.ack}"
        writer.write(f"GET /poll?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await held(srv.polling, poller.sid)
        writer.close()  # the tab is closed mid-poll
        await writer.wait_closed()
        async with asyncio.timeout(5):  # not the 20 s of poll_timeout
            while srv.polling.connections[poller.sid].holding:  # noqa: ASYNC110 (no event)
                await asyncio.sleep(0.005)
        # The connection is still there, and nothing was taken from it.
        async with httpx.AsyncClient(base_url=srv.url) as http:
            poller.http = http
            await poller.send({"type": "request", "id": 1, "event": "echo", "data": "after"})
            assert await poller.frames() == [{"type": "reply", "id": 1, "data": "after"}]
