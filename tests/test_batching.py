"""Batches: several server frames in one WebSocket message, for clients that ask."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from rtchat_sdk import protocol as p
from rtchat_sdk.core import ClientSession, Delivered, ProtocolViolation, Replied
from server_ref import Server, ServerConfig

from .conftest import make_server
from .helpers import events, frames, message, open_session, reply

pytestmark = pytest.mark.timeout(20)


# ----------------------------------------------------------------------
# Decoding


def test_a_lone_frame_decodes_to_a_list_of_one() -> None:
    assert p.decode_server_message(reply(3, "x")) == [p.ReplyFrame(id=3, data="x")]


@pytest.mark.parametrize("pad", ["", " ", "\n\t "])
def test_a_batch_decodes_to_its_frames_in_order(pad: str) -> None:
    text = pad + "[" + ",".join([reply(1), message("room:/:r", 1), reply(2)]) + "]"
    decoded = p.decode_server_message(text)
    assert [type(f) for f in decoded] == [p.ReplyFrame, p.MessageFrame, p.ReplyFrame]
    assert p.decode_server_message(text.encode()) == decoded


def test_encode_batch_is_a_json_array_of_the_frames() -> None:
    batch = p.encode_batch([reply(1).encode(), reply(2).encode()])
    assert json.loads(batch) == [json.loads(reply(1)), json.loads(reply(2))]
    assert p.decode_server_message(batch) == [p.ReplyFrame(id=1), p.ReplyFrame(id=2)]


@pytest.mark.parametrize("text", ["[1, 2]", '[{"type": "nope"}]', "[[]]", "[", '{"type": "nope"}'])
def test_an_undecodable_message_raises(text: str) -> None:
    with pytest.raises(p.FrameValidationError):
        p.decode_server_message(text)


# ----------------------------------------------------------------------
# The client session


def test_the_hello_asks_for_batches() -> None:
    session = ClientSession()
    session.connection_made(0.0)
    (hello,) = frames(session)
    assert hello["type"] == "hello"
    assert hello["batch"] is True


def test_a_batch_is_handled_frame_by_frame_in_order() -> None:
    session = ClientSession()
    open_session(session)
    request_id, _ = session.request("/", "echo", "hi", now=0.0)
    session.data_to_send()
    batch = [message("room:/:r", 1), reply(request_id, "hi"), message("room:/:r", 2)]
    session.receive_text("[" + ",".join(batch) + "]", 1.0)
    got = events(session)
    assert [type(e) for e in got] == [Delivered, Replied, Delivered]
    delivered = [e.frame.offset for e in got if isinstance(e, Delivered)]
    assert delivered == [1, 2]
    assert session.streams["room:/:r"].offset == 2


def test_a_bad_batch_is_a_protocol_violation_and_changes_nothing() -> None:
    session = ClientSession()
    open_session(session)
    session.receive_text("[" + message("room:/:r", 1) + ', {"type": "bogus"}]', 1.0)
    (event,) = events(session)
    assert isinstance(event, ProtocolViolation)
    assert "room:/:r" not in session.streams


# ----------------------------------------------------------------------
# The server


async def raw_client(server: Server, *, batch: bool) -> ClientConnection:
    """A raw WebSocket client, handshaken, in room 'r'."""
    ws = await connect(server.url, proxy=None, compression=None)
    await ws.send(json.dumps({"type": "hello", "protocol": 1, "batch": batch}))
    assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "welcome"
    await ws.send(json.dumps({"type": "join", "id": 1, "room": "r"}))
    assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "reply"
    return ws


async def messages_until(ws: ClientConnection, count: int) -> list[Any]:
    """Decoded WebSocket messages until ``count`` message frames have arrived."""
    received: list[Any] = []
    seen = 0
    while seen < count:
        decoded = json.loads(await asyncio.wait_for(ws.recv(), 5))
        received.append(decoded)
        for frame in decoded if isinstance(decoded, list) else [decoded]:
            seen += frame["type"] == "message"
    return received


def message_offsets(received: list[Any]) -> list[int]:
    flat = [f for m in received for f in (m if isinstance(m, list) else [m])]
    return [f["offset"] for f in flat if f["type"] == "message"]


async def test_deliveries_of_one_pass_reach_a_batching_client_as_one_message(
    server: Server,
) -> None:
    batching = await raw_client(server, batch=True)
    plain = await raw_client(server, batch=False)
    try:
        for n in range(5):  # one loop pass: nothing here waits for I/O
            await server.publish("r", "ev", {"n": n})
        got_batched = await messages_until(batching, 5)
        got_plain = await messages_until(plain, 5)
        assert len(got_batched) == 1
        assert isinstance(got_batched[0], list)
        assert [f["data"]["n"] for f in got_batched[0]] == [0, 1, 2, 3, 4]
        assert all(isinstance(m, dict) for m in got_plain)
        assert len(got_plain) == 5
        assert message_offsets(got_batched) == message_offsets(got_plain) == [1, 2, 3, 4, 5]
    finally:
        await batching.close()
        await plain.close()


async def test_a_batch_never_exceeds_max_frame_bytes() -> None:
    limit = 2_000
    server = make_server(ServerConfig(max_frame_bytes=limit))
    await server.start("127.0.0.1", 0)
    try:
        ws = await raw_client(server, batch=True)
        sizes: list[int] = []
        try:
            for n in range(12):
                await server.publish("r", "ev", {"n": n, "pad": "x" * 500})
            received: list[Any] = []
            while len(message_offsets(received)) < 12:
                text = await asyncio.wait_for(ws.recv(), 5)
                assert isinstance(text, str)
                sizes.append(len(text.encode()))
                received.append(json.loads(text))
        finally:
            await ws.close()
        assert message_offsets(received) == list(range(1, 13))
        assert max(sizes) <= limit
        assert len(sizes) > 1  # 12 frames of ~600 bytes cannot share one 2,000-byte message
        assert any(isinstance(m, list) for m in received)
    finally:
        await server.close()


async def test_what_was_queued_goes_out_before_the_close(server: Server) -> None:
    ws = await raw_client(server, batch=True)
    await server.publish("r", "ev", 1)
    await server.close()  # same pass: the delivery and the notice are still queued
    received: list[Any] = []
    async for text in ws:
        received.append(json.loads(text))
    flat = [f for m in received for f in (m if isinstance(m, list) else [m])]
    assert [f["type"] for f in flat] == ["message", "error"]
    assert flat[1]["code"] == "shutting_down"
    assert ws.close_code == p.CloseCode.GOING_AWAY
