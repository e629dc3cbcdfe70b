"""Test helpers: build server frames and drive a ClientSession by hand."""

from __future__ import annotations

import json
from typing import Any

from rtchat_sdk import protocol as p
from rtchat_sdk.session import ClientSession, SessionEvent


def welcome(
    *,
    session: str = "s1",
    token: str = "tok",
    resumed: bool = False,
    interval: float = 20.0,
    timeout: float = 10.0,
    max_in_flight: int = 1000,
) -> str:
    return p.encode(
        p.WelcomeFrame(
            protocol=1,
            session=session,
            token=token,
            resumed=resumed,
            heartbeat=p.HeartbeatInfo(interval=interval, timeout=timeout),
            limits=p.Limits(
                max_frame_bytes=1 << 20,
                max_in_flight=max_in_flight,
                history_size=1000,
                history_seconds=300,
                session_ttl=300,
            ),
            inbox=p.StreamPosition(stream=f"inbox:{session}", epoch="e0", offset=0),
        )
    )


def reply(message_id: int, data: Any = None) -> str:
    return p.encode(p.ReplyFrame(id=message_id, data=data))


def message(stream: str, offset: int, data: Any = None, *, epoch: str = "e1") -> str:
    return p.encode(
        p.MessageFrame(stream=stream, epoch=epoch, offset=offset, room="r", event="ev", data=data)
    )


def frames(session: ClientSession) -> list[dict[str, Any]]:
    """What the session wants written, parsed."""
    return [json.loads(text) for text in session.data_to_send()]


def events(session: ClientSession) -> list[SessionEvent]:
    return session.events_received()


def open_session(session: ClientSession, now: float = 0.0, **kw: Any) -> None:
    """Connect, answer the hello with a welcome, and clear the outputs."""
    session.connection_made(now)
    session.receive_text(welcome(**kw), now)
    session.data_to_send()
    session.events_received()
