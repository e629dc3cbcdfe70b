"""The server's per-connection sans-I/O state: parsing, handshake, heartbeats.

``ConnectionCore`` does no I/O and reads no clock. The driver feeds it each
text frame with the time, and gets back the parsed frame to act on (or None
when the core has already answered, e.g. with an error frame). Frames to write
come from ``data_to_send()``; ``close_code`` is set when the connection must
end. Timers follow the ``get_timer()`` / ``handle_timer(now)`` pattern.

Rules:

1. The first frame must be ``hello``; anything else gets ``handshake_required``
   and the connection is closed. A second ``hello`` gets ``already_handshaken``.
2. A frame that cannot be parsed gets an error frame naming the problem, with
   the message id when one can be read, so the sender's request fails fast.
   The connection carries on until ``max_bad_frames`` such frames.
3. ``ping`` is answered here with ``pong``; every frame counts as life. The
   server pings a peer only after ``interval`` without a frame from it: a
   client that pings (as clients must) is not pinged back.
   Silence for ``interval + timeout`` closes with HEARTBEAT_TIMEOUT; no
   ``hello`` within ``handshake_timeout`` closes with HANDSHAKE_TIMEOUT.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from pydantic import ValidationError
from pydantic_core import from_json, to_json

from rtchat_sdk import protocol as p

__all__ = [
    "ConnectionCore",
    "ConnectionPhase",
    "classify_decode_error",
    "error_frame",
    "ping_frame",
    "pong_frame",
    "reply_frame",
    "unsendable_answer",
]

log = logging.getLogger("server_ref")


class ConnectionPhase(StrEnum):
    AWAITING_HELLO = "awaiting_hello"
    OPEN = "open"
    CLOSED = "closed"


# Encoders of the frames the server writes most. Each gives exactly the text
# ``p.encode(Model(...))`` gives (the same serializer: pydantic-core's, with the
# models' settings), without building and validating a model per frame: the
# fields are the models' own, in their order, and the values the server's own.
# tests/test_server_fast_paths.py holds them to that. Like ``p.encode``, they
# raise ``ValidationFailed`` for data holding NaN or an infinity.


def _dump(obj: dict[str, Any]) -> str:
    # by_alias=False and inf/nan as constants: what the payload frames' model_dump_json()
    # does, so that require_finite() sees a non-finite float instead of a null.
    return p.require_finite(to_json(obj, by_alias=False, inf_nan_mode="constants").decode())


def reply_frame(message_id: int, data: Any = None) -> str:
    """Encode ``ReplyFrame(id=message_id, data=data)``."""
    return _dump({"type": "reply", "id": message_id, "data": data})


def ping_frame(ts: float) -> str:
    """Encode ``PingFrame(ts=ts)``."""
    return _dump({"type": "ping", "ts": float(ts)})


def pong_frame(ts: float) -> str:
    """Encode ``PongFrame(ts=ts)``."""
    return _dump({"type": "pong", "ts": float(ts)})


def error_frame(
    code: str,
    message: str,
    message_id: int | None = None,
    *,
    details: Any = None,
    retry_after: float | None = None,
) -> str:
    """Encode one error frame: ``ErrorFrame(...)``."""
    if not (isinstance(code, str) and isinstance(message, str)):
        # Not what the model takes: let it say so, as it always did.
        return p.encode(
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


def unsendable_answer(
    frame: p.EmitFrame | p.RequestFrame | p.PublishFrame | p.JoinFrame | p.LeaveFrame, problem: str
) -> str:
    """The answer to a message whose outcome JSON cannot carry (NaN or an infinity).

    For a ``publish``, the client's own data (a number like 1e999 parses as
    infinity): ``invalid_frame``. Otherwise the handler's reply or error
    details: ``handler_error``, logged as the app's bug it is.
    """
    if isinstance(frame, p.PublishFrame):
        return error_frame(p.ErrorCode.INVALID_FRAME, f"cannot deliver it: {problem}", frame.id)
    message = f"the handler's answer cannot be sent: {problem}"
    event = getattr(frame, "event", None)
    log.error("%s %s (%r in %r): %s", frame.type, frame.id, event, frame.ns, message)
    return error_frame(p.ErrorCode.HANDLER_ERROR, message, frame.id)


def classify_decode_error(text: str | bytes, exc: ValidationError) -> tuple[str, str, int | None]:
    """Turn a decode failure into (error code, message, message id if readable).

    The frame is read again here only to find its ``type`` and ``id``, with the
    decoder's own strict parser (no NaN or Infinity: those are ``bad_json``).
    """
    first = exc.errors()[0]
    kind = first["type"]
    if kind == "json_invalid":
        return p.ErrorCode.BAD_JSON, f"frame is not valid JSON: {first['msg']}", None
    if kind in ("dict_type", "model_attributes_type"):
        return p.ErrorCode.BAD_FRAME, "frame must be a JSON object", None
    if kind == "union_tag_not_found":
        return p.ErrorCode.BAD_FRAME, "frame has no 'type' field", None
    raw: Any = None
    with contextlib.suppress(ValueError):
        raw = from_json(text, allow_inf_nan=False)
    if kind == "union_tag_invalid":
        frame_type = raw.get("type") if isinstance(raw, dict) else None
        if not isinstance(frame_type, str):
            shown = to_json(frame_type).decode()
            return p.ErrorCode.BAD_FRAME, f"frame 'type' must be a string, got {shown}", None
        allowed = ", ".join(sorted(p.CLIENT_FRAME_TYPES))
        return (
            p.ErrorCode.UNKNOWN_TYPE,
            f"unknown frame type {frame_type!r}; expected one of: {allowed}",
            None,
        )
    message_id = raw.get("id") if isinstance(raw, dict) else None
    if not isinstance(message_id, int) or isinstance(message_id, bool) or message_id < 1:
        message_id = None
    problems = "; ".join(
        f"{'.'.join(str(part) for part in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
        for e in exc.errors()
    )
    return p.ErrorCode.INVALID_FRAME, f"invalid frame: {problems}", message_id


class ConnectionCore:
    """Protocol state of one WebSocket connection on the server."""

    __slots__ = (
        "_dead_at",
        "_next_ping",
        "_ping_spread",
        "_random",
        "_to_send",
        "bad_frames",
        "close_code",
        "close_reason",
        "handshake_timeout",
        "heartbeat",
        "last_received",
        "max_bad_frames",
        "phase",
    )

    def __init__(
        self,
        now: float,
        *,
        heartbeat: p.HeartbeatInfo,
        handshake_timeout: float = 10.0,
        max_bad_frames: int = 100,
        ping_spread: float = p.PING_SPREAD,
        random: Callable[[], float] = random.random,
    ) -> None:
        self.heartbeat = heartbeat
        self._ping_spread = ping_spread
        self._random = random
        self.handshake_timeout = handshake_timeout
        self.max_bad_frames = max_bad_frames
        self.phase = ConnectionPhase.AWAITING_HELLO
        self.bad_frames = 0
        self.last_received = now
        self.close_code: int | None = None
        self.close_reason = ""
        self._to_send: list[str] = []
        self._next_ping: float | None = None
        self._dead_at: float | None = now + handshake_timeout

    def data_to_send(self) -> list[str]:
        out, self._to_send = self._to_send, []
        return out

    def send(self, text: str) -> None:
        self._to_send.append(text)

    def close(self, code: int, reason: str) -> None:
        """Mark the connection for closing (the first reason wins)."""
        if self.phase is not ConnectionPhase.CLOSED:
            self.phase = ConnectionPhase.CLOSED
            self.close_code = code
            self.close_reason = reason[:120]
            self._next_ping = None
            self._dead_at = None

    def refuse(self, code: str, message: str, close_code: int, **extra: Any) -> None:
        """Send an error frame about the connection, then close it."""
        self._to_send.append(error_frame(code, message, **extra))
        self.close(close_code, message)

    def receive_text(self, text: str | bytes, now: float) -> p.ClientFrame | None:
        """Parse one frame; return it if the driver must act on it."""
        if self.phase is ConnectionPhase.CLOSED:
            return None
        self.last_received = now
        if self.phase is ConnectionPhase.OPEN:
            self._dead_at = now + self.heartbeat.interval + self.heartbeat.timeout
        try:
            frame = p.decode_client_frame(text)
        except ValidationError as exc:
            code, message, message_id = classify_decode_error(text, exc)
            self._bad_frame(code, message, message_id)
            return None
        if self.phase is ConnectionPhase.AWAITING_HELLO:
            if not isinstance(frame, p.HelloFrame):
                self.refuse(
                    p.ErrorCode.HANDSHAKE_REQUIRED,
                    f"the first frame must be 'hello', got {frame.type!r}",
                    p.CloseCode.POLICY_VIOLATION,
                )
                return None
            if frame.protocol not in p.SUPPORTED_VERSIONS:
                self.refuse(
                    p.ErrorCode.UNSUPPORTED_PROTOCOL,
                    f"protocol version {frame.protocol} is not supported; "
                    f"this server speaks {list(p.SUPPORTED_VERSIONS)}",
                    p.CloseCode.UNSUPPORTED_PROTOCOL,
                    details={"supported": list(p.SUPPORTED_VERSIONS)},
                )
                return None
            return frame
        if isinstance(frame, p.PingFrame):
            self._to_send.append(pong_frame(frame.ts))
            return None
        if isinstance(frame, p.PongFrame):
            return None
        if isinstance(frame, p.HelloFrame):
            self._bad_frame(p.ErrorCode.ALREADY_HANDSHAKEN, "hello was already accepted", None)
            return None
        return frame

    def accept(self, welcome: p.WelcomeFrame, now: float) -> None:
        """The driver accepted the hello: send welcome and start heartbeats."""
        self.phase = ConnectionPhase.OPEN
        self._to_send.append(p.encode(welcome))
        self._next_ping = now + self._ping_delay()
        self._dead_at = now + self.heartbeat.interval + self.heartbeat.timeout

    def _ping_delay(self) -> float:
        """At most one interval, spread at random so pings of many connections fall apart."""
        return p.ping_delay(self.heartbeat.interval, self._random(), self._ping_spread)

    def _bad_frame(self, code: str, message: str, message_id: int | None) -> None:
        self.bad_frames += 1
        self._to_send.append(error_frame(code, message, message_id))
        if self.bad_frames >= self.max_bad_frames:
            self.close(
                p.CloseCode.TOO_MANY_BAD_FRAMES, f"{self.bad_frames} bad frames on this connection"
            )

    def keepalive(self, now: float) -> None:
        """Count the peer as alive now (the driver is busy on its last frame)."""
        self.last_received = now
        if self.phase is ConnectionPhase.OPEN:
            self._dead_at = now + self.heartbeat.interval + self.heartbeat.timeout

    def get_timer(self) -> float | None:
        times = [t for t in (self._next_ping, self._dead_at) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self._dead_at is not None and now >= self._dead_at:
            if self.phase is ConnectionPhase.AWAITING_HELLO:
                self.close(p.CloseCode.HANDSHAKE_TIMEOUT, "no hello in time")
            else:
                silent = now - self.last_received
                self.close(p.CloseCode.HEARTBEAT_TIMEOUT, f"silent for {silent:.1f}s")
            return
        if self._next_ping is not None and now >= self._next_ping:
            if now - self.last_received < self.heartbeat.interval:
                # Heard from the peer within an interval (its own pings, at least):
                # the link works both ways, and a ping would only double the work.
                self._next_ping = self.last_received + self.heartbeat.interval
            else:
                self._to_send.append(ping_frame(now))
                self._next_ping = now + self._ping_delay()
