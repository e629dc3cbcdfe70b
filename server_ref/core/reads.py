"""The read frames: ``presence``, ``presence_stats`` and ``history`` (PROTOCOL §7.5, §7.6).

A read changes nothing, so its answer is not remembered for dedupe (a
history page can be a megabyte): a resend runs it again. A member of the
room may read it; anyone else may when the namespace's join check would
let it join. ``read`` is an operation step (it yields calls and returns the
encoded answer); ``history_reply`` builds the page's reply from the
entries' stored frames by concatenation, cut to fit ``max_frame_bytes``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from pydantic_core import to_json

from rtchat_sdk import protocol as p

from ..broker.base import Page
from ..errors import HandlerFailure
from .authz import JOIN, Guarded, forbidden
from .commands import Authorize, BrokerCall, Call
from .sessions import Session

__all__ = ["ReadFrame", "history_reply", "read"]

ReadFrame = p.PresenceFrame | p.PresenceStatsFrame | p.HistoryFrame


def read(
    space: Guarded, session: Session, frame: ReadFrame, max_frame_bytes: int
) -> Generator[Call, Any, str]:
    """Carry out one read; returns its encoded answer (raises ``HandlerFailure``)."""
    ns, room = frame.ns, frame.room
    if isinstance(frame, (p.PresenceFrame, p.PresenceStatsFrame)) and not space.presence:
        raise HandlerFailure(
            p.ErrorCode.NOT_ENABLED, f"namespace {ns!r} keeps no presence (PROTOCOL §7.5)"
        )
    if (ns, room) not in session.record.rooms and JOIN in space.guards:
        user, claims = session.record.user, session.claims
        if not (yield Authorize(ns, JOIN, session.id, user, claims, room, None)):
            raise forbidden(f"read room {room!r}")
    stream = p.room_stream(ns, room)
    if isinstance(frame, p.PresenceFrame):
        members: list[p.PresenceMember] = yield BrokerCall("presence", (stream,))
        data = {"stream": stream, "members": [m.model_dump() for m in members]}
        return p.encode_reply(frame.id, data)
    if isinstance(frame, p.PresenceStatsFrame):
        sessions, users = yield BrokerCall("presence_stats", (stream,))
        return p.encode_reply(frame.id, {"stream": stream, "sessions": sessions, "users": users})
    since = None if frame.since is None else (frame.since.epoch, frame.since.offset)
    page: Page = yield BrokerCall("history", (stream, since, frame.limit, frame.reverse))
    return history_reply(frame.id, stream, page, max_frame_bytes)


def history_reply(message_id: int, stream: str, page: Page, max_frame_bytes: int) -> str:
    """The reply holding as much of ``page`` as fits in ``max_frame_bytes``.

    The entries' delivery frames are spliced in as stored (no re-encoding);
    a page cut short says ``more``. If not even its first entry fits, the
    answer is ``too_large`` naming that entry's offset, so a reader can step
    past it.
    """
    gap = "null" if page.gap is None else to_json(page.gap).decode()
    head = (
        f'{{"type":"reply","id":{message_id},"data":{{"stream":{to_json(stream).decode()},'
        f'"epoch":{to_json(page.epoch).decode()},"offset":{page.offset},"gap":{gap},'
    )
    room = max_frame_bytes - p.wire_size(head) - len('"more":false,"entries":[]}}')
    taken: list[str] = []
    for entry in page.entries:
        cost = p.wire_size(entry.text) + (1 if taken else 0)
        if cost > room:
            break
        room -= cost
        taken.append(entry.text)
    if page.entries and not taken:
        first = page.entries[0]
        return p.encode_error(
            p.ErrorCode.TOO_LARGE,
            f"entry {first.offset} does not fit in one reply of {max_frame_bytes} bytes",
            message_id,
            details={"offset": first.offset},
        )
    more = page.more or len(taken) < len(page.entries)
    return f'{head}"more":{"true" if more else "false"},"entries":[{",".join(taken)}]}}}}'
