"""Replay: what a resuming client missed on each of its session's streams.

``replay`` is an operation step (a generator: it yields broker calls and
receives their results) that writes, per stream, a gap frame when history no
longer reaches back (or the epoch changed) and then the entries after the
client's position, by the echo rule. It returns what it covered per stream;
``release_held`` then writes the live entries held back meanwhile, skipping
those the replay already covered, so no live entry overtakes a replayed one
and none is sent twice.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from rtchat_sdk import protocol as p

from ..broker.base import Replay
from .commands import BrokerCall
from .sessions import Covered, Session, release_held, wants

__all__ = ["Covered", "gap_frame", "release_held", "replay"]


def gap_frame(stream: str, ns: str, room: str | None, epoch: str, offset: int, reason: str) -> str:
    return p.encode(
        p.GapFrame(stream=stream, ns=ns, room=room, epoch=epoch, offset=offset, reason=reason)
    )


def replay(
    session: Session, resume: p.ResumeInfo, out: Callable[[str], None]
) -> Generator[BrokerCall, Any, Covered]:
    """Write what each of the session's streams holds past the client's position."""
    covered: Covered = {}
    given = {s.stream: s for s in resume.streams}
    wanted: dict[str, tuple[str, str | None, str, int]] = {
        p.room_stream(ns, room): (ns, room, epoch, offset)
        for (ns, room), (epoch, offset) in session.record.rooms.items()
    }
    wanted[session.inbox] = (p.DEFAULT_NAMESPACE, None, "", 0)
    for stream, (ns, room, epoch, offset) in wanted.items():
        position = given.get(stream)
        if position is not None:
            epoch, offset = position.epoch, position.offset
        elif not epoch:
            epoch, offset = (yield BrokerCall("position", (stream,)))[0], 0
        found: Replay = yield BrokerCall("read_since", (stream, epoch, offset))
        if found.gap is not None:
            out(gap_frame(stream, ns, room, found.epoch, found.gap_offset, found.gap))
        for entry in found.entries:
            if wants(session, entry):
                out(entry.text)
        covered[stream] = (found.epoch, found.offset)
    return covered
