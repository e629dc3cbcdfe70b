"""The rtchat wire protocol's frames: every frame as a pydantic model.

``PROTOCOL.md`` is the contract; these models are the Python form of its
frame tables, shared by client and server, and ``json_schema()`` generates the
machine-readable form from them (tests hold models, schema and document
together). A frame is one JSON object in one WebSocket text message; its
``type`` field picks the model.

Rules that hold for every frame:

* Unknown fields are ignored, so a newer peer may add optional fields without
  bumping the protocol version.
* Client message ids (``id``) are positive integers, strictly increasing per
  client session; the server replies to each exactly once, with the same id.
* Deliveries carry ``stream``, ``epoch`` and ``offset`` and nothing specific to
  the recipient, so one encoded frame serves every member of a room.
* Only standard JSON travels (``codec.py`` enforces it both ways).
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

__all__ = [
    "CLIENT_FRAME_TYPES",
    "DEFAULT_NAMESPACE",
    "MAX_HISTORY_LIMIT",
    "MAX_RESUME_STREAMS",
    "RESERVED_EVENT_PREFIX",
    "PING_SPREAD",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "ClientFrame",
    "CloseCode",
    "EmitFrame",
    "ErrorCode",
    "ErrorFrame",
    "FrameValidationError",
    "GapFrame",
    "HeartbeatInfo",
    "HelloFrame",
    "HistoryFrame",
    "JoinFrame",
    "LeaveFrame",
    "Limits",
    "MessageFrame",
    "PingFrame",
    "PongFrame",
    "PresenceFrame",
    "PresenceStatsFrame",
    "PublishFrame",
    "ReplyFrame",
    "RequestFrame",
    "ResumeInfo",
    "ServerFrame",
    "Since",
    "StreamPosition",
    "WelcomeFrame",
    "client_frame_adapter",
    "inbox_stream",
    "json_schema",
    "ping_delay",
    "room_stream",
    "server_batch_adapter",
    "server_frame_adapter",
]

PROTOCOL_VERSION = 1
"""The version this module speaks."""

SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
"""Every version a peer built from this module accepts."""

DEFAULT_NAMESPACE = "/"

PING_SPREAD = 0.1
"""Each heartbeat ping is sent ``interval * (1 - PING_SPREAD * U[0, 1))`` after the last one.

Pings come at most ``interval`` apart, as the protocol promises, but at
random points of the last tenth of it: connections opened in a burst (a
reconnect storm, a pause on the server) do not keep pinging in step, which
would stall a server with thousands of them at the same instant each interval.
"""


def ping_delay(interval: float, draw: float, spread: float = PING_SPREAD) -> float:
    """Seconds from one ping to the next, given a uniform ``draw`` in [0, 1)."""
    return interval * (1.0 - spread * draw)


_T = TypeVar("_T")

MAX_RESUME_STREAMS = 10_000
"""At most this many stream positions travel in one ``hello.resume``."""

MAX_HISTORY_LIMIT = 10_000
"""At most this many entries asked for in one ``history`` frame."""

RESERVED_EVENT_PREFIX = "$"
"""Event names starting with this are the server's own (``$join``, ``$leave``): a client
may not publish them."""

MessageId = Annotated[int, Field(ge=1, description="Client message id, >= 1, increasing.")]
NamespacePath = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^/[^\s]*$",
        description="Namespace path, starting with '/'.",
    ),
]
RoomName = Annotated[str, Field(min_length=1, max_length=256, description="Room name.")]
EventName = Annotated[str, Field(min_length=1, max_length=256, description="Event name.")]


class ErrorCode(StrEnum):
    """Machine-readable reasons carried by ``error`` frames."""

    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FRAME = "invalid_frame"
    HANDSHAKE_REQUIRED = "handshake_required"
    ALREADY_HANDSHAKEN = "already_handshaken"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    UNAUTHORIZED = "unauthorized"
    UNKNOWN_NAMESPACE = "unknown_namespace"
    UNKNOWN_EVENT = "unknown_event"
    INVALID_PAYLOAD = "invalid_payload"
    HANDLER_ERROR = "handler_error"
    FORBIDDEN = "forbidden"
    NOT_IN_ROOM = "not_in_room"
    NOT_ENABLED = "not_enabled"
    DUPLICATE_ID = "duplicate_id"
    TOO_LARGE = "too_large"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_ROOMS = "too_many_rooms"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


class CloseCode(IntEnum):
    """WebSocket close codes used by rtchat (4xxx are rtchat's own)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    INVALID_DATA = 1007  # by the WebSocket library: a text message that is not UTF-8
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4001
    UNSUPPORTED_PROTOCOL = 4002
    HANDSHAKE_TIMEOUT = 4003
    HEARTBEAT_TIMEOUT = 4004
    SLOW_CONSUMER = 4005
    SESSION_REPLACED = 4006
    TOO_MANY_BAD_FRAMES = 4007
    TOKEN_EXPIRED = 4008
    RATE_LIMITED = 4009


def _require_type(schema: dict[str, Any]) -> None:
    """Frames must carry ``type`` on the wire even though the models default it."""
    if "type" in schema.get("properties", {}):
        required = schema.setdefault("required", [])
        if "type" not in required:
            required.insert(0, "type")


class _Frame(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, json_schema_extra=_require_type)


class _PayloadFrame(_Frame):
    """Carries app data: NaN in it is written ``NaN``, not null, for ``encode`` to refuse."""

    model_config = ConfigDict(ser_json_inf_nan="constants")


# --------------------------------------------------------------------------
# Shared pieces


class StreamPosition(_Frame):
    """Where a client is in one stream: the last offset it handled."""

    stream: str = Field(min_length=1, max_length=512)
    epoch: str = Field(min_length=1, max_length=64)
    offset: int = Field(ge=0)
    ns: str | None = Field(
        default=None, description="For a room stream in `hello.resume`: the room's namespace."
    )
    room: str | None = Field(
        default=None, description="For a room stream in `hello.resume`: the room to rejoin."
    )


class Since(_Frame):
    """A position in a stream the frame names otherwise: where a read or a join starts."""

    epoch: str = Field(min_length=1, max_length=64)
    offset: int = Field(ge=0, description="Entries after this offset (0: from the first).")


class ResumeInfo(_Frame):
    """What a reconnecting client presents to pick up its old session."""

    token: str = Field(min_length=1, max_length=256, description="Secret from `welcome.token`.")
    session: str | None = Field(
        default=None,
        max_length=64,
        description="The session id the token belonged to; if the server has lost the "
        "session, it still leaves out this client's own earlier publishes when replaying.",
    )
    last_reply: int = Field(
        default=0,
        ge=0,
        description="Every message id up to this one is answered or abandoned: the oldest "
        "unanswered id minus one. The server may forget replies up to it.",
    )
    streams: list[StreamPosition] = Field(
        default_factory=list,
        max_length=MAX_RESUME_STREAMS,
        description="Positions in followed streams: room streams with `ns` and `room`, "
        "and the inbox.",
        json_schema_extra={"default": []},
    )


class HeartbeatInfo(_Frame):
    """Heartbeat timing both sides follow, in seconds."""

    interval: float = Field(gt=0)
    timeout: float = Field(gt=0)


class Limits(_Frame):
    """Limits the server enforces, announced so clients can respect them."""

    max_frame_bytes: int
    max_in_flight: int
    history_size: int
    history_seconds: float
    session_ttl: float
    poll_max_frames: int = Field(
        default=100, ge=1, description="Frames per long-poll answer and per POST, at most."
    )
    poll_timeout: float = Field(
        default=25.0, gt=0, description="Seconds a long poll is held when there is nothing to send."
    )


# --------------------------------------------------------------------------
# Frames either side may send


class PingFrame(_Frame):
    """Application heartbeat; the peer answers with ``pong`` carrying ``ts``."""

    type: Literal["ping"] = "ping"
    ts: float = Field(
        allow_inf_nan=False, description="Sender's clock, echoed back to measure round trips."
    )


class PongFrame(_Frame):
    """Answer to ``ping``."""

    type: Literal["pong"] = "pong"
    ts: float = Field(allow_inf_nan=False)


# --------------------------------------------------------------------------
# Client -> server


class HelloFrame(_Frame):
    """First frame of a connection: version, credentials, optional resume."""

    type: Literal["hello"] = "hello"
    protocol: int = Field(description="Protocol version the client speaks.")
    auth: dict[str, Any] | None = Field(default=None, description="Credentials, app-defined.")
    resume: ResumeInfo | None = None
    client: str | None = Field(default=None, max_length=128, description="Client name/version.")
    batch: bool = Field(
        default=False,
        description="The client accepts batches: a message holding a JSON array of server frames.",
    )


class EmitFrame(_PayloadFrame):
    """Send an event to a server handler; answered by an empty ``reply``."""

    type: Literal["emit"] = "emit"
    id: MessageId
    ns: NamespacePath = DEFAULT_NAMESPACE
    event: EventName
    data: Any = None


class RequestFrame(_PayloadFrame):
    """Call a server handler; answered by a ``reply`` with its return value."""

    type: Literal["request"] = "request"
    id: MessageId
    ns: NamespacePath = DEFAULT_NAMESPACE
    event: EventName
    data: Any = None


class JoinFrame(_Frame):
    """Join a room; the reply holds the room stream's current position."""

    type: Literal["join"] = "join"
    id: MessageId
    ns: NamespacePath = DEFAULT_NAMESPACE
    room: RoomName
    since: Since | None = Field(
        default=None,
        description="Deliver the entries after this position first, as a resume does (a "
        "`gap` frame when they are no longer held): join where a `history` answer ended.",
    )


class LeaveFrame(_Frame):
    """Leave a room."""

    type: Literal["leave"] = "leave"
    id: MessageId
    ns: NamespacePath = DEFAULT_NAMESPACE
    room: RoomName


class PublishFrame(_PayloadFrame):
    """Publish an event to every member of a room (the sender only if ``echo``)."""

    type: Literal["publish"] = "publish"
    id: MessageId
    ns: NamespacePath = DEFAULT_NAMESPACE
    room: RoomName
    event: EventName
    data: Any = None
    echo: bool = False


class PresenceFrame(_Frame):
    """Ask who is in a room (a namespace with presence on); the reply lists the members."""

    type: Literal["presence"] = "presence"
    id: MessageId
    ns: NamespacePath = DEFAULT_NAMESPACE
    room: RoomName


class PresenceStatsFrame(_Frame):
    """Ask how many sessions and distinct users are in a room."""

    type: Literal["presence_stats"] = "presence_stats"
    id: MessageId
    ns: NamespacePath = DEFAULT_NAMESPACE
    room: RoomName


class HistoryFrame(_Frame):
    """Read a room stream's kept entries; the reply holds them and the stream's position."""

    type: Literal["history"] = "history"
    id: MessageId
    ns: NamespacePath = DEFAULT_NAMESPACE
    room: RoomName
    since: Since | None = Field(
        default=None,
        description="Forward: the entries after this position; reverse: those before it. "
        "Null: from the oldest kept (forward) or the newest (reverse).",
    )
    limit: int = Field(default=100, ge=1, le=MAX_HISTORY_LIMIT, description="Entries, at most.")
    reverse: bool = Field(default=False, description="Newest first.")


# --------------------------------------------------------------------------
# Server -> client


class WelcomeFrame(_Frame):
    """Handshake accepted: the session, its resume token and the rules."""

    type: Literal["welcome"] = "welcome"
    protocol: int
    session: str = Field(description="Public session id (as seen in `message.sender`).")
    token: str = Field(description="Secret resume token; present it in `hello.resume`.")
    resumed: bool = False
    heartbeat: HeartbeatInfo
    limits: Limits
    inbox: StreamPosition | None = Field(
        default=None, description="The session's inbox stream (direct messages) and its position."
    )
    server: str = "rtchat"


class ReplyFrame(_PayloadFrame):
    """Success answer to the client message with the same ``id``."""

    type: Literal["reply"] = "reply"
    id: int
    data: Any = None


class ErrorFrame(_PayloadFrame):
    """Failure: answers message ``id``, or the connection when ``id`` is null."""

    type: Literal["error"] = "error"
    id: int | None = None
    code: str
    message: str
    details: Any = None
    retry_after: float | None = Field(
        default=None, description="Seconds to wait before reconnecting, when closing."
    )


class MessageFrame(_PayloadFrame):
    """A delivery: one event at one offset of one stream."""

    type: Literal["message"] = "message"
    stream: str
    epoch: str
    offset: int = Field(ge=1)
    ns: str = DEFAULT_NAMESPACE
    room: str | None = Field(default=None, description="Room, or null for a direct message.")
    event: str
    data: Any = None
    sender: str | None = Field(default=None, description="Sender's session id, null if server.")


class GapFrame(_Frame):
    """Loud loss: the server cannot replay part of a stream for this client."""

    type: Literal["gap"] = "gap"
    stream: str
    ns: str = DEFAULT_NAMESPACE
    room: str | None = None
    epoch: str = Field(
        description="The stream's current epoch; the client's position continues in it. "
        "For 'not_rejoined': the epoch the client presented."
    )
    offset: int = Field(
        ge=0,
        description="The position the client now stands at: entries up to it are lost to it, "
        "deliveries continue from offset + 1. For 'not_rejoined': the position the client "
        "presented (nothing follows).",
    )
    reason: str = Field(
        description="'trimmed', 'epoch_changed' or 'not_rejoined'. ('session_unknown' is "
        "never sent: a client reports it itself when `welcome.resumed` is false.)"
    )


ClientFrame = Annotated[
    HelloFrame
    | EmitFrame
    | RequestFrame
    | JoinFrame
    | LeaveFrame
    | PublishFrame
    | PresenceFrame
    | PresenceStatsFrame
    | HistoryFrame
    | PingFrame
    | PongFrame,
    Field(discriminator="type"),
]
ServerFrame = Annotated[
    WelcomeFrame | ReplyFrame | ErrorFrame | MessageFrame | GapFrame | PingFrame | PongFrame,
    Field(discriminator="type"),
]

CLIENT_FRAME_TYPES = frozenset(
    {
        "hello",
        "emit",
        "request",
        "join",
        "leave",
        "publish",
        "presence",
        "presence_stats",
        "history",
        "ping",
        "pong",
    }
)

client_frame_adapter: TypeAdapter[ClientFrame] = TypeAdapter(ClientFrame)
server_frame_adapter: TypeAdapter[ServerFrame] = TypeAdapter(ServerFrame)
server_batch_adapter: TypeAdapter[list[ServerFrame]] = TypeAdapter(list[ServerFrame])


def room_stream(ns: str, room: str) -> str:
    """The stream name of a room: ``room:<ns>:<room>``."""
    return f"room:{ns}:{room}"


def inbox_stream(session: str) -> str:
    """The stream name of a session's inbox (direct messages)."""
    return f"inbox:{session}"


def json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of every frame, by direction."""
    client = client_frame_adapter.json_schema(ref_template="#/$defs/{model}")
    server = server_frame_adapter.json_schema(ref_template="#/$defs/{model}")
    defs: dict[str, Any] = {**client.pop("$defs", {}), **server.pop("$defs", {})}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"rtchat wire protocol v{PROTOCOL_VERSION}",
        "$defs": {
            **defs,
            "ClientFrame": client,
            "ServerFrame": server,
            "ServerBatch": {
                "description": "Several server frames in one message, for a client whose "
                "`hello` set `batch`; handled in order.",
                "type": "array",
                "items": {"$ref": "#/$defs/ServerFrame"},
            },
        },
        # anyOf, not oneOf: ping and pong belong to both directions.
        "anyOf": [{"$ref": "#/$defs/ClientFrame"}, {"$ref": "#/$defs/ServerFrame"}],
    }


# Re-exported so callers can catch decode failures without importing pydantic.
FrameValidationError = ValidationError
