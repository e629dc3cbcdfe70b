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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import RTChatError, ValidationFailed
from .events import Event, event_name, validate_payload

if TYPE_CHECKING:
    from . import protocol as p

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


class HandlerRegistry:
    """Handlers per (namespace, event), called one after another per delivery."""

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, str], list[_Handler]] = {}

    def add(self, ns: str, event: str | type[Event], func: Callable[..., Any]) -> None:
        model = None if isinstance(event, str) else event
        wants_meta = _positional_count(func) >= 2
        self._handlers.setdefault((ns, event_name(event)), []).append(
            _Handler(func, model, wants_meta)
        )

    def remove(self, ns: str, event: str | type[Event], func: Callable[..., Any]) -> None:
        handlers = self._handlers.get((ns, event_name(event)), [])
        handlers[:] = [h for h in handlers if h.func is not func]

    def has_handlers(self, frame: p.MessageFrame) -> bool:
        return (frame.ns, frame.event) in self._handlers or (frame.ns, ANY_EVENT) in self._handlers

    async def dispatch(self, frame: p.MessageFrame, report: ErrorCallback) -> None:
        """Call every handler for this delivery; failures go to ``report``."""
        handlers = self._handlers.get((frame.ns, frame.event), []) + self._handlers.get(
            (frame.ns, ANY_EVENT), []
        )
        if not handlers:
            return
        meta = Delivery.of(frame)
        for handler in handlers:
            payload: Any = frame.data
            if handler.model is not None:
                try:
                    payload = validate_payload(handler.model, frame.data)
                except ValidationFailed as exc:
                    log.warning(
                        "dropped invalid %r delivery at %s:%d: %s",
                        frame.event,
                        frame.stream,
                        frame.offset,
                        exc,
                    )
                    report(exc)
                    continue
            try:
                result = (
                    handler.func(payload, meta) if handler.wants_meta else handler.func(payload)
                )
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                log.exception("handler %r for %r raised", handler.func, frame.event)
                err = RTChatError(f"handler for {frame.event!r} raised {type(exc).__name__}: {exc}")
                err.__cause__ = exc
                report(err)


def _positional_count(func: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return 1
    return sum(1 for prm in params if prm.kind in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD))
