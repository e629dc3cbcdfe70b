"""Rules of PROTOCOL.md about when frames come and how they are framed, pinned on the server."""

from __future__ import annotations

import json
from typing import Any

import pytest
from websockets.asyncio.client import connect

from rtchat_sdk import protocol as p
from server_ref import Server
from server_ref.core.connection import ConnectionCore

pytestmark = pytest.mark.timeout(20)

HEARTBEAT = p.HeartbeatInfo(interval=5, timeout=2)
LIMITS = p.Limits(
    max_frame_bytes=1 << 20, max_in_flight=10, history_size=10, history_seconds=60, session_ttl=60
)


def _welcome() -> p.WelcomeFrame:
    return p.WelcomeFrame(protocol=1, session="s", token="t", heartbeat=HEARTBEAT, limits=LIMITS)


def _types(core: ConnectionCore) -> list[str]:
    return [json.loads(text)["type"] for text in core.data_to_send()]


def test_the_servers_silence_clock_starts_at_the_hello_it_received() -> None:
    # §9: the first ping is due `interval` after the hello, not after the welcome.
    # The hello arrives at 0; authenticating it takes until 0.3, when welcome goes out.
    core = ConnectionCore(0.0, random=lambda: 0.999)
    assert isinstance(core.receive_text('{"type":"hello","protocol":1}', 0.0), p.HelloFrame)
    core.accept(_welcome(), 0.3)
    assert _types(core) == ["welcome"]
    timer = core.get_timer()
    assert timer is not None
    assert timer < 5.0  # its own ping time, spread early
    core.handle_timer(timer)
    assert _types(core) == []  # not silent for an interval since the hello yet
    assert core.get_timer() == 5.0  # 0 + interval: counted from the hello
    core.handle_timer(5.0)
    assert _types(core) == ["ping"]  # a client timing its first ping from welcome is late


def test_a_client_that_pings_within_an_interval_of_its_hello_is_not_pinged() -> None:
    core = ConnectionCore(0.0, ping_spread=0.0)
    core.receive_text('{"type":"hello","protocol":1}', 0.0)
    core.accept(_welcome(), 0.3)
    core.data_to_send()
    core.receive_text('{"type":"ping","ts":4.9}', 4.9)  # 4.9 after hello, 4.6 after welcome
    assert _types(core) == ["pong"]
    core.handle_timer(5.3)
    assert _types(core) == []


async def test_welcome_may_share_a_batch_with_the_replay_after_it(server: Server) -> None:
    # §3.5: for a client that set `batch`, the first message may be an array
    # whose first frame is welcome, then the gaps and the replayed deliveries.
    async with connect(server.url, proxy=None) as ws:
        await ws.send(json.dumps({"type": "hello", "protocol": 1, "batch": True}))
        welcome = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "join", "id": 1, "room": "r"}))
        joined = json.loads(await ws.recv())
        await ws.close(1001)  # not 1000, which would end the session
    assert (welcome["type"], joined["type"]) == ("welcome", "reply")
    for n in range(3):
        await server.publish("r", "m", n)
    resume: dict[str, Any] = {
        "token": welcome["token"],
        "session": welcome["session"],
        "last_reply": 1,
        "streams": [{**joined["data"], "ns": "/", "room": "r"}],
    }
    async with connect(server.url, proxy=None) as ws:
        await ws.send(json.dumps({"type": "hello", "protocol": 1, "batch": True, "resume": resume}))
        first = json.loads(await ws.recv())
    assert isinstance(first, list)
    assert [f["type"] for f in first] == ["welcome", "message", "message", "message"]
    assert first[0]["resumed"] is True
    assert [f["data"] for f in first[1:]] == [0, 1, 2]
