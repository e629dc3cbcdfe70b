"""Fuzzing the frame decoder and the server hub with generated hostile frames.

Three kinds of input (issue 13, item 5):

* arbitrary bytes and text;
* JSON values of any shape;
* near-valid frames: a real client frame type with its fields mutated (wrong
  types, missing or extra fields, boundary, huge and non-finite numbers,
  negative ids, unicode edge cases), written as JSON text that may itself be
  damaged (cut short, a byte flipped, NaN spliced in, sent as bytes).

The decoder must return a client frame or raise pydantic's ``ValidationError``,
which the server classifies into one of the four parse error codes of
PROTOCOL §2 (with the oracle below deciding which one); nothing else. The real
hub, driven by ``tests/hubnet.py`` with the real ``MemoryBroker``, must let no
exception escape, answer only with documented error codes, close only with a
documented close code, and keep serving a second, well-behaved connection on
the same hub, whose every request is answered.

Example counts keep the file well under 30 s; ``RTCHAT_FUZZ_EXAMPLES=20000``
(for example) makes a long run. The atheris harness in ``tests/fuzz/`` runs a
bounded number of iterations when atheris is installed
(``RTCHAT_ATHERIS_RUNS``, default 2000).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from rtchat_sdk import protocol as p
from server_ref.config import ServerConfig
from server_ref.core.connection import classify_decode_error

from .hubnet import HubNet

pytestmark = pytest.mark.timeout(60)

EXAMPLES = int(os.environ.get("RTCHAT_FUZZ_EXAMPLES", "0"))
"""0: the quick default counts below; any other number: that many examples per test."""


def fuzz_settings(default: int) -> settings:
    return settings(
        max_examples=EXAMPLES or default,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


PARSE_ERRORS = {
    p.ErrorCode.BAD_JSON,
    p.ErrorCode.BAD_FRAME,
    p.ErrorCode.UNKNOWN_TYPE,
    p.ErrorCode.INVALID_FRAME,
}
DOCUMENTED_ERRORS = {str(code) for code in p.ErrorCode} - {p.ErrorCode.INTERNAL}
"""Codes the hub may answer a hostile frame with; ``internal`` would be a server bug."""
DOCUMENTED_CLOSES = {
    p.CloseCode.POLICY_VIOLATION,  # a valid frame before hello
    p.CloseCode.UNSUPPORTED_PROTOCOL,
    p.CloseCode.TOO_MANY_BAD_FRAMES,
}
"""Close codes a hostile frame may earn (the clock stands still: no timeouts)."""


# ---------------------------------------------------------------------------
# Strategies


class Raw:
    """JSON text written as is: a number json.dumps cannot write, a bad escape."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:60]!r})"


def render(value: Any, ascii_only: bool = True) -> str:
    """JSON text of ``value``, with ``Raw`` parts spliced in verbatim."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        items = (f"{render(str(k), ascii_only)}:{render(v, ascii_only)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

EDGE_RAW = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "1e-999",
    "-0",
    "-0.0",
    "0.0",
    "1.0",
    "1E2",
    "9" * 4300,
    "1" + "0" * 4300,
    "18446744073709551616",
    "-9223372036854775809",
    '"\\ud800"',
    '"\\udc00\\ud800"',
    '"\\ud83d\\ude00"',
    '"\\u0000"',
    '"\\u00e9"',
    '"' + "x" * 300 + '"',
    '"' + "é" * 200 + '"',
    '"/ space"',
    '""',
    "[" * 300 + "]" * 300,
    '{"a":' * 100 + "1" + "}" * 100,
]
edge_values: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from([Raw(text) for text in EDGE_RAW]),
    st.sampled_from([None, True, False, 0, -1, 1, 2**31, 2**53 + 1, 2**63, 2**64, 1.5, -0.5]),
    st.sampled_from(["", "/", "//", "x", "/\u2028", "\ufeff", "😀", "\u0000", "a" * 257]),
    st.sampled_from([[], {}, [1], {"a": 1}, {"type": "hello"}]),
    json_values,
)
ids = st.one_of(st.integers(min_value=-3, max_value=2**70), edge_values)
names = st.one_of(st.text(min_size=1, max_size=10), edge_values)
namespaces = st.one_of(st.sampled_from(["/", "/chat", "/nope"]), edge_values)

stream_positions = st.fixed_dictionaries(
    {"stream": names, "epoch": names, "offset": ids},
    optional={"ns": namespaces, "room": names},
)
client_frames: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "hello": st.fixed_dictionaries(
        {"protocol": st.one_of(st.just(1), edge_values)},
        optional={
            "auth": st.one_of(st.none(), st.just({"user": "u"}), edge_values),
            "resume": st.one_of(
                st.none(),
                edge_values,
                st.fixed_dictionaries(
                    {"token": names},
                    optional={
                        "session": names,
                        "last_reply": ids,
                        "streams": st.lists(stream_positions, max_size=3),
                    },
                ),
            ),
            "client": names,
            "batch": st.one_of(st.booleans(), edge_values),
        },
    ),
    "emit": st.fixed_dictionaries(
        {"id": ids, "event": names}, optional={"ns": namespaces, "data": json_values}
    ),
    "request": st.fixed_dictionaries(
        {"id": ids, "event": st.one_of(st.just("echo"), names)},
        optional={"ns": namespaces, "data": st.one_of(json_values, edge_values)},
    ),
    "join": st.fixed_dictionaries({"id": ids, "room": names}, optional={"ns": namespaces}),
    "leave": st.fixed_dictionaries({"id": ids, "room": names}, optional={"ns": namespaces}),
    "publish": st.fixed_dictionaries(
        {"id": ids, "room": names, "event": names},
        optional={
            "ns": namespaces,
            "data": st.one_of(json_values, edge_values),
            "echo": st.one_of(st.booleans(), edge_values),
        },
    ),
    "ping": st.fixed_dictionaries({"ts": st.one_of(st.floats(allow_nan=False), edge_values)}),
    "pong": st.fixed_dictionaries({"ts": st.one_of(st.floats(allow_nan=False), edge_values)}),
}
frame_types = st.sampled_from(sorted(client_frames)) | st.sampled_from(
    ["reply", "welcome", "error", "message", "gap", "HELLO", "", "hello "]
)


@st.composite
def near_valid_frames(draw: st.DrawFn) -> str | bytes:
    """A real frame type with mutated fields, as JSON text, maybe damaged on top."""
    kind = draw(frame_types)
    fields: dict[str, Any] = dict(draw(client_frames.get(kind, client_frames["request"])))
    frame: dict[str, Any] = {"type": kind, **fields}
    for _ in range(draw(st.integers(0, 2))):  # field mutations
        action = draw(st.sampled_from(["drop", "retype", "extra", "type"]))
        if action == "drop" and frame:
            frame.pop(draw(st.sampled_from(sorted(frame))))
        elif action == "retype" and frame:
            frame[draw(st.sampled_from(sorted(frame)))] = draw(edge_values)
        elif action == "extra":
            frame[draw(st.text(max_size=8))] = draw(edge_values)
        elif action == "type":
            frame["type"] = draw(edge_values)
    text = render(frame, ascii_only=draw(st.booleans()))
    damage = draw(st.sampled_from(["none"] * 6 + ["cut", "flip", "nan", "wrap", "bom", "bytes"]))
    if damage == "cut" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif damage == "flip" and text:
        data = bytearray(text.encode())
        data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    elif damage == "nan":
        at = draw(st.integers(0, len(text)))
        text = (
            text[:at] + draw(st.sampled_from(["NaN", "Infinity", ":NaN", ",-Infinity"])) + text[at:]
        )
    elif damage == "wrap":
        text = f"[{text}]"
    elif damage == "bom":
        text = "\ufeff" + text
    elif damage == "bytes":
        return text.encode()
    return text


any_input: st.SearchStrategy[str | bytes] = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64),
    json_values.map(render),
    near_valid_frames(),
    near_valid_frames(),
    near_valid_frames(),
)


# ---------------------------------------------------------------------------
# The decoder


def _strict_loads(text: str | bytes) -> Any:
    def no_constant(name: str) -> Any:
        raise ValueError(name)

    return json.loads(text, parse_constant=no_constant)


def expected_parse_error(text: str | bytes) -> set[str]:
    """The parse error codes PROTOCOL §2 allows for ``text``, judged independently.

    ``bad_json`` is always possible: the decoder refuses some JSON that Python's
    parser takes (nesting past its depth limit, lone surrogate escapes, numbers
    past 4300 digits), which the server reports as bad JSON.
    """
    try:
        raw = _strict_loads(text)
    except (ValueError, RecursionError):  # includes UnicodeDecodeError
        return {p.ErrorCode.BAD_JSON}
    if not isinstance(raw, dict) or "type" not in raw or not isinstance(raw["type"], str):
        return {p.ErrorCode.BAD_JSON, p.ErrorCode.BAD_FRAME}
    if raw["type"] not in p.CLIENT_FRAME_TYPES:
        return {p.ErrorCode.BAD_JSON, p.ErrorCode.UNKNOWN_TYPE}
    return {p.ErrorCode.BAD_JSON, p.ErrorCode.INVALID_FRAME}


def check_decoder(text: str | bytes) -> None:
    try:
        frame = p.decode_client_frame(text)
    except ValidationError as exc:
        code, message, message_id = classify_decode_error(text, exc)
        assert code in expected_parse_error(text), (code, message)
        assert isinstance(message, str)
        assert message
        assert message_id is None or (type(message_id) is int and message_id >= 1)
        if code != p.ErrorCode.INVALID_FRAME:
            assert message_id is None
        # The error frame the server would write is standard JSON.
        assert _strict_loads(p.encode_error(code, message, message_id))["code"] == code
        return
    # Accepted: a real client frame of the type the JSON named, with finite numbers only.
    raw = _strict_loads(text)
    assert isinstance(raw, dict)
    assert frame.type == raw["type"] in p.CLIENT_FRAME_TYPES
    if isinstance(frame, p.PingFrame | p.PongFrame):
        assert math.isfinite(frame.ts)
    message_id = getattr(frame, "id", None)
    assert message_id is None or message_id >= 1


@fuzz_settings(400)
@given(any_input)
def test_decoder_returns_a_frame_or_a_documented_parse_error(text: str | bytes) -> None:
    check_decoder(text)


@fuzz_settings(150)
@given(any_input)
def test_server_message_decoder_raises_only_validation_errors(text: str | bytes) -> None:
    # The client's side of the same parser: a hostile server gets the same treatment.
    try:
        frames = p.decode_server_message(text)
    except ValidationError:
        return
    assert all(
        frame.type in {"welcome", "reply", "error", "message", "gap", "ping", "pong"}
        for frame in frames
    )


# ---------------------------------------------------------------------------
# The hub


def new_net(max_bad_frames: int) -> HubNet:
    net = HubNet(ServerConfig(max_bad_frames=max_bad_frames))

    @net.namespaces["/"].on("echo")
    def echo(ctx: object, data: object) -> object:
        return data

    return net


def good_request(net: HubNet, conn: int, message_id: int) -> None:
    """A well-behaved request on ``conn``: answered with its own data, at once."""
    data = {"n": message_id, "text": "still served"}
    net.send(conn, {"type": "request", "id": message_id, "event": "echo", "data": data})
    answers = [f for f in net.frames(conn) if f["type"] not in ("ping", "pong")]
    assert answers == [{"type": "reply", "id": message_id, "data": data}]


def check_hostile_output(net: HubNet, conn: int) -> None:
    for text in net.sent.pop(conn, []):
        frames = _strict_loads(text)  # standard JSON, whatever it answers
        for frame in frames if isinstance(frames, list) else [frames]:
            assert frame["type"] in {"welcome", "reply", "error", "message", "gap", "ping", "pong"}
            if frame["type"] == "error":
                assert frame["code"] in DOCUMENTED_ERRORS, frame
                if frame["code"] in PARSE_ERRORS or frame["code"] == "already_handshaken":
                    assert frame["id"] is None or frame["code"] == p.ErrorCode.INVALID_FRAME


@fuzz_settings(120)
@given(
    hello_first=st.booleans(),
    frames=st.lists(any_input, min_size=1, max_size=25),
    max_bad_frames=st.sampled_from([3, 100]),
)
def test_hub_survives_hostile_frames_and_keeps_serving_a_good_client(
    hello_first: bool, frames: list[str | bytes], max_bad_frames: int
) -> None:
    net = new_net(max_bad_frames)
    good, _ = net.hello(batch=False)
    hostile = net.open()
    if hello_first:
        net.send(hostile, {"type": "hello", "protocol": 1, "batch": True})
    next_id = 1
    for n, text in enumerate(frames):
        net.hub.text_received(hostile, text, net.now)  # str or bytes, as the transport hands it
        net.run()
        check_hostile_output(net, hostile)
        if n % 5 == 0:
            good_request(net, good, next_id)
            next_id += 1
        net.now += 0.01  # time moves, not enough for a heartbeat or handshake timeout
    if hostile in net.closed:
        assert net.closed[hostile] in DOCUMENTED_CLOSES, net.closed[hostile]
        net.close(hostile, peer_code=None)
    else:
        # Still open: it says hello (again) and is answered like any client.
        net.send(hostile, {"type": "hello", "protocol": 1})
        answers = [f for f in net.frames(hostile) if f["type"] == "error"]
        assert all(f["code"] == "already_handshaken" for f in answers[:1])
    good_request(net, good, next_id)
    assert not net.pending
    assert good not in net.closed


@fuzz_settings(60)
@given(st.lists(near_valid_frames(), min_size=1, max_size=40))
def test_near_valid_frames_after_hello_each_get_one_answer_or_none(
    frames: list[str | bytes],
) -> None:
    # One frame in, at most one frame out (answers are not batched without `batch`),
    # except a join/publish's own work; the error for a bad frame is never withheld.
    net = new_net(max_bad_frames=10_000)
    conn, _ = net.hello()
    for text in frames:
        net.hub.text_received(conn, text, net.now)
        net.run()
        out = net.frames(conn)
        try:
            p.decode_client_frame(text)
        except ValidationError as exc:
            code, _, message_id = classify_decode_error(text, exc)
            assert [(f["type"], f["code"], f["id"]) for f in out] == [("error", code, message_id)]
        else:
            for frame in out:
                assert frame["type"] != "error" or frame["code"] in DOCUMENTED_ERRORS, frame
    assert conn not in net.closed


# ---------------------------------------------------------------------------
# atheris

HARNESS = Path(__file__).parent / "fuzz" / "fuzz_frames.py"


@pytest.mark.timeout(120)
def test_atheris_harness_runs_a_bounded_number_of_iterations() -> None:
    pytest.importorskip(
        "atheris", reason="atheris is not installed (optional: pip install atheris)"
    )
    runs = int(os.environ.get("RTCHAT_ATHERIS_RUNS", "2000"))
    done = subprocess.run(
        [sys.executable, str(HARNESS), f"-runs={runs}", "-max_len=4096", "-seed=1"],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Done {runs} runs" in done.stderr, done.stderr[-3000:]
