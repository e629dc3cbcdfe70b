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
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import RTChatError, ValidationFailed
from ..events import Event, event_name, validate_payload

if TYPE_CHECKING:
    from .. import protocol as p

__all__ = ["ANY_EVENT", "Delivery", "ErrorCallback", "HandlerRegistry"]

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


class HandlerRegistry:
    """Handlers per (namespace, event), called one after another per delivery.

    How to call each handler (with ``meta`` or not, awaited or not) is decided
    once, when it is registered. ``call`` runs the handlers of a delivery
    synchronously until one returns an awaitable; the rest of the work is
    then handed back as a coroutine for the caller to await, so a delivery
    whose handlers are all synchronous costs no task switch.
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
        """Call every handler for this delivery; failures go to ``report``."""
        rest = self.call(frame, report)
        if rest is not None:
            await rest

    def call(
        self, frame: p.MessageFrame, report: ErrorCallback
    ) -> Coroutine[Any, Any, None] | None:
        """Call the handlers of this delivery in order, without awaiting.

        Returns None when every handler is done. When one returns an
        awaitable, returns a coroutine that awaits it and then calls the
        handlers after it: the caller must await that before the delivery
        counts as handled. Failures go to ``report``.
        """
        handlers = self._for(frame)
        meta: Delivery | None = None
        for index, handler in enumerate(handlers):
            payload = self._payload(handler, frame, report)
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
            if handler.is_async or (result is not None and inspect.isawaitable(result)):
                return self._finish(result, handler, handlers[index + 1 :], frame, meta, report)
        return None

    async def _finish(
        self,
        pending: Awaitable[Any],
        handler: _Handler,
        rest: tuple[_Handler, ...],
        frame: p.MessageFrame,
        meta: Delivery | None,
        report: ErrorCallback,
    ) -> None:
        try:
            await pending
        except Exception as exc:
            _report_failure(handler, frame, exc, report)
        for handler in rest:
            payload = self._payload(handler, frame, report)
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

    @staticmethod
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
