"""Encoders of the hot frames that build no pydantic model, byte-identical to ``encode``.

Both sides use them: the client for the messages it sends (``encode_message``)
and its pings and pongs, the server for deliveries (``delivery_parts``),
replies, errors, pings and pongs.

Every frame the app sends has a fixed shape: an envelope (type, ns, event,
room, echo) around an id and a payload. Building and validating a pydantic
model per message costs more than the rest of sending it, so the envelope of
each (kind, ns, event, room, echo) is validated once, by the model, and kept
as text; later messages with it only serialise their payload, with the same
pydantic-core serializer the model's ``data: Any`` field uses. The envelope
is kept only if it reproduces, byte for byte, the model's own encoding of the
message that validated it; any surprise (an id below 1, a name that is a str
subclass, a payload that fails to serialise) takes the model's way, which
gives the same text or raises the same error as before. A non-finite float
in a payload is refused either way (``ValidationFailed`` naming its path):
the serializer writes it as a constant, never as null.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from ..errors import ValidationFailed
from . import codec
from . import frames as p

__all__ = [
    "delivery_parts",
    "encode_error",
    "encode_message",
    "encode_ping",
    "encode_pong",
    "encode_reply",
]

_MODELS: dict[str, type[BaseModel]] = {
    "emit": p.EmitFrame,
    "request": p.RequestFrame,
    "publish": p.PublishFrame,
    "join": p.JoinFrame,
    "leave": p.LeaveFrame,
    "presence": p.PresenceFrame,
    "presence_stats": p.PresenceStatsFrame,
    "history": p.HistoryFrame,
}
_WITH_DATA = frozenset({"emit", "request", "publish"})
_to_json = TypeAdapter(Any, config=ConfigDict(ser_json_inf_nan="constants")).serializer.to_json
"""The serializer of a payload frame's ``data: Any`` field, and of any JSON value."""


def _quoted(value: str | None) -> str:
    """A name as JSON: a quoted string, or null."""
    return _to_json(value).decode()


_ENVELOPES: dict[tuple[str, str, str | None, str | None, bool], tuple[str, str, str]] = {}
_MAX_ENVELOPES = 1024


def encode_message(
    kind: str,
    message_id: int,
    ns: str,
    event: str | None,
    room: str | None,
    data: Any,
    echo: bool,
    extra: dict[str, Any] | None = None,
) -> str:
    """The wire text of an app message, exactly as ``protocol.encode(Frame(...))`` gives it.

    ``extra``: further fields of the frame (a join's ``since``, a read's
    ``limit``...), which take the model's way.

    Raises ``ValidationFailed`` for an invalid frame (a bad namespace, an
    empty event name...) or a payload that cannot be serialised, or holds NaN
    or an infinity.
    """
    if extra:  # a join's since, a read's fields: the model's way, no envelope kept
        return _encode_with_model(kind, message_id, ns, event, room, data, echo, extra)
    key = (kind, ns, event, room, echo)
    envelope = _ENVELOPES.get(key) if message_id >= 1 and _plain(key) else None
    if envelope is not None:
        head, middle, tail = envelope
        try:
            body = _to_json(codec.jsonable(data)).decode() if kind in _WITH_DATA else ""
        except Exception:
            pass  # the model's way below raises the error it always raised
        else:
            if ("N" in body or "I" in body) and (problem := codec.non_finite(body, "data")):
                raise ValidationFailed(f"cannot encode {kind}: {problem}")
            return f"{head}{message_id}{middle}{body}{tail}"
    text = _encode_with_model(kind, message_id, ns, event, room, data, echo)
    if message_id >= 1 and _plain(key):
        _learn_envelope(key, message_id, data, text)
    return text


def _encode_with_model(
    kind: str,
    message_id: int,
    ns: str,
    event: str | None,
    room: str | None,
    data: Any,
    echo: bool,
    extra: dict[str, Any] | None = None,
) -> str:
    fields: dict[str, Any] = {"id": message_id, "ns": ns, **(extra or {})}
    if kind in _WITH_DATA:
        fields["event"] = event
        fields["data"] = data
    if kind not in _WITH_DATA or kind == "publish":
        fields["room"] = room
    if kind == "publish":
        fields["echo"] = echo
    try:
        if "data" in fields:
            fields["data"] = codec.jsonable(data)
        return codec.encode(_MODELS[kind](**fields))
    except (ValidationError, PydanticSerializationError, ValidationFailed) as exc:
        raise ValidationFailed(f"cannot encode {kind}: {exc}") from exc


def _plain(key: tuple[str, str, str | None, str | None, bool]) -> bool:
    _, ns, event, room, echo = key
    return (
        type(ns) is str
        and (event is None or type(event) is str)
        and (room is None or type(room) is str)
        and type(echo) is bool
    )


def _learn_envelope(
    key: tuple[str, str, str | None, str | None, bool], message_id: int, data: Any, text: str
) -> None:
    kind, ns, event, room, echo = key

    head = f'{{"type":"{kind}","id":'
    if kind == "publish":
        middle = f',"ns":{_quoted(ns)},"room":{_quoted(room)},"event":{_quoted(event)},"data":'
        tail = ',"echo":true}' if echo else ',"echo":false}'
    elif kind in _WITH_DATA:
        middle = f',"ns":{_quoted(ns)},"event":{_quoted(event)},"data":'
        tail = "}"
    else:  # join (with no since), leave and the reads
        since = ',"since":null' if kind == "join" else ""
        middle = f',"ns":{_quoted(ns)},"room":{_quoted(room)}{since}}}'
        tail = ""
    try:
        body = _to_json(codec.jsonable(data)).decode() if kind in _WITH_DATA else ""
    except Exception:
        return
    if f"{head}{message_id}{middle}{body}{tail}" != text:
        return  # not the model's encoding: keep using the model for this envelope
    if len(_ENVELOPES) >= _MAX_ENVELOPES:
        _ENVELOPES.clear()
    _ENVELOPES[key] = (head, middle, tail)


# The frames of fixed shape. Each gives exactly the text ``encode(Model(...))``
# gives (the same serializer, with the models' settings), without building and
# validating a model: the fields are the models' own, in their order.
# tests/test_server_fast_paths.py holds them to that. Like ``encode``, they
# raise ``ValidationFailed`` for data holding NaN or an infinity.


def _dump(obj: dict[str, Any]) -> str:
    # Non-finite floats as constants, so that require_finite() sees them instead of a null.
    return codec.require_finite(_to_json(obj).decode())


def encode_reply(message_id: int, data: Any = None) -> str:
    """``encode(ReplyFrame(id=message_id, data=data))``."""
    return _dump({"type": "reply", "id": message_id, "data": data})


def encode_ping(ts: float) -> str:
    """``encode(PingFrame(ts=ts))``."""
    return _dump({"type": "ping", "ts": float(ts)})


def encode_pong(ts: float) -> str:
    """``encode(PongFrame(ts=ts))``."""
    return _dump({"type": "pong", "ts": float(ts)})


def encode_error(
    code: str,
    message: str,
    message_id: int | None = None,
    *,
    details: Any = None,
    retry_after: float | None = None,
) -> str:
    """``encode(ErrorFrame(...))``."""
    if not (isinstance(code, str) and isinstance(message, str)):
        # Not what the model takes: let it say so, as it always did.
        return codec.encode(
            p.ErrorFrame(
                id=message_id, code=code, message=message, details=details, retry_after=retry_after
            )
        )
    return _dump(
        {
            "type": "error",
            "id": message_id,
            "code": code,
            "message": message,
            "details": details,
            "retry_after": None if retry_after is None else float(retry_after),
        }
    )


# Deliveries: ``encode(MessageFrame(...))`` split around its epoch and offset,
# which only the broker knows (it numbers the entry). The envelope of each
# (stream, ns, room, event) is validated once by the model and kept if it
# reproduces the model's text byte for byte, as for ``encode_message``.

_EPOCH_MARK = "\x00epoch"
_SPLIT = ',"epoch":"\\u0000epoch","offset":1,'
"""How the model writes epoch ``_EPOCH_MARK`` at offset 1: where a delivery is split."""

_DELIVERIES: dict[tuple[str, str, str | None, str], tuple[str, str]] = {}


def delivery_parts(
    stream: str, ns: str, room: str | None, event: str, data: Any, sender: str | None
) -> tuple[str, str]:
    """``(head, tail)`` of the delivery frame of a JSON-ready payload.

    The frame at (epoch, offset) is ``f'{head},"epoch":{json(epoch)},"offset":{offset},{tail}'``,
    exactly as ``encode(MessageFrame(...))`` writes it. Raises as the model
    does: ``ValidationFailed`` for NaN or an infinity, pydantic's
    ``ValidationError`` for an invalid name.
    """
    key = (stream, ns, room, event)
    plain = sender is None or type(sender) is str
    envelope = _DELIVERIES.get(key) if plain else None
    if envelope is not None:
        head, middle = envelope
        try:
            body = _to_json(data).decode()
        except Exception:
            body = None  # the model's way below raises the error it always raised
        if body is not None and not (("N" in body or "I" in body) and codec.non_finite(body)):
            return head, f'{middle}{body},"sender":{_to_json(sender).decode()}}}'
    text = codec.encode(
        p.MessageFrame(
            stream=stream,
            epoch=_EPOCH_MARK,
            offset=1,
            ns=ns,
            room=room,
            event=event,
            data=data,
            sender=sender,
        )
    )
    head, split, tail = text.partition(_SPLIT)
    assert split, "MessageFrame's fields are type, stream, epoch, offset, then the rest"
    if plain and type(stream) is str and type(ns) is str and type(event) is str:
        _learn_delivery(key, data, sender, head, tail)
    return head, tail


def _learn_delivery(
    key: tuple[str, str, str | None, str], data: Any, sender: str | None, head: str, tail: str
) -> None:
    stream, ns, room, event = key
    if room is not None and type(room) is not str:
        return

    my_head = f'{{"type":"message","stream":{_quoted(stream)}'
    middle = f'"ns":{_quoted(ns)},"room":{_quoted(room)},"event":{_quoted(event)},"data":'
    try:
        body = _to_json(data).decode()
    except Exception:
        return
    if (my_head, f'{middle}{body},"sender":{_quoted(sender)}}}') != (head, tail):
        return  # not the model's encoding: keep using the model for this envelope
    if len(_DELIVERIES) >= _MAX_ENVELOPES:
        _DELIVERIES.clear()
    _DELIVERIES[key] = (my_head, middle)
