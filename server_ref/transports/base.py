"""The transport seam: how frames reach the server, whatever carries them.

A transport knows nothing of rooms, ids or sessions. It implements two small
interfaces:

* ``Transport``, one per client connection: ``write`` queues one encoded
  frame (what one event-loop pass queued leaves in one write, as one batch
  message when ``batching`` is set), ``pending_bytes`` reports backpressure
  (unsent bytes, which the server holds against ``max_pending_bytes``),
  ``close(code, reason)`` ends it after what was written, ``abort`` drops it;
* ``Listener``, the accepting side: ``start(host, port)``, ``port``,
  ``stop_accepting``, ``wait_closed``.

A ``ListenerFactory`` makes the listener from the server (its ``Endpoint``)
and its ``ServerConfig``; ``Server(transport=...)`` takes one, and
``websocket_listener`` is the default.

A transport that also takes plain HTTP requests on its port hands each GET to
``Endpoint.http_get(path)``, which answers the server's HTTP endpoints
(``/healthz``, ``/readyz``) with an ``HttpAnswer``, or None for a path it
does not serve.

A transport calls the server's ``Endpoint`` for each connection: ``opened`` once,
``received`` for each text frame (awaited: a transport reads the next frame
only after it, so a client's frames are taken in order and a busy server
pushes back), ``closed`` once with the close code the peer sent, if any.
The websockets transport (``websocket.py``) implements both; the ASGI one
(``asgi.py``) implements ``Transport`` and leaves listening to the ASGI
server (``Server.open`` starts a server without a listener); long polling
comes next.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from ..config import ServerConfig

__all__ = ["Endpoint", "HttpAnswer", "Listener", "ListenerFactory", "Transport", "bearer_token"]


class HttpAnswer(NamedTuple):
    """A plain HTTP response: status, content type, body, and any other headers."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class Transport(ABC):
    """One client connection, as the server sees it."""

    batching: bool = False
    """The client accepts batches (a JSON array of frames) in one message."""

    kind: str = "other"
    """What carries it, the ``transport`` label of ``rtchat_connections``: "websocket",
    "asgi-websocket" or "polling" for the server's own (a class attribute)."""

    bearer: str | None = None
    """The token of the opening request's ``Authorization: Bearer`` header, set by
    the transport before ``Endpoint.opened``; the hello's ``auth.token`` wins."""

    address: str | None = None
    """The client's IP address (``addresses.client_address``: the peer's, or behind a
    trusted proxy the one it forwards), set before ``Endpoint.opened``; the server
    counts connections per address (``max_connections_per_address``)."""

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Queue one encoded frame; it leaves with the others of this loop pass."""

    @abstractmethod
    def pending_bytes(self) -> int:
        """Bytes queued or buffered and not yet sent: the backpressure report."""

    @abstractmethod
    async def close(self, code: int, reason: str) -> None:
        """Close after what was written, with ``code``; returns once closed."""

    @abstractmethod
    def abort(self) -> None:
        """Drop the connection now, unsent data and all."""


def bearer_token(headers: Iterable[tuple[str | bytes, str | bytes]]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header among ``headers``, or None."""
    for name, value in headers:
        name = name.decode("latin-1") if isinstance(name, bytes) else name
        if name.lower() != "authorization":
            continue
        value = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class Endpoint(Protocol):
    """What the server offers a transport."""

    def opened(self, transport: Transport) -> int:
        """A connection was accepted; returns its id for the calls below."""
        ...

    def received(self, conn: int, text: str | bytes) -> Awaitable[None]:
        """One text frame; the next is read once what this returns is awaited."""
        ...

    async def closed(self, conn: int, peer_code: int | None) -> None:
        """The connection ended; ``peer_code`` is the code the peer closed with."""
        ...

    def http_get(self, path: str) -> HttpAnswer | None:
        """The answer to a plain HTTP GET of ``path``, or None (not one of the server's)."""
        ...


class Listener(ABC):
    """Accepts connections for an ``Endpoint``."""

    @abstractmethod
    async def start(self, host: str, port: int) -> None:
        """Listen; returns once bound."""

    @property
    @abstractmethod
    def port(self) -> int:
        """The port actually bound."""

    @abstractmethod
    def stop_accepting(self) -> None:
        """Accept no more connections; the open ones carry on."""

    @abstractmethod
    async def wait_closed(self) -> None:
        """Return once every connection has ended and been reported ``closed``."""


ListenerFactory = Callable[[Endpoint, "ServerConfig"], Listener]
"""Makes a server's listener: ``factory(endpoint, config)``."""
