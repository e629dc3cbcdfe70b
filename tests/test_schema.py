"""The generated JSON Schema: committed copy in sync, valid, and agreeing with the models.

``docs/protocol.schema.json`` is what implementers in other languages read, so
it must equal what ``rtchat_sdk.schema`` generates from ``protocol.py`` today,
and it must accept exactly the frames the decoders accept, as judged by the
``jsonschema`` package (a dev dependency).
"""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel, ValidationError

from rtchat_sdk import protocol as p
from rtchat_sdk import schema

DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"


# --------------------------------------------------------------------------
# Helpers


def _union_models(union: Any) -> list[type[BaseModel]]:
    """The frame models of an ``Annotated[A | B | ..., Field(discriminator=...)]``."""
    inner = typing.get_args(union)[0]
    return list(typing.get_args(inner))


def _frame_type(model: type[BaseModel]) -> str:
    value = model.model_fields["type"].default
    assert isinstance(value, str)
    return value


CLIENT_MODELS = _union_models(p.ClientFrame)
SERVER_MODELS = _union_models(p.ServerFrame)
SERVER_FRAME_TYPES = frozenset(_frame_type(m) for m in SERVER_MODELS)


def _direction_schema(full: dict[str, Any], name: str) -> dict[str, Any]:
    """A standalone schema for one direction (``ClientFrame`` or ``ServerFrame``)."""
    return {"$schema": full["$schema"], "$defs": full["$defs"], "$ref": f"#/$defs/{name}"}


def _is_valid(instance: Any, schema_doc: dict[str, Any]) -> bool:
    return bool(jsonschema.Draft202012Validator(schema_doc).is_valid(instance))


def _all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        for value in node.values():
            found.extend(_all_refs(value))
        return found
    if isinstance(node, list):
        return [ref for item in node for ref in _all_refs(item)]
    return []


def _type_consts(full: dict[str, Any]) -> set[str]:
    consts = set()
    for definition in full["$defs"].values():
        type_prop = definition.get("properties", {}).get("type", {})
        if "const" in type_prop:
            consts.add(type_prop["const"])
    return consts


# --------------------------------------------------------------------------
# Sample frames: one instance of every model, fields filled in


HEARTBEAT = p.HeartbeatInfo(interval=20.0, timeout=10.0)
LIMITS = p.Limits(
    max_frame_bytes=1_048_576,
    max_in_flight=1_000,
    history_size=1_000,
    history_seconds=300.0,
    session_ttl=300.0,
)

CLIENT_SAMPLES: list[p.ClientFrame] = [
    p.HelloFrame(protocol=1),
    p.HelloFrame(
        protocol=1,
        auth={"token": "secret", "user": "ada"},
        resume=p.ResumeInfo(
            token="tok",
            last_reply=41,
            streams=[p.StreamPosition(stream="room:/:lobby", epoch="9f2c", offset=17)],
        ),
        client="rtchat-python/0.1.0",
    ),
    p.EmitFrame(id=1, event="typing", data={"on": True}),
    p.RequestFrame(id=2, ns="/chat", event="echo", data=[1, "two", None, 3.5]),
    p.JoinFrame(id=3, room="lobby"),
    p.JoinFrame(id=6, room="lobby", since=p.Since(epoch="9f2c", offset=17)),
    p.LeaveFrame(id=4, ns="/chat", room="lobby"),
    p.PresenceFrame(id=7, room="lobby"),
    p.PresenceStatsFrame(id=8, ns="/chat", room="lobby"),
    p.HistoryFrame(id=9, room="lobby", since=p.Since(epoch="9f2c", offset=3), limit=50),
    p.HistoryFrame(id=10, room="lobby", reverse=True),
    p.PublishFrame(id=5, room="lobby", event="chat.message", data={"text": "hi"}, echo=True),
    p.PingFrame(ts=12.5),
    p.PongFrame(ts=12.5),
]

SERVER_SAMPLES: list[p.ServerFrame] = [
    p.WelcomeFrame(
        protocol=1,
        session="a1b2c3d4e5f60718",
        token="tok",
        resumed=True,
        heartbeat=HEARTBEAT,
        limits=LIMITS,
        inbox=p.StreamPosition(stream="inbox:a1b2c3d4e5f60718", epoch="77aa", offset=0),
    ),
    p.ReplyFrame(id=1),
    p.ReplyFrame(id=3, data={"stream": "room:/:lobby", "epoch": "9f2c", "offset": 17}),
    p.ErrorFrame(id=2, code="unknown_event", message="no handler"),
    p.ErrorFrame(code="shutting_down", message="bye", retry_after=1.0),
    p.ErrorFrame(code="unsupported_protocol", message="no", details={"supported": [1]}),
    p.MessageFrame(
        stream="room:/:lobby",
        epoch="9f2c",
        offset=18,
        room="lobby",
        event="chat.message",
        data={"text": "hi"},
        sender="a1b2c3d4e5f60718",
    ),
    p.MessageFrame(stream="inbox:a1b2c3d4e5f60718", epoch="77aa", offset=1, event="dm"),
    p.GapFrame(stream="room:/:lobby", room="lobby", epoch="9f2c", offset=40, reason="trimmed"),
    p.PingFrame(ts=99.0),
    p.PongFrame(ts=99.0),
]

# Frames that both the decoder and the schema must reject, per direction.
BAD_CLIENT_FRAMES: list[Any] = [
    {"type": "emit", "id": 0, "event": "x"},  # ids start at 1
    {"type": "emit", "id": -3, "event": "x"},
    {"type": "emit", "id": 1},  # no event
    {"type": "emit", "id": 1, "event": ""},
    {"type": "request", "event": "x"},  # no id
    {"type": "request", "id": 1, "event": "x", "ns": "chat"},  # ns must start with '/'
    {"type": "request", "id": 1, "event": "x", "ns": "/a b"},
    {"type": "join", "id": 1, "room": ""},
    {"type": "leave", "id": 1},
    {"type": "publish", "id": 1, "room": "r"},  # no event
    {"type": "hello"},  # no protocol
    {"type": "hello", "protocol": "one"},
    {"type": "hello", "protocol": 1, "resume": {"last_reply": 1}},  # resume without token
    {"type": "hello", "protocol": 1, "resume": {"token": "t", "last_reply": -1}},
    {"type": "ping"},
    {"type": "pong", "ts": "soon"},
    {"type": "subscribe", "id": 1},  # unknown type
    {"type": "welcome", "protocol": 1},  # a server frame
    [],
    "hello",
]
BAD_SERVER_FRAMES: list[Any] = [
    {"type": "reply"},  # no id
    {"type": "error", "id": 1, "message": "no code"},
    {"type": "error", "code": "x"},  # no message
    {"type": "message", "stream": "s", "epoch": "e", "offset": 0, "event": "x"},  # offset >= 1
    {"type": "message", "stream": "s", "epoch": "e", "offset": 1},  # no event
    {"type": "gap", "stream": "s", "epoch": "e", "offset": -1, "reason": "trimmed"},
    {"type": "welcome", "protocol": 1, "session": "s", "token": "t"},  # no heartbeat/limits
    {
        "type": "welcome",
        "protocol": 1,
        "session": "s",
        "token": "t",
        "heartbeat": {"interval": 0, "timeout": 10},
        "limits": LIMITS.model_dump(),
    },
    {"type": "emit", "id": 1, "event": "x"},  # a client frame
    {"type": "ping"},
]


def _sample_id(frame: Any) -> str:
    if isinstance(frame, BaseModel):
        return str(getattr(frame, "type", type(frame).__name__))
    return json.dumps(frame)[:60]


# --------------------------------------------------------------------------
# The committed file


@pytest.mark.timeout(30)
def test_committed_schema_matches_the_models() -> None:
    path = schema.SCHEMA_PATH
    committed = path.read_text(encoding="utf-8") if path.exists() else ""
    assert committed == schema.schema_text(), (
        f"{schema.SCHEMA_PATH} differs from the schema generated from rtchat_sdk/protocol.py: "
        "run `python -m rtchat_sdk.schema --write` and commit docs/protocol.schema.json"
    )


@pytest.mark.timeout(30)
def test_schema_path_is_docs_in_the_repo_root() -> None:
    root = Path(__file__).resolve().parent.parent
    assert root / "docs" / "protocol.schema.json" == schema.SCHEMA_PATH


@pytest.mark.timeout(30)
def test_schema_text_is_stable_sorted_json() -> None:
    text = schema.schema_text()
    assert text == schema.schema_text()
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


@pytest.mark.timeout(30)
def test_main_prints_writes_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert schema.main([]) == 0
    assert capsys.readouterr().out == schema.schema_text()

    target = tmp_path / "nested" / "protocol.schema.json"
    assert schema.main(["--check", "--path", str(target)]) == 1
    assert "--write" in capsys.readouterr().err

    assert schema.main(["--write", "--path", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == schema.schema_text()
    assert schema.main(["--check", "--path", str(target)]) == 0
    capsys.readouterr()

    target.write_text(schema.schema_text().replace("rtchat", "rtchaT", 1), encoding="utf-8")
    assert schema.main(["--check", "--path", str(target)]) == 1
    err = capsys.readouterr().err
    assert "out of date" in err
    assert "python -m rtchat_sdk.schema --write" in err


@pytest.mark.timeout(60)
def test_module_entry_point_checks_the_committed_file() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rtchat_sdk.schema", "--check"],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------
# The schema itself


@pytest.mark.timeout(30)
def test_schema_is_draft_2020_12() -> None:
    full = p.json_schema()
    assert full["$schema"] == DRAFT_2020_12
    for ref in _all_refs(full):
        assert ref.startswith("#/$defs/"), ref
        assert ref.removeprefix("#/$defs/") in full["$defs"], f"dangling $ref {ref}"
    jsonschema.Draft202012Validator.check_schema(full)


@pytest.mark.timeout(30)
def test_every_frame_type_is_in_the_schema() -> None:
    full = p.json_schema()
    assert {_frame_type(m) for m in CLIENT_MODELS} == p.CLIENT_FRAME_TYPES
    assert _type_consts(full) == p.CLIENT_FRAME_TYPES | SERVER_FRAME_TYPES
    for direction, models in (("ClientFrame", CLIENT_MODELS), ("ServerFrame", SERVER_MODELS)):
        listed = {ref["$ref"] for ref in full["$defs"][direction]["oneOf"]}
        assert listed == {f"#/$defs/{m.__name__}" for m in models}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("frame", CLIENT_SAMPLES, ids=_sample_id)
def test_client_samples_validate(frame: p.ClientFrame) -> None:
    full = p.json_schema()
    wire = json.loads(p.encode(frame))
    assert _is_valid(wire, _direction_schema(full, "ClientFrame"))
    if wire["type"] not in SERVER_FRAME_TYPES:
        assert _is_valid(wire, full)
        assert not _is_valid(wire, _direction_schema(full, "ServerFrame"))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("frame", SERVER_SAMPLES, ids=_sample_id)
def test_server_samples_validate(frame: p.ServerFrame) -> None:
    full = p.json_schema()
    wire = json.loads(p.encode(frame))
    assert _is_valid(wire, _direction_schema(full, "ServerFrame"))
    if wire["type"] not in p.CLIENT_FRAME_TYPES:
        assert _is_valid(wire, full)
        assert not _is_valid(wire, _direction_schema(full, "ClientFrame"))


@pytest.mark.timeout(30)
def test_minimal_frames_validate() -> None:
    """Optional fields may be left out: defaults apply on both sides."""
    full = p.json_schema()
    client = _direction_schema(full, "ClientFrame")
    client_frames: list[dict[str, Any]] = [
        {"type": "hello", "protocol": 1},
        {"type": "emit", "id": 7, "event": "x"},
        {"type": "join", "id": 8, "room": "r", "unknown_field": "ignored"},
    ]
    for frame in client_frames:
        assert _is_valid(frame, client), frame
        p.decode_client_frame(json.dumps(frame))
    server = _direction_schema(full, "ServerFrame")
    server_frames: list[dict[str, Any]] = [
        {"type": "reply", "id": 7},
        {"type": "error", "code": "internal", "message": "boom"},
        {"type": "message", "stream": "s", "epoch": "e", "offset": 1, "event": "x"},
    ]
    for frame in server_frames:
        assert _is_valid(frame, server), frame
        p.decode_server_frame(json.dumps(frame))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("frame", BAD_CLIENT_FRAMES, ids=_sample_id)
def test_bad_client_frames_are_rejected(frame: Any) -> None:
    assert not _is_valid(frame, _direction_schema(p.json_schema(), "ClientFrame"))
    with pytest.raises(ValidationError):
        p.decode_client_frame(json.dumps(frame))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("frame", BAD_SERVER_FRAMES, ids=_sample_id)
def test_bad_server_frames_are_rejected(frame: Any) -> None:
    assert not _is_valid(frame, _direction_schema(p.json_schema(), "ServerFrame"))
    with pytest.raises(ValidationError):
        p.decode_server_frame(json.dumps(frame))


@pytest.mark.timeout(30)
def test_root_schema_accepts_ping() -> None:
    assert _is_valid({"type": "ping", "ts": 1.0}, p.json_schema())


@pytest.mark.timeout(30)
def test_schema_requires_type() -> None:
    frame = {"protocol": 1}
    with pytest.raises(ValidationError):
        p.decode_client_frame(json.dumps(frame))
    assert not _is_valid(frame, _direction_schema(p.json_schema(), "ClientFrame"))


# --------------------------------------------------------------------------
# Round trip through the codec


@pytest.mark.timeout(30)
def test_samples_cover_every_frame_model() -> None:
    assert {type(f) for f in CLIENT_SAMPLES} == set(CLIENT_MODELS)
    assert {type(f) for f in SERVER_SAMPLES} == set(SERVER_MODELS)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("frame", CLIENT_SAMPLES, ids=_sample_id)
def test_client_frames_round_trip(frame: p.ClientFrame) -> None:
    text = p.encode(frame)
    decoded = p.decode_client_frame(text)
    assert decoded == frame
    assert type(decoded) is type(frame)
    assert p.encode(decoded) == text


@pytest.mark.timeout(30)
@pytest.mark.parametrize("frame", SERVER_SAMPLES, ids=_sample_id)
def test_server_frames_round_trip(frame: p.ServerFrame) -> None:
    text = p.encode(frame)
    decoded = p.decode_server_frame(text)
    assert decoded == frame
    assert type(decoded) is type(frame)
    assert p.encode(decoded) == text
