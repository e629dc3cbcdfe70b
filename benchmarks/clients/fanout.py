"""The room fan-out scenarios, implementation-independent part.

One publisher and ``receivers`` clients in one room, all in this process.
Two choices make the four variants, each its own scenario:

* **handler**: each receiver's callback is a plain function (``sync``) or
  an ``async def`` (``async``), registered the way each library documents;
* **publisher**: ``throttled`` keeps at most ``window`` messages that not
  every receiver has yet (end-to-end flow control, so nobody piles data into
  buffers); ``unthrottled`` publishes as fast as its library lets it,
  without waiting for any receiver, and the receivers catch up when they can.

Every delivery is checked per receiver: a message that never arrived is
*lost*, one that arrived twice or after a later one is *out of order or
repeated*. Every loop is bounded by a count and a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.common import Meter

__all__ = ["FanoutTracker", "Publish", "SeqOf"]

Publish = Callable[[int], Awaitable[object]]
"""Publish message number ``seq`` to the room (returns when the library lets go)."""

SeqOf = Callable[[Any], int]
"""Where a receiver finds the message number in what its callback was given."""


def _payload_seq(data: Any) -> int:
    n: int = data["n"]
    return n


class FanoutTracker:
    """Counts deliveries per message and per receiver; paces the publisher.

    Throttled, the measured window opens when ``warmup`` messages are
    complete (every receiver has them), publishing goes on for ``seconds``
    from there, and the window closes when the last message published is
    complete. Unthrottled, the warm-up messages are published
    throttled and awaited first; the window then opens as the flood of
    publishes starts and closes when its last message is complete. If
    deliveries stop coming (a receiver that lost its connection never
    completes), the wait ends after ``stall`` seconds without one, and the
    rate is counted up to the last delivery.
    """

    def __init__(
        self,
        receivers: int,
        total: int,
        window: int,
        warmup: int,
        meter: Meter,
        throttled: bool = True,
        stall: float = 10.0,
    ) -> None:
        self.receivers = receivers
        self.total = total
        self.warmup = warmup
        self.throttled = throttled
        self.stall = stall
        self.counts = [0] * total
        self.seen = [bytearray(total) for _ in range(receivers)]
        self.highest = [-1] * receivers
        self.delivered = 0
        self.repeated = 0
        self.reordered = 0
        self.disconnects = 0
        self.disconnect_reasons: dict[str, int] = {}
        self.complete = 0
        self.published: int | None = None
        """How many messages were published, once publishing is over."""
        self.issued = 0
        """How many messages publishing has started so far."""
        self.last_delivery_at = 0.0
        self.credits = asyncio.Semaphore(window)
        self.warm = asyncio.Event()
        self.done = asyncio.Event()
        self.meter = meter
        self.flood: dict[str, float] = {}
        if warmup == 0:
            self._warmed_up()

    @classmethod
    def from_params(cls, params: dict[str, Any], server_pid: int) -> FanoutTracker:
        return cls(
            int(params["receivers"]),
            int(params["messages"]),
            int(params["window"]),
            int(params["warmup"]),
            Meter(server_pid),
            throttled=params.get("publisher", "throttled") == "throttled",
            stall=float(params.get("stall", 10.0)),
        )

    @staticmethod
    def async_handler(params: dict[str, Any]) -> bool:
        """Whether this run's receivers use an ``async def`` callback."""
        return bool(params.get("handler", "sync") == "async")

    def handler(
        self, receiver: int, is_async: bool, seq_of: SeqOf = _payload_seq
    ) -> Callable[[Any], Any]:
        """Receiver number ``receiver``'s callback: a plain function or an ``async def``."""
        deliver = self.deliver
        if is_async:

            async def on_message_async(data: Any) -> None:
                deliver(receiver, seq_of(data))

            return on_message_async

        def on_message(data: Any) -> None:
            deliver(receiver, seq_of(data))

        return on_message

    def disconnected(self, *reason: Any) -> None:
        """A receiver's connection went down (a callback for the libraries), and why."""
        self.disconnects += 1
        why = " ".join(str(r) for r in reason) or "unknown"
        self.disconnect_reasons[why] = self.disconnect_reasons.get(why, 0) + 1

    def _warmed_up(self) -> None:
        if self.throttled:
            self.meter.start()
        else:
            self.warm.set()

    def deliver(self, receiver: int, seq: int) -> None:
        """Receiver ``receiver`` got message ``seq``."""
        self.delivered += 1
        self.last_delivery_at = time.perf_counter()
        seen = self.seen[receiver]
        if seen[seq]:
            self.repeated += 1
            return
        seen[seq] = 1
        if seq < self.highest[receiver]:
            self.reordered += 1
        else:
            self.highest[receiver] = seq
        count = self.counts[seq] + 1
        self.counts[seq] = count
        if count == self.receivers:
            self.complete += 1
            self.credits.release()
            if self.complete == self.warmup:
                self._warmed_up()
            if self.complete == self.published:
                self.done.set()

    async def _publish(
        self, publish: Publish, start: int, workers: int, throttle: bool, seconds: float | None
    ) -> int:
        """Publish ``start``, ``start + 1``... until ``total``, or for ``seconds`` of the
        measured window (None: the warm-up messages only).

        ``workers`` tasks share the sequence: more than one when ``publish``
        waits for the server's acknowledgement. Returns the next number.
        """
        next_seq = start
        stop = self.total if seconds is not None else min(self.total, self.warmup)
        meter = self.meter

        def over() -> bool:
            # The window opens (meter.started) when the warm-up is complete.
            return (
                seconds is not None
                and meter.started > 0
                and time.perf_counter() >= meter.started + seconds
            )

        async def worker() -> None:
            nonlocal next_seq
            while True:
                if throttle:
                    await self.credits.acquire()
                if next_seq >= stop or (next_seq > self.warmup and over()):
                    if throttle:
                        self.credits.release()
                    return
                seq = next_seq
                next_seq += 1
                self.issued = next_seq
                await publish(seq)

        await asyncio.gather(*(worker() for _ in range(workers)))
        return next_seq

    async def publish_all(self, publish: Publish, seconds: float, workers: int = 1) -> None:
        """Publish the warm-up, then the measured messages for at most ``seconds``."""
        if self.throttled:
            published = await self._publish(publish, 0, workers, True, seconds)
        else:
            warmed = await self._publish(publish, 0, workers, True, None)
            await self.warm.wait()
            self.meter.start()
            published = await self._publish(publish, warmed, workers, False, seconds)
            took = time.perf_counter() - self.meter.started
            self.flood = {
                "publish_s": took,
                "published_per_s": (published - warmed) / took if took > 0 else 0.0,
            }
        self.published = published
        if self.complete >= published:
            self.done.set()

    async def _wait_done(self, timeout: float) -> bool:
        """Until every published message is complete (True), or the time out or a stall."""
        deadline = time.monotonic() + timeout
        waiting_since = time.perf_counter()
        while not self.done.is_set():
            remaining = deadline - time.monotonic()
            idle = time.perf_counter() - max(self.last_delivery_at, waiting_since)
            if remaining <= 0 or idle >= self.stall:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), min(remaining, 0.5))
        return True

    async def run(
        self, publish: Publish, seconds: float, timeout: float, workers: int = 1
    ) -> dict[str, Any]:
        """Publish, then wait (bounded) for the last message to reach everyone."""
        finished = False
        try:
            await asyncio.wait_for(self.publish_all(publish, seconds, workers), seconds + timeout)
            finished = await self._wait_done(timeout)
        except TimeoutError:
            pass
        published = self.published if self.published is not None else self.issued
        measured = sum(self.counts[self.warmup : published])
        result: dict[str, Any] = dict(self.meter.stop(measured, "deliveries"))
        if not finished and self.meter.started and self.last_delivery_at > self.meter.started:
            # Counted to the last delivery, not to the end of the wait for ones that never came.
            elapsed = self.last_delivery_at - self.meter.started
            result["rate"] = measured / elapsed
        result |= self.flood
        result["timed_out"] = not finished
        result["messages_published"] = published
        result["messages_complete"] = self.complete
        result["deliveries_total"] = self.delivered
        result["lost"] = published * self.receivers - sum(self.counts[:published])
        result["out_of_order_or_repeated"] = self.repeated + self.reordered
        result["disconnects"] = self.disconnects
        result["disconnect_reasons"] = dict(self.disconnect_reasons)
        return result
