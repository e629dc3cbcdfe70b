"""The messaging API bound to one namespace: ``NamespaceClient``.

``Client`` (``client.py``) is the namespace ``/`` and hands out the others
(``client.namespace("/chat")``); each call here becomes one operation of the
client's core (``ClientSession``) and waits for its answer through
``Client._send``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

from pydantic import BaseModel

from .. import protocol as p
from ..events import Event, MemberJoined, MemberLeft, event_name, validate_payload

if TYPE_CHECKING:
    from .client import Client

__all__ = ["NamespaceClient"]

T = TypeVar("T", bound=BaseModel)
H = TypeVar("H", bound=Callable[..., Any])


class NamespaceClient:
    """The messaging API bound to one namespace of a client's connection."""

    def __init__(self, client: Client, path: str) -> None:
        if not path.startswith("/"):
            raise ValueError(f"namespace must start with '/': {path!r}")
        self._client = client
        self.path = path

    async def join(self, room: str, *, since: p.Since | None = None) -> None:
        """Join ``room``; deliveries start after the position returned by the server.

        ``since`` (a ``History.position``): start after that position instead,
        so that nothing published since a ``history`` call is missed or
        repeated; entries no longer kept are reported as a gap (``on_gap``).
        """
        c = self._client
        await c._send(lambda now: c._session.join(self.path, room, now=now, since=since))

    async def presence(self, room: str, *, timeout: float | None = None) -> list[p.PresenceMember]:
        """Who is in ``room`` now, oldest member first (the namespace must keep presence:
        else ``NotEnabled``)."""
        data = await self._read("presence", room, timeout)
        return p.Presence.model_validate(data).members

    async def presence_stats(self, room: str, *, timeout: float | None = None) -> p.PresenceStats:
        """How many sessions, and distinct users, are in ``room``."""
        return p.PresenceStats.model_validate(await self._read("presence_stats", room, timeout))

    async def history(
        self,
        room: str,
        *,
        since: p.Since | None = None,
        limit: int = 100,
        reverse: bool = False,
        timeout: float | None = None,
    ) -> p.History:
        """A page of what ``room``'s stream keeps (PROTOCOL §7.6), and its position.

        Forward: the entries after ``since`` (None: from the oldest kept);
        ``reverse``: those before it, newest first (None: from the newest).
        ``History.gap`` says 'trimmed' when entries asked for are gone, and
        ``more`` that the page was cut by ``limit`` or the frame size. Then
        ``join(room, since=page.position)`` continues live from where it read.
        """
        if not 1 <= limit <= p.MAX_HISTORY_LIMIT:
            raise ValueError(f"limit must be from 1 to {p.MAX_HISTORY_LIMIT}, got {limit}")
        fields = {"since": since, "limit": limit, "reverse": reverse}
        return p.History.model_validate(await self._read("history", room, timeout, fields))

    async def _read(
        self, kind: str, room: str, timeout: float | None, fields: dict[str, Any] | None = None
    ) -> Any:
        c = self._client
        wait = c.request_timeout if timeout is None else timeout
        return await c._send(
            lambda now: c._session.read(
                kind, self.path, room, now=now, timeout=wait, **fields or {}
            )
        )

    async def leave(self, room: str) -> None:
        c = self._client
        await c._send(lambda now: c._session.leave(self.path, room, now=now))

    async def publish(
        self,
        room: str,
        event: str | Event,
        data: Any = None,
        *,
        echo: bool = False,
        expires_in: float | None = None,
    ) -> int:
        """Publish to a room; returns the stream offset once the server has it."""
        c = self._client
        name, payload = _event_and_data(event, data)
        reply = await c._send(
            lambda now: c._session.publish(
                self.path, room, name, payload, now=now, echo=echo, expires_in=expires_in
            )
        )
        return int(reply["offset"]) if isinstance(reply, dict) else 0

    async def emit(
        self, event: str | Event, data: Any = None, *, expires_in: float | None = None
    ) -> None:
        """Send to a server handler and wait until the server acknowledges it."""
        c = self._client
        name, payload = _event_and_data(event, data)
        await c._send(
            lambda now: c._session.emit(self.path, name, payload, now=now, expires_in=expires_in)
        )

    @overload
    async def request(
        self,
        event: str | Event,
        data: Any = None,
        *,
        response: type[T],
        timeout: float | None = None,
    ) -> T: ...

    @overload
    async def request(
        self,
        event: str | Event,
        data: Any = None,
        *,
        response: None = None,
        timeout: float | None = None,
    ) -> Any: ...

    async def request(
        self,
        event: str | Event,
        data: Any = None,
        *,
        response: type[T] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Call a server handler and return its reply (validated into ``response``).

        ``timeout`` defaults to the client's ``request_timeout``; when it runs
        out, ``AckTimeout`` is raised and the request is never sent later.
        """
        c = self._client
        name, payload = _event_and_data(event, data)
        wait = c.request_timeout if timeout is None else timeout
        reply = await c._send(
            lambda now: c._session.request(self.path, name, payload, now=now, timeout=wait)
        )
        if response is None:
            return reply
        return validate_payload(response, reply)

    def on(self, event: str | type[Event]) -> Callable[[H], H]:
        """Decorator: call the handler for each delivery of ``event`` ("*": all)."""

        def register(func: H) -> H:
            self._client._handlers.add(self.path, event, func)
            return func

        return register

    def off(self, event: str | type[Event], func: Callable[..., Any]) -> None:
        self._client._handlers.remove(self.path, event, func)

    def on_join(self, func: H) -> H:
        """Decorator: call ``func(member, meta)`` (a ``MemberJoined``) when a session joins
        a room this client is in (a namespace with presence events on)."""
        return self.on(MemberJoined)(func)

    def on_leave(self, func: H) -> H:
        """Decorator: call ``func(member, meta)`` (a ``MemberLeft``, with ``reason``) when a
        session leaves a room this client is in."""
        return self.on(MemberLeft)(func)


def _event_and_data(event: str | Event, data: Any) -> tuple[str, Any]:
    if isinstance(event, Event):
        if data is not None:
            raise TypeError("pass either an Event instance or an event name with data, not both")
        return event.event_name, event
    return event_name(event), data
