"""Long polling across nodes without sticky sessions: a request for a polling
connection another node holds is carried there over the broker and answered
there exactly as a local one.

A connection's ``sid`` is ``<node>.<random>``: the node that holds it, then
192 random bits. A node that gets a request for another node's sid calls that
node (``Broker.call_node``) with the request; the owner answers it as if it
had come to itself (a held poll included) and the answer goes back as the
HTTP status and body. The broker and the node come from the endpoint (the
``Server``'s ``broker`` and ``node``); an endpoint without them is one node,
and a foreign sid is unknown there.

What can go wrong, and what the client sees (each time safe to ask again: a
poll with the same ``ack`` gets the same batch, a POST's frames are deduped
by id):

* the owner is gone (no node serves it): 404 ``unknown_session`` at once, so
  the client opens a new connection and resumes its session elsewhere;
* no answer in time (the request or its answer lost, the owner stuck): 504
  ``node_timeout``, after ``poll_timeout + FORWARD_MARGIN`` for a poll (it
  may be held that long), ``FORWARD_TIMEOUT`` for the rest;
* the broker's ``max_calls`` limit on this node or the owner: 503
  ``overloaded``; the store unreachable: 503 ``unavailable``; the owner's
  handler failed: 502 ``node_failed``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

from ..broker import Broker, CallFailed, CallsBusy, CallTimeout, NodeGone
from ..errors import BrokerUnavailable

__all__ = ["FORWARD_MARGIN", "FORWARD_TIMEOUT", "UNKNOWN", "Forwarder", "Reply", "Routed"]

Reply = tuple[int, dict[str, Any] | bytes]
"""An HTTP status and its JSON body (as data, or already encoded)."""

UNKNOWN: Reply = (404, {"error": "unknown_session"})

FORWARD_MARGIN = 5.0
"""Seconds a forwarded poll may take beyond ``poll_timeout`` (the client allows 10)."""
FORWARD_TIMEOUT = 5.0
"""Seconds a forwarded POST or DELETE may take (the client allows ``connect_timeout``)."""

Local = Callable[[str, str, str], Awaitable[Reply]]
"""Answers a request (method, sid, its argument) for a connection of this node."""


@runtime_checkable
class Routed(Protocol):
    """An endpoint that names its node and its broker (the ``Server``)."""

    node: str
    broker: Broker


def _encode(reply: Reply) -> str:
    status, body = reply
    text = body.decode() if isinstance(body, bytes) else json.dumps(body)
    return f"{status}\n{text}"


def _decode(answer: str) -> Reply:
    status, text = answer.split("\n", 1)
    return int(status), text.encode()


class Forwarder:
    """This node's side of the polling requests that cross nodes: sent, and served."""

    def __init__(self, endpoint: object, poll_timeout: float) -> None:
        self.node: str = endpoint.node if isinstance(endpoint, Routed) else secrets.token_hex(8)
        self._broker: Broker | None = endpoint.broker if isinstance(endpoint, Routed) else None
        self._poll_timeout = poll_timeout
        self.margin = FORWARD_MARGIN
        self.timeout = FORWARD_TIMEOUT
        self._serving = False
        self._local: Local | None = None

    def new_sid(self) -> str:
        return f"{self.node}.{secrets.token_urlsafe(24)}"

    def owner(self, sid: str) -> str | None:
        """The node a sid names, or None for one no node made."""
        node, dot, rest = sid.partition(".")
        if not dot or not node or not rest or "\n" in sid:
            return None
        return node

    def holds(self, sid: str) -> bool:
        """The sid names this node (whether or not the connection is still there)."""
        return self.owner(sid) == self.node

    async def serve(self, local: Local) -> None:
        """Answer forwarded requests with ``local`` from now on (before a sid is handed out)."""
        self._local = local
        if not self._serving and self._broker is not None:
            await self._broker.serve_node(self.node, self._answer)
            self._serving = True

    async def unserve(self) -> None:
        if self._serving and self._broker is not None:
            self._serving = False
            await self._broker.unserve_node(self.node)

    async def forward(self, method: str, sid: str, arg: str) -> Reply:
        """Ask the sid's owner; its answer, or the status that says why there is none."""
        owner = self.owner(sid)
        if self._broker is None or owner is None:
            return UNKNOWN
        timeout = self._poll_timeout + self.margin if method == "GET" else self.timeout
        try:
            return _decode(await self._broker.call_node(owner, f"{method}\n{sid}\n{arg}", timeout))
        except NodeGone:
            return UNKNOWN
        except CallTimeout:
            return 504, {"error": "node_timeout"}
        except CallsBusy:
            return 503, {"error": "overloaded"}
        except BrokerUnavailable:
            return 503, {"error": "unavailable"}
        except CallFailed:
            return 502, {"error": "node_failed"}

    async def _answer(self, payload: str) -> str:
        method, sid, arg = payload.split("\n", 2)
        if self._local is None or not self.holds(sid):
            return _encode(UNKNOWN)
        return _encode(await self._local(method, sid, arg))
