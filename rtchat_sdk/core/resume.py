"""What a reconnecting client presents: the ``hello.resume`` of PROTOCOL §10.4."""

from __future__ import annotations

from collections.abc import Mapping

from .. import protocol as p
from ..outbox import HandledPosition

__all__ = ["resume_info"]


def resume_info(
    token: str, session_id: str | None, last_reply: int, streams: Mapping[str, HandledPosition]
) -> tuple[p.ResumeInfo, list[str]]:
    """The resume info, and the room streams left out of it past ``MAX_RESUME_STREAMS``.

    Rooms come first: past the cap a stream cannot be resumed, and a room
    left out is reported (``not_rejoined``) while a lost inbox position is not.
    """
    ordered = sorted(streams.items(), key=lambda item: item[1].room is None)
    listed, unlisted = ordered[: p.MAX_RESUME_STREAMS], ordered[p.MAX_RESUME_STREAMS :]
    info = p.ResumeInfo(
        token=token,
        session=session_id,
        last_reply=last_reply,
        streams=[
            p.StreamPosition(
                stream=name,
                epoch=s.epoch,
                offset=s.offset,
                ns=s.ns if s.room is not None else None,
                room=s.room,
            )
            for name, s in listed
        ],
    )
    return info, [name for name, s in unlisted if s.room is not None]
