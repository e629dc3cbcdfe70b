"""The delivery dispatcher: deliveries and gap notices reach the app one by one, in order.

A delivery with nothing queued ahead of it is handled at once, from the
reader (synchronous handlers then cost no task switch); the first handler
that returns an awaitable, and everything after it, goes through the
dispatcher task, in stream order, so a handler may itself ``await
client.request()``. A position is marked handled in the core only after its
handlers ran. The queue is bounded by the reader: at ``max_pending`` it
waits in ``wait_for_handlers()`` until the queue is down to half.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from .. import protocol as p
from ..core import ClientSession, GapReported
from .handlers import ErrorCallback, HandlerRegistry

__all__ = ["Dispatcher", "GapCallback"]

log = logging.getLogger("rtchat_sdk")

GapCallback = Callable[[GapReported], Any]


@dataclass(frozen=True, slots=True)
class _Unfinished:
    """A delivery whose handlers started inline; ``rest`` awaits what they left."""

    frame: p.MessageFrame
    rest: Coroutine[Any, Any, None]


_Item = p.MessageFrame | GapReported | _Unfinished


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
        self._ending = False
        self.reading_paused = False
        """True while the reader waits for handlers (the link is slow only on our side)."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rtchat-dispatch")

    @property
    def full(self) -> bool:
        return self._queue.qsize() >= self.max_pending

    def deliver(self, frame: p.MessageFrame) -> None:
        if self._undispatched:
            # Behind what is queued: handled, and its position persisted, in order.
            self._later(frame)
            return
        rest = self._handlers.call(frame, self._report)
        if rest is None:
            self._session.delivery_handled(frame)
        else:
            self._later(_Unfinished(frame, rest))

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
        try:
            while True:
                if queue.qsize() <= self.max_pending // 2:
                    self._caught_up.set()
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, GapReported):
                    for callback in list(self._gap_callbacks):
                        try:
                            callback(item)
                        except Exception:
                            log.exception("gap callback raised")
                    self._session.gap_handled(item)
                elif isinstance(item, _Unfinished):
                    await item.rest
                    self._session.delivery_handled(item.frame)
                else:
                    await self._handlers.dispatch(item, self._report)
                    self._session.delivery_handled(item)
                self._undispatched -= 1
        finally:
            while not queue.empty():  # never run now: close their coroutines
                left = queue.get_nowait()
                if isinstance(left, _Unfinished):
                    left.rest.close()
