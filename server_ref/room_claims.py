"""The built-in authorization hook: the rooms a token's claim lists.

As Centrifugo's channel claims: the token itself says where its holder may
go, so a server needs no lookup of its own. ``rooms_claim("rooms")`` is a
check for ``authorize_join`` and ``authorize_publish`` alike; the claim is a
list of room names, each exact or ending with ``*`` (a prefix: ``"team-*"``
allows ``team-a``, ``"*"`` every room). No claim, a claim that is not a list,
or no string in it that matches refuses (``forbidden``): it fails closed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .app import Context, Namespace

__all__ = ["RoomsCheck", "guard_rooms", "room_allowed", "rooms_claim"]

RoomsCheck = Callable[..., bool]
"""``check(ctx, room)`` (a join) or ``check(ctx, room, event)`` (a publish)."""


def room_allowed(allowed: Any, room: str) -> bool:
    """Whether ``room`` matches one of the ``allowed`` names (exact, or a ``*`` prefix)."""
    if not isinstance(allowed, list | tuple):
        return False
    for name in allowed:
        if isinstance(name, str) and (
            name == room or (name.endswith("*") and room.startswith(name[:-1]))
        ):
            return True
    return False


def rooms_claim(claim: str = "rooms") -> RoomsCheck:
    """A check that lets a session into (and publish to) the rooms its ``claim`` lists."""

    def check(ctx: Context, room: str, event: str | None = None) -> bool:
        return room_allowed(ctx.claims.get(claim), room)

    check.__qualname__ = f"rooms_claim({claim!r})"
    return check


def guard_rooms(namespace: Namespace, claim: str = "rooms") -> None:
    """Guard a namespace's joins and publishes with ``rooms_claim(claim)``
    (``rtchat-server --jwt-rooms-claim NAME`` does it for ``/``)."""
    check = rooms_claim(claim)
    namespace.authorize_join(check)
    namespace.authorize_publish(check)
