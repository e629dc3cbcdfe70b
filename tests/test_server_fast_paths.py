"""The server's hot-path shortcuts behave exactly like the plain code they replace."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticSerializationError
from websockets.asyncio.client import ClientConnection, connect

from rtchat_sdk import protocol as p
from rtchat_sdk.errors import ValidationFailed
from server_ref.broker import MemoryBroker
from tests.conftest import make_server
from tests.test_compression import connections

pytestmark = pytest.mark.timeout(10)


async def test_dedupe_eviction_keeps_the_newest_replies_across_forgets_and_rewrites() -> None:
    size = 5
    broker = MemoryBroker(dedupe_size=size)
    model: dict[int, str] = {}  # the plain reference: a dict evicting its first key

    async def remember(i: int, reply: str) -> None:
        await broker.remember_reply("s", i, reply)
        model[i] = reply
        if len(model) > size:
            del model[next(iter(model))]

    async def forget(upto: int) -> None:
        await broker.forget_replies("s", upto)
        for i in [i for i in model if i <= upto]:
            del model[i]

    for i in range(1, 8):
        await remember(i, f"r{i}")
    await forget(4)
    await remember(3, "again")  # an id below the highest, written again
    await remember(7, "rewritten")  # an id already held keeps its place
    for i in range(8, 14):
        await remember(i, f"r{i}")
        await forget(i - 3 if i % 4 == 0 else 0)
    for i in range(1, 15):
        processed, reply = await broker.recall_reply("s", i)
        assert processed == (i <= 13)
        assert reply == model.get(i)


# --------------------------------------------------------------------------
# Frame encoders


class _Aliased(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    full_name: str = Field(alias="fullName")
    when: datetime.datetime


_REPRESENTATIVE: list[Any] = [
    None,
    0,
    -1,
    2**70,
    1.5,
    1e-7,
    1e20,  # NaN and infinities are refused, by the models too: tests/test_non_finite.py
    True,
    "",
    "plain",
    "héllo wörld ✓ 你好 🙂",
    'quotes " and \\ backslashes \n\t and \x00 controls',
    [],
    {},
    {"nested": {"list": [1, "two", 3.0, None, {"deep": ["é", {"x": []}]}]}},
    [[[[[]]]]],
    (1, "tuple"),
    {"datetime": datetime.datetime(2024, 5, 6, 7, 8, 9, 123456)},
    {"uuid": uuid.UUID(int=7), "decimal": decimal.Decimal("1.25"), "bytes": b"raw"},
    {
        "enum": p.ErrorCode.BAD_JSON,
        "model": _Aliased.model_validate(
            {"fullName": "Zoë", "when": datetime.datetime(2020, 1, 1)}
        ),
    },
]

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@pytest.mark.parametrize("data", _REPRESENTATIVE)
def test_reply_frame_is_exactly_the_model_encoding(data: Any) -> None:
    for message_id in (1, 42, 2**53 + 1):
        text = p.encode_reply(message_id, data)
        assert text == p.encode(p.ReplyFrame(id=message_id, data=data))
        assert isinstance(p.decode_server_frame(text), p.ReplyFrame)


@pytest.mark.parametrize("data", _REPRESENTATIVE)
def test_error_frame_is_exactly_the_model_encoding(data: Any) -> None:
    cases: list[tuple[str, str, int | None, float | None]] = [
        (p.ErrorCode.HANDLER_ERROR, 'ValueError: ünïcödé 🙂 "quoted"', 7, None),
        ("custom_code", "", None, 1.0),
        (p.ErrorCode.OVERLOADED, "busy", None, 5),  # an int the model makes a float
        (p.ErrorCode.SHUTTING_DOWN, "bye", None, 0.25),
    ]
    for code, message, message_id, retry_after in cases:
        text = p.encode_error(code, message, message_id, details=data, retry_after=retry_after)
        model = p.ErrorFrame(
            id=message_id, code=code, message=message, details=data, retry_after=retry_after
        )
        assert text == p.encode(model)
        assert isinstance(p.decode_server_frame(text), p.ErrorFrame)


def test_error_frame_still_refuses_what_the_model_refuses() -> None:
    with pytest.raises(ValidationError):
        p.encode_error(123, "a code must be a string")  # type: ignore[arg-type]


@pytest.mark.parametrize("ts", [0, 1, 0.0, 1.5, 1e-7, 1e20, 123456.789, 5e-324])
def test_ping_and_pong_frames_are_exactly_the_model_encoding(ts: float) -> None:
    assert p.encode_ping(ts) == p.encode(p.PingFrame(ts=ts))
    assert p.encode_pong(ts) == p.encode(p.PongFrame(ts=ts))
    assert isinstance(p.decode_server_frame(p.encode_ping(ts)), p.PingFrame)
    assert isinstance(p.decode_server_frame(p.encode_pong(ts)), p.PongFrame)


@pytest.mark.parametrize("ts", [float("nan"), float("inf"), float("-inf")])
def test_a_ping_time_that_json_cannot_carry_is_refused(ts: float) -> None:
    # Written as null it could not come back in a pong: such a ping is an invalid frame.
    with pytest.raises(ValidationError):
        p.PingFrame(ts=ts)
    with pytest.raises(ValidationError):
        p.PongFrame(ts=ts)


@settings(max_examples=300, deadline=None)
@given(
    data=_JSON,
    message_id=st.integers(min_value=1, max_value=2**63),
    message=st.text(),
    ts=st.floats(allow_nan=False, allow_infinity=False),
)
def test_encoders_match_the_models_on_any_json_data(
    data: Any, message_id: int, message: str, ts: float
) -> None:
    assert p.encode_reply(message_id, data) == p.encode(p.ReplyFrame(id=message_id, data=data))
    assert p.encode_error("code", message, message_id, details=data) == p.encode(
        p.ErrorFrame(id=message_id, code="code", message=message, details=data)
    )
    assert p.encode_ping(ts) == p.encode(p.PingFrame(ts=ts))
    assert p.encode_pong(ts) == p.encode(p.PongFrame(ts=ts))


def test_an_unserializable_reply_fails_like_the_model() -> None:
    with pytest.raises(PydanticSerializationError):
        p.encode(p.ReplyFrame(id=1, data=object()))
    with pytest.raises(PydanticSerializationError):
        p.encode_reply(1, object())


# --------------------------------------------------------------------------
# The write path


async def _raw_hello(url: str, **kwargs: Any) -> ClientConnection:
    ws = await connect(url, proxy=None, compression=None, **kwargs)
    await ws.send(json.dumps({"type": "hello", "protocol": 1}))
    assert json.loads(await ws.recv())["type"] == "welcome"
    return ws


async def test_requests_arriving_together_are_answered_in_order() -> None:
    srv = make_server()
    await srv.start("127.0.0.1", 0)
    try:
        ws = await _raw_hello(srv.url)
        try:
            # 300 frames framed by the client and handed to its socket in one write.
            for i in range(1, 301):
                frame = {"type": "request", "id": i, "event": "echo", "data": {"i": i, "s": "é"}}
                ws.protocol.send_text(json.dumps(frame).encode())
            ws.send_data()
            async with asyncio.timeout(10):
                replies = [json.loads(await ws.recv()) for _ in range(300)]
            assert [r["id"] for r in replies] == list(range(1, 301))
            assert all(
                r == {"type": "reply", "id": r["id"], "data": {"i": r["id"], "s": "é"}}
                for r in replies
            )
        finally:
            await ws.close()
    finally:
        await srv.close()


async def test_a_client_that_does_not_read_its_replies_stops_the_server_reading() -> None:
    srv = make_server()
    await srv.start("127.0.0.1", 0)
    try:
        # max_queue=1: the client stops reading its socket once a reply waits unread.
        ws = await _raw_hello(srv.url, max_queue=1, max_size=None)
        blob = "x" * 64 * 1024

        async def flood() -> None:
            for i in range(1, 1001):  # 64 MB of replies asked for
                await ws.send(
                    json.dumps({"type": "request", "id": i, "event": "echo", "data": blob})
                )

        sender = asyncio.create_task(flood())
        try:
            (conn,) = connections(srv)

            def every_buffer_full() -> bool:
                """Each side stopped reading, and each side's writes wait for the other."""
                return (
                    not ws.transport.is_reading()  # the client's one-message queue is full
                    and conn.ws.paused  # the server's replies wait for the client
                    and not conn.ws.transport.is_reading()  # the server stopped reading
                    and ws.paused  # so the client's requests wait for the server
                )

            # A server that read on regardless would not stay there: its reader
            # would empty its queue and its transport would read again.
            async with asyncio.timeout(5):
                while not every_buffer_full():
                    assert not sender.done()  # 64 MB cannot all go through
                    await asyncio.sleep(0.005)
            assert not sender.done()
            held = conn.ws.transport.get_write_buffer_size() + conn.unwritten
            assert held < 4 * 1024 * 1024, held  # a few replies past the high-water mark
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            ws.transport.abort()
    finally:
        await srv.close(timeout=1)


def _delivery(head: str, tail: str, epoch: str, offset: int) -> str:
    return f'{head},"epoch":{json.dumps(epoch)},"offset":{offset},{tail}'


@settings(max_examples=300, deadline=None)
@given(
    data=_JSON,
    room=st.none() | st.sampled_from(["r", "ünï 🙂", 'q"uote']),
    event=st.sampled_from(["m", "chat.message", "évènement"]),
    sender=st.none() | st.sampled_from(["s1", "0123abcd"]),
    epoch=st.sampled_from(["e1", "0011223344556677"]),
    offset=st.integers(min_value=1, max_value=2**53),
)
def test_delivery_parts_give_exactly_the_model_encoding(
    data: Any, room: str | None, event: str, sender: str | None, epoch: str, offset: int
) -> None:
    stream = p.room_stream("/", room) if room is not None else p.inbox_stream("s9")
    model = p.MessageFrame(
        stream=stream,
        epoch=epoch,
        offset=offset,
        ns="/",
        room=room,
        event=event,
        data=data,
        sender=sender,
    )
    for _ in range(2):  # the model's way, then the envelope it learned
        head, tail = p.delivery_parts(stream, "/", room, event, data, sender)
        assert _delivery(head, tail, epoch, offset) == p.encode(model)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {"x": [1, float("-inf")]}])
def test_delivery_parts_refuse_non_finite_data_on_either_way(bad: Any) -> None:
    p.delivery_parts("room:/:r", "/", "r", "m", {"fine": 1}, None)  # learns the envelope
    for _ in range(2):
        with pytest.raises(ValidationFailed):
            p.delivery_parts("room:/:r", "/", "r", "m", bad, None)


def test_delivery_parts_refuse_what_the_model_refuses() -> None:
    for _ in range(2):
        with pytest.raises(ValidationError):
            p.delivery_parts("room:/:r", "/", "r", 5, {"x": 1}, None)  # type: ignore[arg-type]
