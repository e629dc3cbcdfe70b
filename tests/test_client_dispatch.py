"""Calling handlers: synchronous ones inline, the rest in order, positions saved after."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest

from rtchat_sdk import Client, Delivery, Event, RTChatError, ValidationFailed
from rtchat_sdk import protocol as p
from rtchat_sdk.aio.dispatcher import Dispatcher
from rtchat_sdk.aio.handlers import HandlerRegistry
from rtchat_sdk.core import ClientSession, Delivered
from rtchat_sdk.outbox import HandledPosition, Outbox
from server_ref import Server
from tests.helpers import message, open_session

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


# ----------------------------------------------------------------------
# The dispatcher with a real session: async handlers started inline


STREAM = "room:/:r"


class WatchedOutbox(RecordingOutbox):
    """Says when a position was saved."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def save_stream(self, stream: str, position: HandledPosition | None) -> None:
        super().save_stream(stream, position)
        self.changed.set()

    async def wait_for(self, stream: str, offset: int, timeout: float = 5) -> None:
        """Until ``offset`` is the saved position of ``stream`` (bounded)."""
        async with asyncio.timeout(timeout):
            while self.saved.get(stream) != offset:
                self.changed.clear()
                await self.changed.wait()


class Harness:
    """A real ClientSession and Dispatcher; frames go in as the reader hands them over."""

    def __init__(self, max_pending: int = 100) -> None:
        self.outbox = WatchedOutbox()
        self.session = ClientSession(outbox=self.outbox)
        open_session(self.session)
        self.registry = HandlerRegistry()
        self.errors: list[RTChatError] = []
        self.dispatcher = Dispatcher(
            self.session,
            self.registry,
            report=self.errors.append,
            gap_callbacks=[],
            max_pending=max_pending,
        )
        self.dispatcher.start()

    @property
    def task(self) -> asyncio.Task[None]:
        task = self.dispatcher._task
        assert task is not None
        return task

    @property
    def saved(self) -> int | None:
        return self.outbox.saved.get(STREAM)

    def feed(self, *offsets: int) -> None:
        """What the reader does with a message: the core, then each delivery, at once."""
        for offset in offsets:
            self.session.receive_text(message(STREAM, offset, offset), 0)
        for event in self.session.events_received():
            assert isinstance(event, Delivered)
            self.dispatcher.deliver(event.frame)

    async def started(self) -> Harness:
        """Once the dispatcher task waits for work, as it does long before any delivery."""
        await asyncio.sleep(0)
        assert not self.task.done()
        return self

    async def settle(self, offset: int) -> None:
        """Wait (bounded) until ``offset`` is marked handled."""
        await self.outbox.wait_for(STREAM, offset)


async def test_an_async_handler_that_never_suspends_is_done_inline_with_a_sync_one_after_it() -> (
    None
):
    h = await Harness(max_pending=1).started()
    calls: list[tuple[str, int]] = []
    tasks: list[asyncio.Task[Any] | None] = []
    ready = asyncio.get_running_loop().create_future()
    ready.set_result(None)

    async def first(data: int) -> None:
        tasks.append(asyncio.current_task())
        await ready  # done already: no suspension
        calls.append(("async", data))

    h.registry.add("/", "ev", first)
    h.registry.add("/", "ev", lambda data: calls.append(("sync", data)))
    for offset in range(1, 101):
        h.feed(offset)
        # Handled before deliver() returned: both handlers, the position, nothing queued.
        assert calls[-2:] == [("async", offset), ("sync", offset)]
        assert h.saved == offset
        assert not h.dispatcher.full
    assert tasks == [h.task] * 100  # run in the dispatcher task's name, from this one
    assert h.errors == []


async def test_an_async_handler_that_suspends_is_taken_over_by_the_task_in_order() -> None:
    h = await Harness().started()
    calls: list[str] = []
    release = asyncio.Event()
    var: contextvars.ContextVar[int] = contextvars.ContextVar("var", default=0)

    async def first(data: int) -> None:
        calls.append(f"{data} async starts")
        before = asyncio.current_task()
        token = var.set(data)
        if data == 2:
            await release.wait()
        assert asyncio.current_task() is before is h.task
        assert var.get() == data
        var.reset(token)  # raises if the rest ran in another context
        calls.append(f"{data} async ends")

    h.registry.add("/", "ev", first)
    h.registry.add("/", "ev", lambda data: calls.append(f"{data} sync"))
    h.feed(1, 2, 3)
    h.feed(4)
    # 1 done inline; 2 started and waits; 3 and 4 queue behind it, untouched.
    assert calls == ["1 async starts", "1 async ends", "1 sync", "2 async starts"]
    assert h.saved == 1
    release.set()
    await h.settle(4)
    assert calls == [
        *["1 async starts", "1 async ends", "1 sync"],
        *["2 async starts", "2 async ends", "2 sync"],
        *["3 async starts", "3 async ends", "3 sync"],
        *["4 async starts", "4 async ends", "4 sync"],
    ]
    assert h.errors == []
    h.feed(5)  # the queue is empty again: inline
    assert calls[-1] == "5 sync"
    assert h.saved == 5


async def test_failures_before_and_after_the_first_suspension_are_reported() -> None:
    h = await Harness().started()
    calls: list[str] = []
    release = asyncio.Event()

    async def broken(data: int) -> None:
        if data == 2:
            await release.wait()
        raise ValueError(f"boom {data}")

    h.registry.add("/", "ev", broken)
    h.registry.add("/", "ev", lambda data: calls.append(f"{data} sync"))
    h.feed(1, 2)
    assert calls == ["1 sync"]
    assert [str(e) for e in h.errors] == ["handler for 'ev' raised ValueError: boom 1"]
    release.set()
    await h.settle(2)
    assert calls == ["1 sync", "2 sync"]
    assert [str(e) for e in h.errors][1:] == ["handler for 'ev' raised ValueError: boom 2"]
    assert isinstance(h.errors[1].__cause__, ValueError)


async def test_a_timeout_that_expires_before_the_task_takes_over_reaches_the_handler() -> None:
    h = await Harness().started()
    outcomes: list[str] = []
    never = asyncio.Event()

    async def bounded(data: int) -> None:
        try:
            async with asyncio.timeout(0):  # expired at once: cancels "its" task soon
                await never.wait()
        except TimeoutError:
            outcomes.append(f"{data} timed out")

    h.registry.add("/", "ev", bounded)
    h.feed(1)
    await h.settle(1)
    h.feed(2)
    await h.settle(2)
    assert outcomes == ["1 timed out", "2 timed out"]
    assert not h.task.done()  # the cancellation was the handler's, not the dispatcher's
    assert h.errors == []


async def test_cancelling_the_task_before_it_takes_over_cancels_the_waiting_handler() -> None:
    h = await Harness().started()
    seen: list[str] = []

    async def waits(data: int) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append(f"{data} cancelled where it waited")
            raise

    async def queued(data: int) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            seen.append(f"{data} closed")

    h.registry.add("/", "ev", waits)
    h.feed(1)
    h.registry.remove("/", "ev", waits)
    h.registry.add("/", "ev", queued)
    h.feed(2)  # behind 1: queued as it came, never started
    h.task.cancel()  # as finish() does past its timeout
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.CancelledError):
            await h.task
    assert seen == ["1 cancelled where it waited"]  # 2 never started: nothing to close
    assert h.saved is None


async def test_a_suspended_handler_left_behind_at_the_end_is_closed() -> None:
    h = await Harness().started()
    seen: list[str] = []
    never = asyncio.Event()

    async def waits(data: int) -> None:
        try:
            await never.wait()
        finally:
            seen.append(f"{data} closed")

    h.registry.add("/", "ev", waits)
    h.feed(1)
    await asyncio.sleep(0)  # the task takes 1 over
    h.dispatcher.end()
    await h.dispatcher.finish(timeout=0.01)  # 1 never ends: cancelled at the timeout
    assert h.task.done()
    assert seen == ["1 closed"]


async def test_a_cancellation_raised_by_a_handler_reaches_the_dispatcher_task_not_the_reader() -> (
    None
):
    h = await Harness().started()
    calls: list[str] = []

    async def cancels(data: int) -> None:
        raise asyncio.CancelledError

    h.registry.add("/", "ev", cancels)
    h.registry.add("/", "ev", lambda data: calls.append("after"))
    h.feed(1)  # does not raise here, in the reader
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.CancelledError):
            await h.task  # where it ended when async handlers always ran in the task
    assert calls == []
    assert h.errors == []


async def test_an_async_handler_may_await_a_request_in_its_first_step(server: Server) -> None:
    total = 200
    outbox = WatchedOutbox()
    replies: list[tuple[int, Any]] = []
    done = asyncio.Event()
    stream = p.room_stream("/", "asking")
    async with Client(server.url, outbox=outbox) as receiver, Client(server.url) as sender:

        @receiver.on("ask")
        async def on_ask(data: int, meta: Delivery) -> None:
            assert outbox.saved.get(stream, 0) == meta.offset - 1
            replies.append((data, await receiver.request("echo", data)))
            if len(replies) == total:
                done.set()

        await receiver.join("asking")
        await sender.join("asking")
        await asyncio.gather(*(sender.publish("asking", "ask", i) for i in range(total)))
        async with asyncio.timeout(20):
            await done.wait()
        await outbox.wait_for(stream, total)
    assert replies == [(i, i) for i in range(total)]
