"""The app's calls on the client core: each becomes one frame through ``_queue``.

``AppCalls`` is the part of ``ClientSession`` (``session.py``) that names
them: the messages of PROTOCOL §4.2 with their fields. ``_queue`` (the
session's) gives the id, encodes, checks the size and puts the frame in the
outbox and the in-flight window.
"""

from __future__ import annotations

from typing import Any

from .. import protocol as p
from ..outbox import HandledPosition
from .events import Dropped

__all__ = ["AppCalls"]


class AppCalls:
    """emit, request, publish, join, leave and the reads, as ``ClientSession`` offers them."""

    streams: dict[str, HandledPosition]
    _tracked_early: dict[int, str]

    def _queue(
        self,
        kind: str,
        ns: str,
        event: str | None,
        room: str | None,
        data: Any,
        echo: bool,
        now: float,
        expires_in: float | None,
        extra: dict[str, Any] | None = None,
    ) -> tuple[int, list[Dropped]]:
        raise NotImplementedError  # ClientSession's

    def emit(
        self, ns: str, event: str, data: Any, *, now: float, expires_in: float | None = None
    ) -> tuple[int, list[Dropped]]:
        return self._queue("emit", ns, event, None, data, False, now, expires_in)

    def request(
        self, ns: str, event: str, data: Any, *, now: float, timeout: float | None = None
    ) -> tuple[int, list[Dropped]]:
        return self._queue("request", ns, event, None, data, False, now, timeout)

    def publish(
        self,
        ns: str,
        room: str,
        event: str,
        data: Any,
        *,
        now: float,
        echo: bool = False,
        expires_in: float | None = None,
    ) -> tuple[int, list[Dropped]]:
        return self._queue("publish", ns, event, room, data, echo, now, expires_in)

    def join(
        self, ns: str, room: str, *, now: float, since: p.Since | None = None
    ) -> tuple[int, list[Dropped]]:
        """``since``: track the room stream from there, so the entries the server
        writes after it are delivered and those up to it are duplicates (§7.6)."""
        extra = None if since is None else {"since": since}
        message_id, dropped = self._queue("join", ns, None, room, None, False, now, None, extra)
        stream = p.room_stream(ns, room)
        if since is not None and stream not in self.streams:
            self.streams[stream] = HandledPosition(since.epoch, since.offset, ns, room)
            self._tracked_early[message_id] = stream
        return message_id, dropped

    def read(
        self, kind: str, ns: str, room: str, *, now: float, timeout: float | None, **fields: Any
    ) -> tuple[int, list[Dropped]]:
        """A ``presence``, ``presence_stats`` or ``history`` frame (its reply is the answer)."""
        return self._queue(kind, ns, None, room, None, False, now, timeout, fields)

    def leave(self, ns: str, room: str, *, now: float) -> tuple[int, list[Dropped]]:
        return self._queue("leave", ns, None, room, None, False, now, None)
