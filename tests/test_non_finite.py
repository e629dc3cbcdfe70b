"""NaN and infinities never travel: JSON has none, and null in their place would change the data.

Every encoder refuses a payload holding one (``ValidationFailed``, naming the
field), and every decoder refuses the ``NaN`` / ``Infinity`` literals that
pydantic's parser would take.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect as ws_connect

from rtchat_sdk import Client, HandlerError, RemoteError, ValidationFailed
from rtchat_sdk import protocol as p
from rtchat_sdk.core import ClientSession, ProtocolViolation, Replied
from server_ref import Context, Server

from .conftest import make_server
from .helpers import Inbox, open_session, reply

pytestmark = pytest.mark.timeout(20)

NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------
# Encoders and decoders


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"x": NAN}, "data.x is NaN"),
        ([1, {"y": [INF]}], "data[1].y[0] is Infinity"),
        (-INF, "data is -Infinity"),
    ],
)
def test_the_servers_reply_and_message_encoders_refuse_non_finite_data(
    data: Any, where: str
) -> None:
    message = f"{where}: JSON has no NaN or Infinity"
    with pytest.raises(ValidationFailed) as info:
        p.encode_reply(1, data)
    assert str(info.value) == message
    with pytest.raises(ValidationFailed) as info:
        p.encode(p.MessageFrame(stream="s", epoch="e", offset=1, event="ev", data=data))
    assert str(info.value) == message
    with pytest.raises(ValidationFailed) as info:
        p.encode_error("custom", "text", 1, details=data)
    assert str(info.value) == message.replace("data", "details", 1)


def test_finite_data_and_the_letters_in_strings_encode_as_before() -> None:
    data = {"NaN": "Infinity", "n": [1.5, -0.0, 1e308], "s": "-Infinity NaN"}
    assert p.encode_reply(3, data) == (
        '{"type":"reply","id":3,"data":{"NaN":"Infinity","n":[1.5,-0.0,1e+308],'
        '"s":"-Infinity NaN"}}'
    )


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"reply","id":1,"data":NaN}',
        '{"type":"reply","id":1,"data":{"x":[Infinity]}}',
        '{"type":"message","stream":"s","epoch":"e","offset":1,"event":"e","data":-Infinity}',
        '[{"type":"reply","id":1,"data":null},{"type":"reply","id":2,"data":NaN}]',
        '{"type":"ping","ts":NaN}',
    ],
)
def test_the_client_refuses_a_server_frame_with_a_non_standard_literal(text: str) -> None:
    s = ClientSession()
    open_session(s)
    s.request("/", "ev", None, now=0)
    s.request("/", "ev", None, now=0)
    s.data_to_send()
    with pytest.raises(p.FrameValidationError) as info:
        p.decode_server_message(text)
    assert info.value.errors()[0]["type"] == "json_invalid"
    assert "NaN, Infinity and -Infinity are not JSON" in str(info.value)
    s.receive_text(text, 1)
    [event] = s.events_received()
    assert isinstance(event, ProtocolViolation)
    assert s.outbox.ids() == [1, 2]  # nothing settled by the frame (nor by its batch)
    assert s.data_to_send() == []  # no pong for a NaN ping
    s.receive_text(reply(1, "NaN"), 1)  # the same text inside a string is fine
    assert s.events_received() == [Replied(1, "request", "NaN")]


# --------------------------------------------------------------------------
# End to end


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """The tests' usual server (conftest's ``connect`` uses it), with handlers that give NaN."""
    srv = make_server()

    @srv.on("nan_reply")
    def nan_reply(ctx: Context, data: Any) -> Any:
        return {"ok": True, "value": [1.0, NAN]}

    @srv.on("nan_details")
    def nan_details(ctx: Context, data: Any) -> Any:
        raise RemoteError("custom", "with details", {"score": -INF})

    @srv.on("publish_nan")
    async def publish_nan(ctx: Context, data: Any) -> Any:
        return await ctx.publish("r", "m", {"x": NAN})

    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.close()


async def member_of_r(connect: Callable[..., Client]) -> tuple[Client, Inbox]:
    """A connected client in room ``r``, and what it receives there."""
    member = connect()
    await member.connect()
    inbox = Inbox(member)
    await member.join("r")
    return member, inbox


async def test_client_calls_with_non_finite_data_raise_and_send_nothing(
    server: Server, connect: Callable[..., Client]
) -> None:
    _, inbox = await member_of_r(connect)
    sender = connect()
    await sender.connect()
    await sender.join("r")
    sent_before = sender.counters["sent"]
    calls = [
        (sender.publish("r", "m", {"x": [1, {"y": NAN}]}), "publish: data.x[1].y is NaN"),
        (sender.emit("echo", [INF]), "emit: data[0] is Infinity"),
        (sender.request("echo", {"deep": {"v": -INF}}), "request: data.deep.v is -Infinity"),
    ]
    for call, where in calls:
        with pytest.raises(ValidationFailed) as info:
            await call
        assert str(info.value) == f"cannot encode {where}: JSON has no NaN or Infinity"
    assert sender.counters["sent"] == sent_before
    assert sender.outbox_size == 0
    # Nothing reached the room: the next publish takes offset 1, and it alone arrives.
    assert await sender.publish("r", "m", "after") == 1
    assert await inbox.settle(server) == ["after"]


async def test_a_handler_reply_with_nan_is_a_handler_error_and_logged(
    connect: Callable[..., Client], caplog: pytest.LogCaptureFixture
) -> None:
    client = connect()
    await client.connect()
    with caplog.at_level(logging.ERROR, logger="server_ref"), pytest.raises(HandlerError) as info:
        await client.request("nan_reply")
    assert info.value.code == "handler_error"
    assert info.value.message == (
        "the handler's answer cannot be sent: data.value[1] is NaN: JSON has no NaN or Infinity"
    )
    [record] = [r for r in caplog.records if r.name == "server_ref"]
    assert record.levelno == logging.ERROR
    assert "'nan_reply'" in record.getMessage()
    assert "data.value[1] is NaN" in record.getMessage()
    assert await client.request("echo", 1) == 1  # the connection carries on


async def test_handler_error_details_with_an_infinity_are_a_handler_error(
    connect: Callable[..., Client],
) -> None:
    client = connect()
    await client.connect()
    with pytest.raises(HandlerError) as info:
        await client.request("nan_details")
    assert info.value.code == "handler_error"
    assert "its error details: details.score is -Infinity" in info.value.message


async def test_server_side_publish_and_send_to_refuse_nan_and_append_nothing(
    server: Server, connect: Callable[..., Client]
) -> None:
    member, inbox = await member_of_r(connect)
    with pytest.raises(ValidationFailed, match=r"^data\.x is NaN: JSON has no NaN or Infinity$"):
        await server.publish("r", "m", {"x": NAN})
    assert member.session_id is not None
    with pytest.raises(ValidationFailed, match=r"^data\[0\] is Infinity: "):
        await server.send_to(member.session_id, "m", [INF])
    # From a handler: the handler fails like any handler that raises.
    with pytest.raises(HandlerError, match=r"ValidationFailed: data\.x is NaN"):
        await member.request("publish_nan")
    assert await server.publish("r", "m", "after") == 1
    assert await inbox.settle(server) == ["after"]
    assert await server.send_to(member.session_id, "m", "direct") == 1


async def test_a_raw_publish_of_a_number_beyond_a_double_is_refused_not_nulled(
    server: Server, connect: Callable[..., Client]
) -> None:
    # 1e999 is standard JSON, but infinite once parsed: delivering it would write null.
    _, inbox = await member_of_r(connect)
    async with ws_connect(server.url, proxy=None) as ws:
        await ws.send('{"type":"hello","protocol":1}')
        assert json.loads(await ws.recv())["type"] == "welcome"
        await ws.send('{"type":"join","id":1,"room":"r"}')
        assert json.loads(await ws.recv())["type"] == "reply"
        await ws.send('{"type":"publish","id":2,"room":"r","event":"m","data":{"x":1e999}}')
        error = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert (error["type"], error["id"], error["code"]) == ("error", 2, "invalid_frame")
    assert "data.x is Infinity" in error["message"]
    assert await server.publish("r", "m", "after") == 1
    assert await inbox.settle(server) == ["after"]


with_non_finite = st.recursive(
    st.none() | st.integers() | st.floats() | st.text(alphabet="NaIfity- é"),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(data=with_non_finite)
def test_the_fast_encoders_refuse_exactly_what_the_models_refuse(data: Any) -> None:
    def outcome(encode: Callable[[], str]) -> str:
        try:
            return encode()
        except ValidationFailed as exc:
            return f"refused: {exc}"

    assert outcome(lambda: p.encode_reply(5, data)) == outcome(
        lambda: p.encode(p.ReplyFrame(id=5, data=data))
    )
    assert outcome(lambda: p.encode_error("c", "m", 5, details=data)) == outcome(
        lambda: p.encode(p.ErrorFrame(id=5, code="c", message="m", details=data))
    )
