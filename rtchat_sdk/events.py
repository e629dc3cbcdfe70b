"""Typed events: pydantic models that know their wire name.

::

    class ChatMessage(Event, name="chat.message"):
        text: str

``@client.on(ChatMessage)`` then receives validated ``ChatMessage`` objects,
and ``client.publish(room, ChatMessage(text="hi"))`` sends one. A class
without ``name=`` is sent under its class name.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ValidationFailed

__all__ = [
    "Event",
    "EventT",
    "MemberJoined",
    "MemberLeft",
    "event_name",
    "lookup_event",
    "validate_payload",
]


class Event(BaseModel):
    """Base class of typed events; subclass with ``name="wire.name"``."""

    model_config = ConfigDict(extra="ignore")

    event_name: ClassVar[str] = ""

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.event_name = name or cls.__name__
        _registry[cls.event_name] = cls


EventT = TypeVar("EventT", bound=BaseModel)

_registry: dict[str, type[Event]] = {}


def event_name(event: str | type[Event] | Event) -> str:
    """The wire name of an event given as a string, an Event class or instance."""
    if isinstance(event, str):
        return event
    return event.event_name


def lookup_event(name: str) -> type[Event] | None:
    """The most recently defined Event class with this wire name, if any."""
    return _registry.get(name)


def validate_payload(model: type[EventT], data: Any) -> EventT:
    """Validate ``data`` into ``model``, raising our ValidationFailed on error."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(
            f"payload does not match {model.__name__}: {exc.error_count()} error(s): "
            + "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()
            )
        ) from exc


class MemberJoined(Event, name="$join"):
    """A session joined a room (PROTOCOL §7.5; a namespace with presence events on).

    Delivered through the room's stream, in order with its messages; never
    to the session that joined.
    """

    session: str
    user: str | None = None
    client: str | None = None
    joined_at: float = 0.0


class MemberLeft(MemberJoined, name="$leave"):
    """A session left a room: ``reason`` is 'left', 'closed', 'disconnected' or 'expired'."""

    reason: str | None = None
