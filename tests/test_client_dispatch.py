"""Calling handlers: synchronous ones inline, the rest in order, positions saved after."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rtchat_sdk import Client, Delivery, Event, RTChatError, ValidationFailed
from rtchat_sdk import protocol as p
from rtchat_sdk.aio.handlers import HandlerRegistry
from rtchat_sdk.outbox import HandledPosition, Outbox
from server_ref import Server

pytestmark = pytest.mark.timeout(30)


class Point(Event, name="point"):
    x: int


def frame(event: str = "ev", data: Any = None, offset: int = 1) -> p.MessageFrame:
    return p.MessageFrame(
        stream="room:/:r", epoch="e1", offset=offset, room="r", event=event, data=data
    )


def test_synchronous_handlers_run_at_once_in_order_with_meta_only_where_asked() -> None:
    registry = HandlerRegistry()
    calls: list[Any] = []
    registry.add("/", "ev", lambda data: calls.append(("first", data)))
    registry.add("/", "*", lambda data, meta: calls.append(("any", data, meta)))
    registry.add("/", "ev", lambda data, meta: calls.append(("second", data, meta.offset)))
    errors: list[RTChatError] = []
    assert registry.call(frame(data=1, offset=7), errors.append) is None
    assert calls[0] == ("first", 1)
    assert calls[1] == ("second", 1, 7)
    assert calls[2][:2] == ("any", 1)
    assert calls[2][2] == Delivery("ev", "/", "r", None, "room:/:r", "e1", 7)
    assert errors == []


async def test_an_awaitable_hands_back_the_rest_in_order() -> None:
    registry = HandlerRegistry()
    calls: list[str] = []
    queue: asyncio.Queue[str] = asyncio.Queue()

    async def slow(data: Any) -> None:
        calls.append("async started")
        await asyncio.sleep(0)
        calls.append("async done")

    registry.add("/", "ev", lambda data: calls.append("sync 1"))
    registry.add("/", "ev", slow)
    registry.add("/", "ev", lambda data: queue.put("from a lambda"))  # returns a coroutine
    registry.add("/", "ev", lambda data: calls.append("sync 2"))
    rest = registry.call(frame(), lambda exc: None)
    assert rest is not None
    assert calls == ["sync 1"]  # the coroutine function was called, its body not yet run
    await rest
    assert calls == ["sync 1", "async started", "async done", "sync 2"]
    assert queue.get_nowait() == "from a lambda"


async def test_failures_and_invalid_payloads_are_reported_and_the_others_still_run() -> None:
    registry = HandlerRegistry()
    calls: list[Any] = []

    def broken(data: Any) -> None:
        raise ValueError("sync boom")

    async def broken_later(data: Any) -> None:
        raise KeyError("async boom")

    registry.add("/", "point", broken)
    registry.add("/", Point, lambda point: calls.append(point))
    registry.add("/", "point", broken_later)
    registry.add("/", "point", lambda data: calls.append(data))
    errors: list[RTChatError] = []
    rest = registry.call(frame("point", {"x": 1}), errors.append)
    assert rest is not None
    await rest
    assert calls == [Point(x=1), {"x": 1}]
    assert [str(e) for e in errors] == [
        "handler for 'point' raised ValueError: sync boom",
        "handler for 'point' raised KeyError: 'async boom'",
    ]
    errors.clear()
    calls.clear()
    rest = registry.call(frame("point", {"x": "nope"}), errors.append)
    assert rest is not None
    await rest
    assert calls == [{"x": "nope"}]  # the typed handler never saw it
    assert isinstance(errors[1], ValidationFailed)


def test_removed_handlers_are_not_called() -> None:
    registry = HandlerRegistry()
    calls: list[str] = []

    def handler(data: Any) -> None:
        calls.append("called")

    registry.add("/", "ev", handler)
    registry.remove("/", "ev", handler)
    assert not registry.has_handlers(frame())
    assert registry.call(frame(), lambda exc: None) is None
    assert calls == []


class RecordingOutbox(Outbox):
    def __init__(self) -> None:
        super().__init__()
        self.saved: dict[str, int] = {}

    def save_stream(self, stream: str, position: HandledPosition | None) -> None:
        if position is not None:
            self.saved[stream] = position.offset


async def test_mixed_handlers_see_deliveries_in_order_and_positions_follow_them(
    server: Server,
) -> None:
    outbox = RecordingOutbox()
    seen: list[int] = []
    problems: list[str] = []
    done = asyncio.Event()
    total = 300
    stream = p.room_stream("/", "mixed")

    def check(meta: Delivery) -> None:
        # Handled one after another: the previous offset is saved, this one not yet.
        if outbox.saved.get(stream) != meta.offset - 1:
            problems.append(f"at {meta.offset}: saved {outbox.saved.get(stream)}")
        seen.append(meta.offset)
        if len(seen) == total:
            done.set()

    async with Client(server.url, outbox=outbox) as receiver, Client(server.url) as sender:

        @receiver.on("sync")
        def on_sync(data: Any, meta: Delivery) -> None:
            check(meta)

        @receiver.on("async")
        async def on_async(data: Any, meta: Delivery) -> None:
            check(meta)
            if data % 3 == 0:
                await asyncio.sleep(0.001)

        await receiver.join("mixed")
        await sender.join("mixed")
        await asyncio.gather(
            *(sender.publish("mixed", "async" if i % 4 == 0 else "sync", i) for i in range(total))
        )
        async with asyncio.timeout(20):
            await done.wait()
        await asyncio.sleep(0)  # the last position is saved right after its handler
        assert outbox.saved[stream] == total
    assert problems == []
    assert seen == list(range(1, total + 1))
