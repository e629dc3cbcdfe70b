"""Namespaces, handlers and the context they receive.

A handler is ``def handler(ctx, data)`` or ``async def handler(ctx, data)``.
When ``data`` is annotated with a pydantic model (or the handler is registered
for an Event class) the payload is validated first, and an invalid payload is
answered with ``invalid_payload`` without calling the handler. The return
value is the reply to a request; a pydantic model is sent as its JSON form.
An exception becomes an error reply: ``RemoteError`` keeps its code, any
other exception is ``handler_error``. The connection always carries on.

Authorization hooks (``authorize_join``, ``authorize_publish``,
``authorize_call``, ``authorize_receive``) get the same ``Context`` as
handlers, claims included, and return a bool, sync or async; a namespace
without a hook for an action never asks (``core/authz.py``).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import CoroutineType
from typing import Any, Protocol, TypeVar, get_type_hints

from pydantic import BaseModel

from rtchat_sdk import protocol as p
from rtchat_sdk.errors import RemoteError, ValidationFailed
from rtchat_sdk.events import Event, event_name, validate_payload

from .core.authz import CALL, JOIN, PUBLISH, RECEIVE
from .core.stats import DURATION_BOUNDS, Timing
from .errors import HandlerFailure

__all__ = [
    "CallCheck",
    "Context",
    "HandlerFailure",
    "Host",
    "JoinCheck",
    "Namespace",
    "PublishCheck",
]

log = logging.getLogger("server_ref")

F = TypeVar("F", bound=Callable[..., Any])
JoinCheck = Callable[["Context", str], "bool | Awaitable[bool]"]
"""``check(ctx, room)``: may the session join the room."""
PublishCheck = Callable[["Context", str, str], "bool | Awaitable[bool]"]
"""``check(ctx, room, event)``: may it publish the event to the room."""
CallCheck = Callable[["Context", str], "bool | Awaitable[bool]"]
"""``check(ctx, event)``: may it call the event (emit, request), or receive it (a direct send)."""


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
    """What a handler (or an authorization hook) knows about the caller, and what it can do.

    ``claims``: what the authenticator said about the credentials of the
    session's current connection (a JWT's claims), empty without.
    """

    server: Host
    session_id: str
    user: str | None
    ns: str
    claims: dict[str, Any] = field(default_factory=dict)

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


_clock = time.perf_counter
"""Handler durations' clock (a module global: one lookup less per handler call)."""

_PLAIN = p.PLAIN_JSON_TYPES  # the common replies (a module global: one lookup less)


@dataclass(frozen=True, slots=True)
class _Handler:
    func: Callable[..., Any]
    model: type[BaseModel] | None
    wants_data: bool
    timing: Timing
    """The event's calls and sampled durations (``Namespace.timings``), kept here too:
    one lookup less per call."""


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

    def __init__(self, path: str, *, presence: bool = False, presence_events: bool = False) -> None:
        if not path.startswith("/"):
            raise ValueError(f"namespace must start with '/': {path!r}")
        self.path = path
        self.presence = presence or presence_events
        """Keep who is in each room (``presence`` / ``presence_stats``, PROTOCOL §7.5)."""
        self.presence_events = presence_events
        """Also append ``$join`` / ``$leave`` entries to the room streams (N² deliveries
        in a room of N members that come and go: leave off for large rooms)."""
        self._handlers: dict[str, _Handler] = {}
        self.guards: dict[str, Callable[..., Any]] = {}
        """The authorization hook per action (``core/authz.py``); the hub reads the keys."""
        self.timings: dict[str, Timing] = {}
        """Each event's handler calls and a sample of their durations
        (``rtchat_handler_calls_total``, ``rtchat_request_duration_seconds``): one per
        registered event, made with its handler, so clients cannot add labels and
        every event has its series from the start."""
        self.time_every = 1
        """Time one handler call in this many (the first, then every n-th, per event);
        the server sets it from ``ServerConfig.request_timing_every``."""

    def on(self, event: str | type[Event]) -> Callable[[F], F]:
        """Register the handler for ``event`` (a name or an Event class)."""
        name = event_name(event)

        def register(func: F) -> F:
            wants_data = len(inspect.signature(func).parameters) >= 2
            timing = self.timings.setdefault(name, Timing(DURATION_BOUNDS))
            self._handlers[name] = _Handler(func, _payload_model(func, event), wants_data, timing)
            return func

        return register

    def authorize_join(self, check: JoinCheck) -> JoinCheck:
        """Decorate ``check(ctx, room) -> bool``: False refuses the join (``forbidden``),
        and a room restored after a lost session (a ``not_rejoined`` gap)."""
        self.guards[JOIN] = check
        return check

    def authorize_publish(self, check: PublishCheck) -> PublishCheck:
        """Decorate ``check(ctx, room, event) -> bool``: False refuses a client's publish."""
        self.guards[PUBLISH] = check
        return check

    def authorize_call(self, check: CallCheck) -> CallCheck:
        """Decorate ``check(ctx, event) -> bool``: False refuses an emit or request
        before its handler runs (known event or not)."""
        self.guards[CALL] = check
        return check

    def authorize_receive(self, check: CallCheck) -> CallCheck:
        """Decorate ``check(ctx, event) -> bool``, ``ctx`` the recipient's: False makes
        ``server.send_to`` / ``ctx.send`` in this namespace raise ``Forbidden``."""
        self.guards[RECEIVE] = check
        return check

    async def authorize(
        self, action: str, ctx: Context, room: str | None, event: str | None
    ) -> bool:
        """Run the hook for ``action``: True without one; a hook that raises refuses."""
        check = self.guards.get(action)
        if check is None:
            return True
        args = (room,) if action == JOIN else (room, event) if action == PUBLISH else (event,)
        try:
            allowed = check(ctx, *args)
            if inspect.isawaitable(allowed):
                allowed = await allowed
        except Exception:
            log.exception("%s check in %r raised (refused)", action, self.path)
            return False
        return bool(allowed)

    async def call(self, ctx: Context, event: str, data: Any) -> Any:
        """Run the handler; returns the JSON-ready reply or raises HandlerFailure."""
        result = self.call_nowait(ctx, event, data)
        if type(result) is CoroutineType:
            return await result
        return result

    def call_nowait(self, ctx: Context, event: str, data: Any) -> Any:
        """``call`` without a coroutine for a sync handler (the driver's, every request).

        Returns the JSON-ready reply of a handler that did not wait, or, for one
        that returned an awaitable (an ``async def`` handler), a coroutine that
        gives it. Raises HandlerFailure, as ``call`` does.
        """
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
        timing = handler.timing
        timing.calls = calls = timing.calls + 1
        every = self.time_every
        started = None if calls % every != 1 % every else _clock()
        try:
            result = handler.func(ctx, payload) if handler.wants_data else handler.func(ctx)
        except Exception as exc:
            if started is not None:
                timing.observe(_clock() - started)
            raise self._failure(event, exc) from exc
        if type(result) in _PLAIN:  # the common case: no isawaitable, no BaseModel check
            if started is not None:
                timing.observe(_clock() - started)
            return result
        if inspect.isawaitable(result):
            return self._rest(result, event, started)  # timed there, until it returns
        if started is not None:
            timing.observe(_clock() - started)
        if isinstance(result, BaseModel):
            return result.model_dump(mode="json")
        return result

    async def _rest(self, awaitable: Awaitable[Any], event: str, started: float | None) -> Any:
        """An async handler's reply (``call_nowait``): awaited, and timed until it
        returns when ``started`` (the call is one of the sample) is given."""
        try:
            result = await awaitable
        except Exception as exc:
            raise self._failure(event, exc) from exc
        finally:
            if started is not None:
                self.timings[event].observe(_clock() - started)
        if isinstance(result, BaseModel):
            return result.model_dump(mode="json")
        return result

    def _failure(self, event: str, exc: Exception) -> HandlerFailure:
        """The error reply for a handler's exception; called in its ``except`` (logged)."""
        if isinstance(exc, RemoteError):
            return HandlerFailure(exc.code, exc.message, exc.details)
        log.exception("handler for %r in %r raised", event, self.path)
        return HandlerFailure(p.ErrorCode.HANDLER_ERROR, f"{type(exc).__name__}: {exc}")
