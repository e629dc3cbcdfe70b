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
    "ClientMessage",
    "ConnectionPhase",
    "classify_decode_error",
    "unsendable_answer",
]

log = logging.getLogger("server_ref")


ClientMessage = (
    p.EmitFrame
    | p.RequestFrame
    | p.JoinFrame
    | p.LeaveFrame
    | p.PublishFrame
    | p.PresenceFrame
    | p.PresenceStatsFrame
    | p.HistoryFrame
)
"""A client frame the hub carries out (with an id, answered; deduplicated, but for reads)."""


class ConnectionPhase(StrEnum):
    AWAITING_HELLO = "awaiting_hello"
    OPEN = "open"
    CLOSED = "closed"


def unsendable_answer(frame: ClientMessage, problem: str) -> str:
    """The answer to a message whose outcome JSON cannot carry (NaN or an infinity).

    For a ``publish``, the client's own data (a number like 1e999 parses as
    infinity): ``invalid_frame``. Otherwise the handler's reply or error
    details: ``handler_error``, logged as the app's bug it is.
    """
    if isinstance(frame, p.PublishFrame):
        return p.encode_error(p.ErrorCode.INVALID_FRAME, f"cannot deliver it: {problem}", frame.id)
    message = f"the handler's answer cannot be sent: {problem}"
    event = getattr(frame, "event", None)
    log.error("%s %s (%r in %r): %s", frame.type, frame.id, event, frame.ns, message)
    return p.encode_error(p.ErrorCode.HANDLER_ERROR, message, frame.id)


def classify_decode_error(text: str | bytes, exc: ValidationError) -> tuple[str, str, int | None]:
    """Turn a decode failure into (error code, message, message id if readable).

    The frame is read again here only to find its ``type`` and ``id``, with the
    decoder's own strict parser (no NaN or Infinity: those are ``bad_json``).
    """
    first = exc.errors()[0]
    kind = first["type"]
    if kind == "json_invalid":
        return p.ErrorCode.BAD_JSON, f"frame is not valid JSON: {first['msg']}", None
    top = not first["loc"]  # a field's own dict_type (``auth: true``) is invalid_frame
    if top and kind in ("dict_type", "model_attributes_type"):
        return p.ErrorCode.BAD_FRAME, "frame must be a JSON object", None
    if top and kind == "union_tag_not_found":
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
        "_to_send",
        "bad_frames",
        "beat",
        "close_code",
        "close_reason",
        "max_bad_frames",
        "phase",
    )

    def __init__(
        self,
        now: float,
        *,
        handshake_timeout: float = 10.0,
        max_bad_frames: int = 100,
        ping_spread: float = p.PING_SPREAD,
        random: Callable[[], float] = random.random,
    ) -> None:
        self.beat = p.Heartbeat(ping_always=False, spread=ping_spread, random=random)
        """Its deadlines (PROTOCOL §9), the same rules as the client's but for who pings."""
        self.beat.connected(now, handshake_timeout)
        self.max_bad_frames = max_bad_frames
        self.phase = ConnectionPhase.AWAITING_HELLO
        self.bad_frames = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self._to_send: list[str] = []

    def data_to_send(self) -> list[str]:
        """The frames to write, oldest first (an empty list is the core's own: keep it as is)."""
        out = self._to_send
        if out:
            self._to_send = []
        return out

    def send(self, text: str) -> None:
        self._to_send.append(text)

    def close(self, code: int, reason: str) -> None:
        """Mark the connection for closing (the first reason wins)."""
        if self.phase is not ConnectionPhase.CLOSED:
            self.phase = ConnectionPhase.CLOSED
            self.close_code = code
            self.close_reason = reason[:120]
            self.beat.stopped()

    def refuse(self, code: str, message: str, close_code: int, **extra: Any) -> None:
        """Send an error frame about the connection, then close it."""
        self._to_send.append(p.encode_error(code, message, **extra))
        self.close(close_code, message)

    def receive_text(self, text: str | bytes, now: float) -> p.HelloFrame | ClientMessage | None:
        """Parse one frame; return it if the driver must act on it (a hello or a message)."""
        if self.phase is ConnectionPhase.CLOSED:
            return None
        self.beat.heard(now)
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
        kind = type(frame)
        if kind is p.PingFrame:
            self._to_send.append(p.encode_pong(frame.ts))  # type: ignore[union-attr]
            return None
        if kind is p.PongFrame:
            return None
        if kind is p.HelloFrame:
            self._bad_frame(p.ErrorCode.ALREADY_HANDSHAKEN, "hello was already accepted", None)
            return None
        return frame  # type: ignore[return-value]  # a ClientMessage: the rest of ClientFrame

    def accept(self, welcome: p.WelcomeFrame, now: float) -> None:
        """The driver accepted the hello: send welcome and start heartbeats."""
        self.phase = ConnectionPhase.OPEN
        self._to_send.append(p.encode(welcome))
        timings = welcome.heartbeat  # the connection keeps what it announced
        self.beat.opened(timings.interval, timings.timeout, now, first_ping_from=now)

    def _bad_frame(self, code: str, message: str, message_id: int | None) -> None:
        self.bad_frames += 1
        self._to_send.append(p.encode_error(code, message, message_id))
        if self.bad_frames >= self.max_bad_frames:
            self.close(
                p.CloseCode.TOO_MANY_BAD_FRAMES, f"{self.bad_frames} bad frames on this connection"
            )

    def keepalive(self, now: float) -> None:
        """Count the peer as alive now (the driver is busy on its last frame)."""
        self.beat.heard(now)

    def get_timer(self) -> float | None:
        return self.beat.deadline()

    def handle_timer(self, now: float) -> None:
        due = self.beat.due(now)
        if due == "dead":
            if self.phase is ConnectionPhase.AWAITING_HELLO:
                self.close(p.CloseCode.HANDSHAKE_TIMEOUT, "no hello in time")
            else:
                silent = self.beat.silent_for(now)
                self.close(p.CloseCode.HEARTBEAT_TIMEOUT, f"silent for {silent:.1f}s")
        elif due == "ping":
            self._to_send.append(p.encode_ping(now))
