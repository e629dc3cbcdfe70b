"""Steps of the hub's operations that need no hub state: identify, restore rooms, process.

Each is a generator in the hub's operation style (yields calls, receives
their results, returns its own) and takes what it needs as arguments, so
``hub.py`` keeps the state and the ordering and these keep the rules of the
handshake and of carrying out one client message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any

from rtchat_sdk import protocol as p
from rtchat_sdk.errors import ValidationFailed

from ..broker.base import LATER, Draft, SessionRecord
from ..errors import BrokerUnavailable, CredentialsRefused, FrameTooLarge, HandlerFailure
from .authz import CALL, JOIN, PUBLISH, Namespaces, forbidden
from .commands import Authenticate, Authorize, BrokerCall, Call, Handle, Identity
from .connection import ClientMessage, ConnectionCore, unsendable_answer
from .reads import read
from .sessions import Session

__all__ = [
    "Namespaces",
    "answer",
    "duplicate_answer",
    "identify",
    "restore_rooms",
    "unavailable_answer",
]

log = logging.getLogger("server_ref")

Step = Generator[Call, Any, Any]


def identify(
    core: ConnectionCore, hello: p.HelloFrame, authenticates: bool, bearer: str | None = None
) -> Generator[Call, Any, Identity]:
    """Who a hello speaks for; refuses the connection (4001) when nobody.

    ``bearer``: the token of the connection's ``Authorization: Bearer`` header,
    given to the authenticator as ``auth.token`` when the hello carries none.
    """
    auth = hello.auth
    if not authenticates:
        user = (auth or {}).get("user")
        return Identity(user if isinstance(user, str) else None)
    if bearer is not None and (auth is None or "token" not in auth):
        auth = {**(auth or {}), "token": bearer}
    try:
        result = yield Authenticate(auth)
    except CredentialsRefused as exc:
        result, reason = None, f"credentials were refused: {exc}"
    except Exception as exc:  # an authenticator bug must not kill the server
        log.exception("authenticate raised")
        result = None
        reason = f"authentication failed: {type(exc).__name__}"
    else:
        reason = "credentials were refused"
    if isinstance(result, Identity):
        return result
    if isinstance(result, str):
        return Identity(result)
    core.refuse(p.ErrorCode.UNAUTHORIZED, reason, p.CloseCode.UNAUTHORIZED)
    return Identity(None)


def restore_rooms(
    record: SessionRecord, resume: p.ResumeInfo, namespaces: Namespaces, claims: dict[str, Any]
) -> Generator[Call, Any, list[p.StreamPosition]]:
    """Put a new session in the rooms a client followed under its lost session.

    Each room is checked like a join (with the new hello's claims); returns
    the positions refused.
    """
    refused: list[p.StreamPosition] = []
    for position in resume.streams:
        ns, room = position.ns, position.room
        if room is None or ns is None:
            continue
        space = namespaces.get(ns)
        allowed = space is not None and position.stream == p.room_stream(ns, room)
        if allowed and space is not None and JOIN in space.guards:
            try:
                allowed = yield Authorize(ns, JOIN, record.id, record.user, claims, room, None)
            except Exception:  # a join check that raises refuses the join
                log.exception("join check for %r in %r raised", room, ns)
                allowed = False
        if not allowed:
            refused.append(position)
            continue
        record.rooms[(ns, room)] = (position.epoch, position.offset)
    return refused


def duplicate_answer(message_id: int, stored: str | None) -> str:
    """The answer to a message processed before: its stored reply, or ``duplicate_id``."""
    if stored is not None:
        return stored
    return p.encode_error(
        p.ErrorCode.DUPLICATE_ID,
        f"message {message_id} was already processed and its reply is no longer held",
        message_id,
    )


def unavailable_answer(session: Session, frame: ClientMessage, why: str, retry: float) -> str:
    """Not processed; the client resends it after ``retry`` seconds.

    Until it does, the session's later messages get the same answer, so that
    they are processed after it, in id order.
    """
    if session.refusing is None or frame.id < session.refusing:
        session.refusing = frame.id
    return p.encode_error(
        p.ErrorCode.UNAVAILABLE, f"not processed: {why}; resend it", frame.id, retry_after=retry
    )


def answer(
    namespaces: Namespaces,
    max_frame_bytes: int,
    retry_after: float,
    appends_remembered: bool,
    answer_now: Callable[[str, tuple[Any, ...]], Any] | None,
    join: Callable[[Session, str, str, p.Since | None], Generator[Call, Any, tuple[str, int]]],
    leave: Callable[[Session, str, str], Step],
    session: Session,
    frame: ClientMessage,
) -> Generator[Call, Any, str]:
    """Dedupe, carry out and remember one client message; returns its answer.

    The node's rules come first, so the hub binds them once (``partial``)
    and makes each message's operation from the last two.

    The answer is the encoded reply or error frame; a message processed
    before gets its stored reply again and is not carried out twice. With
    ``appends_remembered`` (``Broker.keeps_append_keys``) a publish's reply is
    not stored: a resend gets its entry back from the append key instead.
    (One generator, no nested ones: it runs for every message. Frames are told
    apart by ``type``: isinstance on a pydantic model class costs ten times more.)
    """
    if session.refusing is not None:
        if frame.id > session.refusing:
            why = f"message {session.refusing} is to be resent first"
            return unavailable_answer(session, frame, why, retry_after)
        if frame.id == session.refusing:
            session.refusing = None  # resent: this one and those after it go ahead
    if session.highest is None or frame.id <= session.highest:
        # Not newer than everything it processed here: ask the dedupe records.
        try:
            processed, stored = yield BrokerCall("recall_reply", (session.id, frame.id))
        except BrokerUnavailable as exc:
            return unavailable_answer(
                session, frame, f"the broker is unavailable ({exc})", retry_after
            )
        if processed:
            return duplicate_answer(frame.id, stored)
    user, claims = session.record.user, session.claims
    space = namespaces.get(frame.ns)
    try:
        if space is None:
            reply = p.encode_error(
                p.ErrorCode.UNKNOWN_NAMESPACE, f"no namespace {frame.ns!r} on this server", frame.id
            )
        elif frame.type == "request" or frame.type == "emit":
            event = frame.event
            if CALL in space.guards and not (
                yield Authorize(frame.ns, CALL, session.id, user, claims, None, event)
            ):
                raise forbidden(f"call {event!r}")
            data = yield Handle(frame.ns, session.id, user, event, frame.data, claims)
            is_request = frame.type == "request"
            reply = p.encode_reply(frame.id, data) if is_request else p.encode_reply(frame.id)
        elif frame.type == "join":
            if JOIN in space.guards and not (
                yield Authorize(frame.ns, JOIN, session.id, user, claims, frame.room, None)
            ):
                raise forbidden(f"join {frame.room!r}")
            epoch, offset = yield from join(session, frame.ns, frame.room, frame.since)
            stream = p.room_stream(frame.ns, frame.room)
            reply = p.encode_reply(frame.id, {"stream": stream, "epoch": epoch, "offset": offset})
        elif frame.type == "leave":
            yield from leave(session, frame.ns, frame.room)
            reply = p.encode_reply(frame.id)
        elif frame.type != "publish":  # a read: not remembered
            return (yield from read(space, session, frame, max_frame_bytes))
        else:
            if (frame.ns, frame.room) not in session.record.rooms:
                raise HandlerFailure(
                    p.ErrorCode.NOT_IN_ROOM, f"join room {frame.room!r} before publishing to it"
                )
            if frame.event.startswith(p.RESERVED_EVENT_PREFIX):
                raise forbidden(f"publish {frame.event!r}: '$' names are the server's")
            if PUBLISH in space.guards and not (
                yield Authorize(
                    frame.ns, PUBLISH, session.id, user, claims, frame.room, frame.event
                )
            ):
                raise forbidden(f"publish {frame.event!r} to {frame.room!r}")
            stream = p.room_stream(frame.ns, frame.room)
            draft = Draft.message(
                stream,
                ns=frame.ns,
                room=frame.room,
                event=frame.event,
                data=p.jsonable(frame.data),
                sender=session.id,
                echo=frame.echo,
                max_bytes=max_frame_bytes,
            )
            # Keyed by sender and message id: a resend on another node gets this entry back.
            entry = yield BrokerCall("append", (stream, draft, f"{session.id}:{frame.id}"))
            position = {"stream": stream, "epoch": entry.epoch, "offset": entry.offset}
            reply = p.encode_reply(frame.id, position)
            if appends_remembered:
                return reply  # (session.highest stays: the records do not hold this id)
    except HandlerFailure as exc:
        try:
            reply = p.encode_error(exc.code, exc.message, frame.id, details=exc.details)
        except ValidationFailed as bad:
            reply = unsendable_answer(frame, f"its error details: {bad}")
    except FrameTooLarge as exc:
        reply = p.encode_error(p.ErrorCode.TOO_LARGE, str(exc), frame.id)
    except BrokerUnavailable as exc:  # not processed (or, for a publish, safe to resend)
        why = f"the broker is unavailable ({exc})"
        return unavailable_answer(session, frame, why, retry_after)
    except ValidationFailed as exc:  # NaN or an infinity, from the encoders
        reply = unsendable_answer(frame, str(exc))
    except Exception as exc:  # never let one message kill the connection
        log.exception("processing %s %s failed", frame.type, frame.id)
        reply = p.encode_error(p.ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", frame.id)
    try:
        args = (session.id, frame.id, reply)  # at once if the broker can (Broker.answer_now)
        if answer_now is None or answer_now("remember_reply", args) is LATER:
            yield BrokerCall("remember_reply", args)
    except BrokerUnavailable:  # processed: the client gets its answer, unremembered
        log.warning("message %s of %s processed, its reply not remembered", frame.id, session.id)
        session.highest = None  # the records miss it now: ask them for every message
        return reply
    if session.highest is not None and frame.id > session.highest:
        session.highest = frame.id
    return reply
