"""The delivery dispatcher: deliveries and gap notices reach the app one by one, in order.

A delivery with nothing queued ahead of it is handled at once, from the
reader: synchronous handlers are called, and an ``async def`` handler's
coroutine is run up to its first suspension, in the dispatcher task's name
(``asyncio.current_task()`` is that task, its context variables are the
task's), so one that awaits nothing, or only what is already done, costs no
task switch and nothing is queued. The first handler that has to wait, and
everything after it, goes through the dispatcher task, in stream order: the
task takes the suspended coroutine over where it waits, so a handler may
itself ``await client.request()``. A position is marked handled in the core
only after its handlers ran. The queue is bounded by the reader: at
``max_pending`` it waits in ``wait_for_handlers()`` until the queue is down
to half.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from asyncio import tasks
from collections.abc import Callable, Coroutine
from typing import Any

from .. import protocol as p
from ..core import ClientSession, GapReported
from .handlers import ErrorCallback, HandlerRegistry, Pending, Start, start_here

__all__ = ["Dispatcher", "GapCallback"]

log = logging.getLogger("rtchat_sdk")

GapCallback = Callable[[GapReported], Any]

_Item = p.MessageFrame | GapReported | Pending


class Dispatcher:
    """One task handing the app what the core delivered, in the order it came."""

    def __init__(
        self,
        session: ClientSession,
        handlers: HandlerRegistry,
        *,
        report: ErrorCallback,
        gap_callbacks: list[GapCallback],
        max_pending: int,
    ) -> None:
        if max_pending < 1:
            raise ValueError("max_pending_deliveries must be at least 1")
        self.max_pending = max_pending
        self._session = session
        self._handlers = handlers
        self._report = report
        self._gap_callbacks = gap_callbacks
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._undispatched = 0
        self._caught_up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: contextvars.Context | None = None
        self._start: Start | None = None
        """How ``deliver`` starts a handler's coroutine: in the task's name, once it runs."""
        self._taken_over: Pending | None = None
        """A delivery whose coroutine started in the task's name, queued, not yet resumed."""
        self._ending = False
        self.reading_paused = False
        """True while the reader waits for handlers (the link is slow only on our side)."""

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._context = contextvars.copy_context()
        self._task = self._loop.create_task(
            self._run(), name="rtchat-dispatch", context=self._context
        )
        self._start = _starter(self._loop, self._task, self._context)

    @property
    def full(self) -> bool:
        return self._queue.qsize() >= self.max_pending

    def deliver(self, frame: p.MessageFrame) -> None:
        if self._undispatched:
            # Behind what is queued: handled, and its position persisted, in order.
            self._later(frame)
            return
        rest = self._handlers.call(frame, self._report, self._start)
        if rest is None:
            self._session.delivery_handled(frame)
            return
        if rest.started:
            self._taken_over = rest
        self._later(rest)

    def gap(self, gap: GapReported) -> None:
        self._later(gap)

    async def wait_for_handlers(self) -> None:
        """Stop reading until handlers catch up: TCP backpressure reaches the server,
        which cuts us off as a slow consumer if it lasts; we then resume without loss."""
        self.reading_paused = True
        self._caught_up.clear()
        try:
            await self._caught_up.wait()
        finally:
            self.reading_paused = False

    def end(self) -> None:
        """Hand out what is queued, then stop (once; later calls do nothing)."""
        if not self._ending:
            self._ending = True
            self._start = None  # nothing is started in the task's name behind the end
            self._queue.put_nowait(None)

    async def finish(self, timeout: float) -> None:
        """Wait for the dispatcher to end; past ``timeout`` it is cancelled."""
        task = self._task
        if task is None or task is asyncio.current_task():
            return
        try:
            await asyncio.wait_for(task, timeout)
        except TimeoutError:
            log.warning("handlers did not finish within %g s of close; cancelled", timeout)

    def _later(self, item: _Item) -> None:
        self._undispatched += 1
        self._queue.put_nowait(item)

    async def _run(self) -> None:
        queue = self._queue
        session = self._session
        try:
            while True:
                if queue.qsize() <= self.max_pending // 2:
                    self._caught_up.set()
                thrown: BaseException | None = None
                try:
                    item = await queue.get()
                except asyncio.CancelledError as exc:
                    # A coroutine started in this task's name is waiting to be taken
                    # over: the cancellation is its own (an asyncio.timeout in it that
                    # already expired, a close that gives up on handlers), as if this
                    # task already awaited it.
                    if self._taken_over is None or queue.empty():
                        raise
                    item, thrown = queue.get_nowait(), exc  # it is first in the queue
                if item is None:
                    return
                if isinstance(item, Pending):
                    if item is self._taken_over:
                        self._taken_over = None
                    await item.run(thrown)
                    session.delivery_handled(item.frame)
                elif isinstance(item, GapReported):
                    for callback in list(self._gap_callbacks):
                        try:
                            callback(item)
                        except Exception:
                            log.exception("gap callback raised")
                    session.gap_handled(item)
                else:
                    rest = self._handlers.call(item, self._report, start_here)
                    if rest is not None:
                        await rest.run()
                    session.delivery_handled(item)
                self._undispatched -= 1
        finally:
            self._taken_over = None
            while not queue.empty():  # never run now: close their coroutines
                left = queue.get_nowait()
                if isinstance(left, Pending):
                    left.close()


def _starter(
    loop: asyncio.AbstractEventLoop, task: asyncio.Task[None], context: contextvars.Context
) -> Start:
    """A ``Start`` that runs a coroutine up to its first suspension as if ``task`` ran it.

    The handler sees ``task`` as ``asyncio.current_task()`` (so an
    ``asyncio.timeout`` or a task group in it belongs to the task that will
    resume it) and runs in the task's context (so a context variable it sets
    before its first await is still set after it), whichever task is running.
    This is what an eagerly started task does (Python 3.12), with asyncio's
    own hooks for it, without a task per delivery.
    """
    swap = getattr(tasks, "_swap_current_task", None)  # Python 3.12 and later
    if swap is not None:

        def start(coro: Coroutine[Any, Any, Any]) -> Any:
            caller = swap(loop, task)
            try:
                return start_here(coro) if caller is task else context.run(start_here, coro)
            finally:
                swap(loop, caller)

        return start

    current = getattr(tasks, "_current_tasks", None)
    current_task = current.get if isinstance(current, dict) else asyncio.current_task
    enter, leave = tasks._enter_task, tasks._leave_task

    def start_311(coro: Coroutine[Any, Any, Any]) -> Any:
        caller = current_task(loop)
        if caller is task:
            return start_here(coro)
        if caller is not None:
            leave(loop, caller)
        enter(loop, task)
        try:
            return context.run(start_here, coro)
        finally:
            leave(loop, task)
            if caller is not None:
                enter(loop, caller)

    return start_311
