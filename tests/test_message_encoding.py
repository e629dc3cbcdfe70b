"""The session's message encoder gives exactly the text the pydantic frame models give."""

from __future__ import annotations

import datetime
import decimal
import enum
import math
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticSerializationError

from rtchat_sdk import Event, ValidationFailed
from rtchat_sdk import protocol as p
from rtchat_sdk.core import ClientSession
from rtchat_sdk.protocol import fastpath
from rtchat_sdk.protocol.fastpath import encode_message

from .helpers import open_session


class Chat(Event, name="chat.message"):
    text: str
    tags: list[str] = Field(default_factory=list)
    score: float = 0.0


class Aliased(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)
    value: int = Field(alias="Value")


class Color(enum.Enum):
    RED = "red"


class Name(enum.StrEnum):
    EVENT = "named.event"


def reference(
    kind: str, message_id: int, ns: str, event: Any, room: Any, data: Any, echo: Any
) -> str:
    """What the session encoded before: the frame model, validated, then dumped."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    if kind == "emit":
        return p.encode(p.EmitFrame(id=message_id, ns=ns, event=event, data=data))
    if kind == "request":
        return p.encode(p.RequestFrame(id=message_id, ns=ns, event=event, data=data))
    if kind == "publish":
        return p.encode(
            p.PublishFrame(id=message_id, ns=ns, room=room, event=event, data=data, echo=echo)
        )
    if kind == "join":
        return p.encode(p.JoinFrame(id=message_id, ns=ns, room=room))
    return p.encode(p.LeaveFrame(id=message_id, ns=ns, room=room))


PAYLOADS: list[Any] = [
    None,
    0,
    -(2**70),
    True,
    "",
    "plain ascii",
    'é à ü — 中文 — 😀 — \u2028\u2029 — \x00\x1f\x7f — "quoted" \\ back/slash',
    [1, 2.5, "x", None, [], {}],
    {"n": 1, "text": "hello", "nested": {"deep": [{"a": [1, {"b": None}]}]}},
    {"é": "ключ", "": 0, "1": 1},
    0.1,
    -0.0,
    1e300,
    {"x": [-1.7976931348623157e308, math.pi]},
    "NaN, Infinity and -Infinity in a string are only text",
    {"NaN": ["Infinity", "-Infinity"]},
    Chat(text="héllo", tags=["a", "ü"], score=2.5),
    {"event": Chat(text="nested model")},
    {"aliased": Aliased(Value=3)},
    datetime.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=datetime.UTC),
    datetime.timedelta(seconds=90.5),
    uuid.UUID(int=7),
    decimal.Decimal("1.10"),
    b"bytes \xc3\xa9",
    Color.RED,
    (1, "tuple"),
    frozenset({3}),
]

ENVELOPES: list[tuple[str, str, Any, Any, Any]] = [
    ("emit", "/", "ev", None, False),
    ("request", "/", "echo", None, False),
    ("request", "/chat/é", 'we"ird\\name\n', None, False),
    ("publish", "/", "msg", "room-1", False),
    ("publish", "/ns", "msg", "chambre é", True),
    ("join", "/", None, "lobby", False),
    ("leave", "/ns", None, 'r"oom', False),
    ("request", "/", Name.EVENT, None, False),  # a str subclass: the model's way
]


@pytest.mark.parametrize("envelope", ENVELOPES, ids=lambda e: f"{e[0]}-{e[2]!r}")
@pytest.mark.parametrize("data", PAYLOADS, ids=lambda d: type(d).__name__)
def test_the_encoding_is_the_models_byte_for_byte(
    envelope: tuple[str, str, Any, Any, Any], data: Any
) -> None:
    kind, ns, event, room, echo = envelope
    fastpath._ENVELOPES.clear()
    # The first message of an envelope goes through the model, and the envelope is kept.
    assert encode_message(kind, 1, ns, event, room, None, echo) == reference(
        kind, 1, ns, event, room, None, echo
    )
    kept = (kind, ns, event, room, echo) in fastpath._ENVELOPES
    assert kept is (type(event) is not Name)  # the fast way is taken where it may be
    for message_id in (2, 10**12):  # then only the payload is serialised
        expected = reference(kind, message_id, ns, event, room, data, echo)
        assert encode_message(kind, message_id, ns, event, room, data, echo) == expected


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["emit", "request", "publish", "join", "leave"]),
    ns=st.text(max_size=8).map(lambda s: "/" + "".join(c for c in s if not c.isspace())),
    event=st.text(min_size=1, max_size=10),
    room=st.text(min_size=1, max_size=10),
    echo=st.booleans(),
    data=json_values,
)
def test_any_json_payload_and_names_encode_as_the_model_does(
    kind: str, ns: str, event: str, room: str, echo: bool, data: Any
) -> None:
    for message_id, payload in ((1, None), (99, data), (100, data)):
        expected = reference(kind, message_id, ns, event, room, payload, echo)
        assert encode_message(kind, message_id, ns, event, room, payload, echo) == expected


def model_error(kind: str, message_id: int, ns: Any, event: Any, data: Any) -> str:
    try:
        reference(kind, message_id, ns, event, "r", data, False)
    except (ValidationError, PydanticSerializationError) as exc:
        return f"cannot encode {kind}: {exc}"
    raise AssertionError("the model accepted it")


@pytest.mark.parametrize(
    ("ns", "event", "data"),
    [
        ("/", "", None),  # empty event name
        ("/", "x" * 257, None),  # too long
        ("nope", "ev", None),  # not a namespace
        ("/a b", "ev", None),  # whitespace in a namespace
        ("/", 42, None),  # not a string
        ("/", "ev", object()),  # not serialisable
        ("/", "ev", {"deep": [1, {2, object()}]}),
    ],
)
def test_invalid_messages_are_refused_with_the_models_error_and_nothing_is_queued(
    ns: Any, event: Any, data: Any
) -> None:
    s = ClientSession()
    open_session(s)
    s.request("/", "ev", 1, now=0)  # the valid envelope is known
    s.request("/", "ev", 2, now=0)
    s.data_to_send()
    with pytest.raises(ValidationFailed) as info:
        s.request(ns, event, data, now=0)
    assert str(info.value) == model_error("request", 3, ns, event, data)
    assert s.outbox.ids() == [1, 2]
    assert s.data_to_send() == []
    s.request("/", "ev", 3, now=0)  # ids go on where they were
    assert s.outbox.ids() == [1, 2, 3]


def test_an_id_below_one_is_refused_as_before() -> None:
    s = ClientSession(first_id=0)
    with pytest.raises(ValidationFailed, match="greater than or equal to 1"):
        s.emit("/", "ev", None, now=0)
    assert len(s.outbox) == 0


# --------------------------------------------------------------------------
# NaN and infinities: JSON has none, and writing null instead would change the data


NON_FINITE: list[tuple[Any, str]] = [
    (float("nan"), "data is NaN"),
    ({"x": float("nan")}, "data.x is NaN"),
    ({"x": [1, 2.5, float("inf")]}, "data.x[2] is Infinity"),
    ([{"a": "NaN"}, {"b": {"c": [float("-inf")]}}], "data[1].b.c[0] is -Infinity"),
    (
        {"ok": 1.0, "deep": [[{"v": float("nan")}]], "later": float("inf")},
        "data.deep[0][0].v is NaN",
    ),
    ((1, float("inf")), "data[1] is Infinity"),
    (Chat(text="x", score=float("nan")), "data.score is NaN"),
    (
        {"event": Chat(text="nested", score=float("-inf")).model_dump()},
        "data.event.score is -Infinity",
    ),
]


def _send(s: ClientSession, kind: str, data: Any) -> None:
    if kind == "publish":
        s.publish("/", "room", "ev", data, now=0)
    else:
        (s.emit if kind == "emit" else s.request)("/", "ev", data, now=0)


@pytest.mark.parametrize("kind", ["emit", "request", "publish"])
@pytest.mark.parametrize(("data", "where"), NON_FINITE, ids=lambda v: repr(v)[:30])
def test_a_non_finite_number_is_refused_naming_its_path_and_nothing_is_queued(
    kind: str, data: Any, where: str
) -> None:
    expected = f"cannot encode {kind}: {where}: JSON has no NaN or Infinity"
    for envelope_known in (False, True):  # the model's way, then the fast way
        fastpath._ENVELOPES.clear()
        s = ClientSession()
        open_session(s)
        if envelope_known:
            _send(s, kind, 1)
            assert len(fastpath._ENVELOPES) == 1
        before, sent = s.outbox.ids(), s.data_to_send()
        with pytest.raises(ValidationFailed) as info:
            _send(s, kind, data)
        assert str(info.value) == expected
        assert s.outbox.ids() == before
        assert s.data_to_send() == []
        assert s.in_flight == len(sent)
        # The id was not used: the next message takes it.
        next_id, _ = s.emit("/", "ev", "fine", now=0)
        assert next_id == len(before) + 1


def _first_non_finite(value: Any, path: str) -> str | None:
    """Depth-first, in order: the path of the first NaN or infinity in a JSON value."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    children: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        children = [(f"{path}.{k}", v) for k, v in value.items()]
    elif isinstance(value, list):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    for where, child in children:
        found = _first_non_finite(child, where)
        if found is not None:
            return found
    return None


with_non_finite = st.recursive(
    st.none() | st.integers() | st.floats() | st.text(alphabet='NaIfity-"\\ é'),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(data=with_non_finite, kind=st.sampled_from(["emit", "request", "publish"]))
def test_any_payload_is_sent_exactly_or_refused_at_its_first_non_finite_number(
    data: Any, kind: str
) -> None:
    where = _first_non_finite(data, "data")
    for message_id in (1, 2):  # the model's way, then the fast way
        if where is None:
            text = encode_message(kind, message_id, "/", "ev", "r", data, False)
            assert text == reference(kind, message_id, "/", "ev", "r", data, False)
            continue
        with pytest.raises(ValidationFailed) as info:
            encode_message(kind, message_id, "/", "ev", "r", data, False)
        assert str(info.value).startswith(f"cannot encode {kind}: {where} is ")
