"""Namespaces, handlers and the context they receive.

A handler is ``def handler(ctx, data)`` or ``async def handler(ctx, data)``.
When ``data`` is annotated with a pydantic model (or the handler is registered
for an Event class) the payload is validated first, and an invalid payload is
answered with ``invalid_payload`` without calling the handler. The return
value is the reply to a request; a pydantic model is sent as its JSON form.
An exception becomes an error reply: ``RemoteError`` keeps its code, any
other exception is ``handler_error``. The connection always carries on.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, get_type_hints

from pydantic import BaseModel

from rtchat_sdk import protocol as p
from rtchat_sdk.errors import RemoteError, ValidationFailed
from rtchat_sdk.events import Event, event_name, validate_payload

from .errors import HandlerFailure

__all__ = ["Context", "HandlerFailure", "Host", "JoinCheck", "Namespace"]

log = logging.getLogger("server_ref")

F = TypeVar("F", bound=Callable[..., Any])
JoinCheck = Callable[["Context", str], "bool | Awaitable[bool]"]


class Host(Protocol):
    """What a Context needs of the server (``Server`` is one): no import of it, no cycle."""

    async def join_session(self, session_id: str, ns: str, room: str) -> tuple[str, int]: ...

    async def leave_session(self, session_id: str, ns: str, room: str) -> None: ...

    async def publish(
        self,
        room: str,
        event: str | Event,
        data: Any = None,
        *,
        ns: str = ...,
        sender: str | None = None,
        echo: bool = False,
    ) -> int: ...

    async def send_to(
        self, session_id: str, event: str | Event, data: Any = None, *, ns: str = ...
    ) -> int: ...


@dataclass(slots=True)
class Context:
    """What a handler knows about the caller, and what it can do for it."""

    server: Host
    session_id: str
    user: str | None
    ns: str

    async def join(self, room: str) -> None:
        """Put the calling session in ``room`` of this namespace."""
        await self.server.join_session(self.session_id, self.ns, room)

    async def leave(self, room: str) -> None:
        await self.server.leave_session(self.session_id, self.ns, room)

    async def publish(self, room: str, event: str | Event, data: Any = None) -> int:
        """Publish to a room as this session (the caller does not receive it)."""
        return await self.server.publish(room, event, data, ns=self.ns, sender=self.session_id)

    async def send(self, session_id: str, event: str | Event, data: Any = None) -> int:
        """Send a direct message to one session's inbox."""
        return await self.server.send_to(session_id, event, data, ns=self.ns)


_PLAIN = frozenset({dict, list, str, int, float, bool, type(None)})
"""Types of the common replies, which are never awaitable (skips isawaitable's ABC check)."""


@dataclass(frozen=True, slots=True)
class _Handler:
    func: Callable[..., Any]
    model: type[BaseModel] | None
    wants_data: bool


def _payload_model(func: Callable[..., Any], event: str | type[Event]) -> type[BaseModel] | None:
    if not isinstance(event, str):
        return event
    params = list(inspect.signature(func).parameters.values())
    if len(params) < 2:
        return None
    try:
        hint = get_type_hints(func).get(params[1].name)
    except (NameError, TypeError):
        return None
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return hint
    return None


class Namespace:
    """Handlers and rooms under one path; rooms of two namespaces never mix."""

    def __init__(self, path: str) -> None:
        if not path.startswith("/"):
            raise ValueError(f"namespace must start with '/': {path!r}")
        self.path = path
        self._handlers: dict[str, _Handler] = {}
        self._join_check: JoinCheck | None = None

    def on(self, event: str | type[Event]) -> Callable[[F], F]:
        """Register the handler for ``event`` (a name or an Event class)."""
        name = event_name(event)

        def register(func: F) -> F:
            wants_data = len(inspect.signature(func).parameters) >= 2
            self._handlers[name] = _Handler(func, _payload_model(func, event), wants_data)
            return func

        return register

    def authorize_join(self, check: JoinCheck) -> JoinCheck:
        """Decorate ``check(ctx, room) -> bool``: False refuses the join."""
        self._join_check = check
        return check

    async def may_join(self, ctx: Context, room: str) -> bool:
        if self._join_check is None:
            return True
        allowed = self._join_check(ctx, room)
        if inspect.isawaitable(allowed):
            allowed = await allowed
        return bool(allowed)

    async def call(self, ctx: Context, event: str, data: Any) -> Any:
        """Run the handler; returns the JSON-ready reply or raises HandlerFailure."""
        handler = self._handlers.get(event)
        if handler is None:
            raise HandlerFailure(
                p.ErrorCode.UNKNOWN_EVENT,
                f"no handler for event {event!r} in namespace {self.path!r}",
            )
        payload: Any = data
        if handler.model is not None:
            try:
                payload = validate_payload(handler.model, data)
            except ValidationFailed as exc:
                raise HandlerFailure(p.ErrorCode.INVALID_PAYLOAD, str(exc)) from exc
        try:
            result = handler.func(ctx, payload) if handler.wants_data else handler.func(ctx)
            if type(result) not in _PLAIN and inspect.isawaitable(result):
                result = await result
        except RemoteError as exc:
            raise HandlerFailure(exc.code, exc.message, exc.details) from exc
        except Exception as exc:
            log.exception("handler for %r in %r raised", event, self.path)
            raise HandlerFailure(p.ErrorCode.HANDLER_ERROR, f"{type(exc).__name__}: {exc}") from exc
        if isinstance(result, BaseModel):
            return result.model_dump(mode="json")
        return result
