"""Frames to text and back: strict decoding, encoding, batches, sizes.

Only standard JSON travels: the decoders refuse ``NaN``, ``Infinity`` and
``-Infinity`` (which pydantic's parser would accept), and ``encode`` refuses a
payload holding a non-finite float (which pydantic would write as null) with
``ValidationFailed`` naming the field. Sizes are UTF-8 bytes, as sent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import from_json

from ..errors import ValidationFailed
from .frames import (
    ServerFrame,
    client_frame_adapter,
    server_batch_adapter,
    server_frame_adapter,
)

__all__ = [
    "PLAIN_JSON_TYPES",
    "decode_client_frame",
    "decode_server_frame",
    "decode_server_message",
    "encode",
    "encode_batch",
    "jsonable",
    "non_finite",
    "require_finite",
    "wire_size",
]

_T = TypeVar("_T")


def _may_hold_constants(text: str | bytes) -> bool:
    """Whether JSON text may hold ``NaN`` or ``[-]Infinity``: two cheap scans, usually.

    Callers on hot paths test ``"N" in text or "I" in text`` inline first: most
    frames have neither letter, and a call costs more than the scans.
    """
    if isinstance(text, str):
        return ("N" in text or "I" in text) and ("NaN" in text or "Infinity" in text)
    return b"NaN" in text or b"Infinity" in text


def _standard_json(text: str | bytes) -> None:
    """Refuse what pydantic's parser takes but JSON lacks: NaN, Infinity, -Infinity.

    Called on text that parsed, so a strict parse can fail only on those.
    Raises the ``json_invalid`` error pydantic raises for any other bad JSON.
    """
    if not _may_hold_constants(text):
        return
    try:
        from_json(text, allow_inf_nan=False)
    except ValueError as exc:
        error = f"NaN, Infinity and -Infinity are not JSON ({exc})"
        raise ValidationError.from_exception_data(
            "frame", [{"type": "json_invalid", "loc": (), "input": text, "ctx": {"error": error}}]
        ) from None


def _decoder(adapter: TypeAdapter[_T], name: str, doc: str) -> Callable[[str | bytes], _T]:
    """``adapter.validate_json`` refusing NaN and Infinity first; a closure, for speed."""
    validate = adapter.validator.validate_json  # the same call, without TypeAdapter's wrapper

    def decode(text: str | bytes) -> _T:
        try:
            value: _T = validate(text)
        except ValidationError as exc:
            if exc.errors(include_url=False)[0]["type"] != "json_invalid":
                _standard_json(text)  # it parsed: NaN there is the first thing wrong with it
            raise
        if not isinstance(text, str) or "N" in text or "I" in text:
            _standard_json(text)
        return value

    decode.__name__ = decode.__qualname__ = name
    decode.__doc__ = doc
    return decode


decode_client_frame = _decoder(
    client_frame_adapter,
    "decode_client_frame",
    "Parse one client frame; raises pydantic ``ValidationError`` if it is not one.",
)
decode_server_frame = _decoder(
    server_frame_adapter,
    "decode_server_frame",
    "Parse one server frame; raises pydantic ``ValidationError`` if it is not one.",
)
_decode_server_batch = _decoder(
    server_batch_adapter, "_decode_server_batch", "Parse a batch of server frames."
)


def decode_server_message(text: str | bytes) -> list[ServerFrame]:
    """Parse one WebSocket message from the server: one frame, or a batch of them.

    A batch is a JSON array of frames, sent only to a client whose ``hello``
    set ``batch``; one array costs one decode instead of one per frame.
    Raises pydantic ``ValidationError`` if it is neither.
    """
    first = text.lstrip()[:1]
    if first == ("[" if isinstance(text, str) else b"["):
        return _decode_server_batch(text)
    return [decode_server_frame(text)]


def encode_batch(frames: list[bytes]) -> bytes:
    """Join encoded frames into one batch message (a JSON array)."""
    return b"[" + b",".join(frames) + b"]"


PLAIN_JSON_TYPES = frozenset({dict, list, str, int, float, bool, type(None)})
"""The types of parsed JSON: never a model, never awaitable, so a type test in this
set skips the ``isinstance`` checks against ABCs (slow: pydantic's metaclass is one)."""


def jsonable(data: Any) -> Any:
    """App data as it travels: a pydantic model (an Event) as its JSON form, else as given."""
    if type(data) in PLAIN_JSON_TYPES:  # the common case, without the (slow) ABC check below
        return data
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json")
    return data


def wire_size(text: str) -> int:
    """Bytes the text takes on the wire (UTF-8), which is what size limits count."""
    return len(text) if text.isascii() else len(text.encode())


def _non_finite_at(value: Any, path: str) -> str | None:
    """The first NaN or infinity in a parsed JSON value, depth first: ``"<path> is NaN"``."""
    if isinstance(value, float) and not math.isfinite(value):
        literal = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
        return f"{path or 'the value'} is {literal}"
    children: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        children = [(f"{path}.{key}" if path else key, v) for key, v in value.items()]
    elif isinstance(value, list):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    return next((found for at, v in children if (found := _non_finite_at(v, at))), None)


def non_finite(text: str | bytes, root: str = "") -> str | None:
    """Where JSON text holds NaN or [-]Infinity (``"data.x[2] is NaN: ..."``), else None.

    For text written with pydantic-core's ``inf_nan_mode="constants"``, so that a
    non-finite float shows instead of turning into null. ``root`` names the
    value the text encodes (``"data"`` for a payload alone; empty for a frame).
    """
    if not _may_hold_constants(text):
        return None
    try:
        from_json(text, allow_inf_nan=False)
    except ValueError:
        where = _non_finite_at(from_json(text), root) or f"{root or 'the value'} holds one"
        return f"{where}: JSON has no NaN or Infinity"
    return None  # the letters were inside strings


def require_finite(text: str) -> str:
    """``text`` itself, unless it holds NaN or Infinity: then ``ValidationFailed`` says where."""
    if ("N" in text or "I" in text) and (problem := non_finite(text)) is not None:
        raise ValidationFailed(problem)
    return text


def encode(frame: BaseModel) -> str:
    """Serialise a frame to its wire text.

    Raises ``ValidationFailed`` if its data holds a non-finite float, which
    JSON cannot carry (pydantic would write null: a silent change).
    """
    return require_finite(frame.model_dump_json())
