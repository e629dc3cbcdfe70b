"""Handlers for deliveries: registration, validation, and calling in order.

A handler is ``handler(data)`` or ``handler(data, meta)``, sync or async.
Registered for an Event class, it gets a validated instance; for a string it
gets the raw JSON payload; for ``"*"`` it gets every delivery of the
namespace. A payload that fails validation never reaches a handler: it is
logged and given to the error callbacks as ``ValidationFailed``.
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from types import CoroutineType
from typing import TYPE_CHECKING, Any, cast

from ..errors import RTChatError, ValidationFailed
from ..events import Event, event_name, validate_payload

if TYPE_CHECKING:
    from .. import protocol as p

__all__ = [
    "ANY_EVENT",
    "Delivery",
    "ErrorCallback",
    "FINISHED",
    "HandlerRegistry",
    "Pending",
    "Start",
    "start_here",
]

log = logging.getLogger("rtchat_sdk")

ANY_EVENT = "*"


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where a delivered message came from, for handlers that want to know."""

    event: str
    ns: str
    room: str | None
    sender: str | None
    stream: str
    epoch: str
    offset: int

    @classmethod
    def of(cls, frame: p.MessageFrame) -> Delivery:
        return cls(
            frame.event, frame.ns, frame.room, frame.sender, frame.stream, frame.epoch, frame.offset
        )


ErrorCallback = Callable[[RTChatError], Any]


@dataclass(frozen=True, slots=True)
class _Handler:
    func: Callable[..., Any]
    model: type[Event] | None
    wants_meta: bool
    is_async: bool  # a coroutine function: its result is always awaited


_NO_HANDLERS: tuple[_Handler, ...] = ()


FINISHED: Any = object()
"""What a ``Start`` returns for a coroutine that finished without suspending."""


def start_here(coro: _Coroutine) -> Any:
    """Run ``coro`` up to its first suspension: what it yielded, or ``FINISHED``.

    For a caller running in the task that will await the rest, this is the
    first step of ``await coro``. (Iterating spares the StopIteration that
    ``coro.send(None)`` raises at the end.)
    """
    for yielded in coro.__await__():
        return yielded
    return FINISHED


_Coroutine = Coroutine[Any, Any, Any]

Start = Callable[[_Coroutine], Any]
"""How ``HandlerRegistry.call`` runs a coroutine up to its first suspension:
``start_here``, or a function that calls it in another task's name."""


class HandlerRegistry:
    """Handlers per (namespace, event), called one after another per delivery.

    How to call each handler (with ``meta`` or not, awaited or not) is decided
    once, when it is registered. ``call`` runs the handlers of a delivery
    synchronously until one has to wait; what is left is then handed back as
    a ``Pending`` for the caller to await, so a delivery whose handlers are
    all synchronous, or whose coroutines finish without suspending, costs no
    task switch.
    """

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, str], tuple[_Handler, ...]] = {}

    def add(self, ns: str, event: str | type[Event], func: Callable[..., Any]) -> None:
        model = None if isinstance(event, str) else event
        wants_meta = _positional_count(func) >= 2
        handler = _Handler(func, model, wants_meta, inspect.iscoroutinefunction(func))
        key = (ns, event_name(event))
        self._handlers[key] = (*self._handlers.get(key, _NO_HANDLERS), handler)

    def remove(self, ns: str, event: str | type[Event], func: Callable[..., Any]) -> None:
        key = (ns, event_name(event))
        handlers = tuple(h for h in self._handlers.get(key, _NO_HANDLERS) if h.func is not func)
        if handlers:
            self._handlers[key] = handlers
        else:
            self._handlers.pop(key, None)

    def has_handlers(self, frame: p.MessageFrame) -> bool:
        return (frame.ns, frame.event) in self._handlers or (frame.ns, ANY_EVENT) in self._handlers

    def _for(self, frame: p.MessageFrame) -> tuple[_Handler, ...]:
        handlers = self._handlers.get((frame.ns, frame.event), _NO_HANDLERS)
        catch_all = self._handlers.get((frame.ns, ANY_EVENT))
        return handlers + catch_all if catch_all else handlers

    async def dispatch(self, frame: p.MessageFrame, report: ErrorCallback) -> None:
        """Call every handler for this delivery, from a task; failures go to ``report``."""
        rest = self.call(frame, report, start_here)
        if rest is not None:
            await rest.run()

    def call(
        self, frame: p.MessageFrame, report: ErrorCallback, start: Start | None = None
    ) -> Pending | None:
        """Call the handlers of this delivery in order, without waiting.

        Returns None when every handler is done. A handler's coroutine is run
        with ``start`` up to its first suspension (not at all without one):
        one that finishes there is done. The first handler that leaves
        something to wait for (a suspended coroutine, another awaitable)
        ends the call: the ``Pending`` returned finishes it and then calls
        the handlers after it, and must be awaited (or closed) before the
        delivery counts as handled. Failures go to ``report``.
        """
        handlers = self._for(frame)
        meta: Delivery | None = None
        for index, handler in enumerate(handlers):
            payload = frame.data if handler.model is None else _payload(handler, frame, report)
            if payload is _INVALID:
                continue
            if handler.wants_meta and meta is None:
                meta = Delivery.of(frame)
            try:
                result = (
                    handler.func(payload, meta) if handler.wants_meta else handler.func(payload)
                )
            except Exception as exc:
                _report_failure(handler, frame, exc, report)
                continue
            if not handler.is_async and (result is None or not inspect.isawaitable(result)):
                continue
            if start is None or type(result) is not CoroutineType:
                return Pending(frame, handlers, index, meta, report, result)
            try:
                yielded = start(result)
            except Exception as exc:
                _report_failure(handler, frame, exc, report)
                continue
            except BaseException as exc:
                # Not a handler failure (CancelledError, KeyboardInterrupt...): it is
                # raised where the handler's awaiting would have raised it, in the task
                # that awaits the rest, and the handlers after it do not run.
                return Pending(frame, handlers, index, meta, report, _reraise(exc))
            if yielded is not FINISHED:
                return Pending(frame, handlers, index, meta, report, result, yielded, started=True)
        return None


class Pending:
    """What is left of a delivery's handlers once one of them has to wait.

    ``run()`` waits for that handler's awaitable (a coroutine suspended at
    its first wait goes on from there), then calls the handlers after it;
    awaiting a ``Pending`` is awaiting ``run()``. ``close()`` gives up on it.
    """

    __slots__ = (
        "_awaitable",
        "_handlers",
        "_index",
        "_meta",
        "_report",
        "_yielded",
        "frame",
        "started",
    )

    def __init__(
        self,
        frame: p.MessageFrame,
        handlers: tuple[_Handler, ...],
        index: int,
        meta: Delivery | None,
        report: ErrorCallback,
        awaitable: Awaitable[Any],
        yielded: Any = None,
        *,
        started: bool = False,
    ) -> None:
        self.frame = frame
        self.started = started
        """True if the awaitable is a coroutine already run up to its first suspension,
        where it yielded ``yielded`` to no task: the task that runs this takes it over."""
        self._awaitable = awaitable
        self._handlers = handlers
        self._index = index
        self._meta = meta
        self._report = report
        self._yielded = yielded

    def __await__(self) -> Generator[Any, None, None]:
        return self.run().__await__()

    async def run(self, thrown: BaseException | None = None) -> None:
        """Finish the delivery's handlers; ``thrown`` goes in first (a suspended coroutine
        takes it where it waits), as a cancellation of the awaiting task would."""
        frame, report, meta, handlers = self.frame, self._report, self._meta, self._handlers
        try:
            if self.started:
                await _resume(cast(_Coroutine, self._awaitable), self._yielded, thrown)
            elif thrown is not None:
                self.close()
                raise thrown
            else:
                await self._awaitable
        except Exception as exc:
            _report_failure(handlers[self._index], frame, exc, report)
        for handler in handlers[self._index + 1 :]:
            payload = frame.data if handler.model is None else _payload(handler, frame, report)
            if payload is _INVALID:
                continue
            if handler.wants_meta and meta is None:
                meta = Delivery.of(frame)
            try:
                result = (
                    handler.func(payload, meta) if handler.wants_meta else handler.func(payload)
                )
                if handler.is_async or (result is not None and inspect.isawaitable(result)):
                    await result
            except Exception as exc:
                _report_failure(handler, frame, exc, report)

    def close(self) -> None:
        """Never run: close the coroutine (a suspended one runs its ``finally`` blocks)."""
        if isinstance(self._awaitable, Coroutine):
            self._awaitable.close()


@types.coroutine
def _resume(
    coro: _Coroutine, yielded: Any, thrown: BaseException | None
) -> Generator[Any, Any, Any]:
    """Await ``coro`` from where it is suspended, having yielded ``yielded`` to no task.

    ``yield from coro`` would resume it at once; here the task first gets the
    future the coroutine waits for (or the bare yield of ``sleep(0)``), as if
    the coroutine had been awaited by it from the start, and resumes it once
    that is done. What the task throws in (a cancellation) goes to the coroutine.
    """
    while True:
        if thrown is None:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                thrown = exc
                continue
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value
        else:
            into, thrown = thrown, None
            try:
                yielded = coro.throw(into)
            except StopIteration as stop:
                return stop.value


async def _reraise(exc: BaseException) -> None:
    raise exc


def _payload(handler: _Handler, frame: p.MessageFrame, report: ErrorCallback) -> Any:
    if handler.model is None:
        return frame.data
    try:
        return validate_payload(handler.model, frame.data)
    except ValidationFailed as exc:
        log.warning(
            "dropped invalid %r delivery at %s:%d: %s",
            frame.event,
            frame.stream,
            frame.offset,
            exc,
        )
        report(exc)
        return _INVALID


_INVALID: Any = object()
"""``_payload``'s answer for a payload that failed validation (reported)."""


def _report_failure(
    handler: _Handler, frame: p.MessageFrame, exc: Exception, report: ErrorCallback
) -> None:
    log.exception("handler %r for %r raised", handler.func, frame.event, exc_info=exc)
    err = RTChatError(f"handler for {frame.event!r} raised {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    report(err)


def _positional_count(func: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return 1
    return sum(1 for prm in params if prm.kind in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD))
