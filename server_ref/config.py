"""The server's limits and intervals, each with its documented default."""

from __future__ import annotations

import ipaddress
import math
import ssl
from dataclasses import dataclass, field, fields

__all__ = ["ServerConfig"]


@dataclass(slots=True)
class ServerConfig:
    """Every limit and interval of the server, with its default."""

    heartbeat_interval: float = 20.0
    heartbeat_timeout: float = 10.0
    handshake_timeout: float = 10.0
    max_frame_bytes: int = 1024 * 1024
    max_in_flight: int = 1_000
    max_bad_frames: int = 100
    history_size: int = 1_000
    history_seconds: float = 300.0
    session_ttl: float = 300.0
    dedupe_size: int = 2_000
    max_pending_bytes: int = 4 * 1024 * 1024
    shutdown_retry_after: float = 1.0
    max_connections: int = 50_000
    overload_retry_after: float = 5.0
    max_connections_per_address: int = 0
    """Connections held at once from one client address (``trusted_proxies`` says which
    address that is behind a proxy); past it ``overloaded`` and 1013. 0: no limit."""
    rate_per_second: float = 1_000.0
    """Messages a connection may send per second on average (a token bucket); one over it
    is answered ``rate_limited`` with ``retry_after`` and not processed."""
    rate_burst: int = 2_000
    """Messages a connection may send at once above that rate (the bucket's size)."""
    rate_abuse_limit: int = 10_000
    """Messages refused in a row (``rate_limited``) after which the connection is closed
    with 4009 RATE_LIMITED; more than ``max_in_flight``, so a client that waits is never."""
    max_rooms: int = 1_000
    """Rooms a session may be in (client joins, and rooms restored on resume); a join past
    it is answered ``too_many_rooms``."""
    unavailable_retry_after: float = 1.0
    """Seconds a client is told to wait before resending a message the server could
    not process because its broker (Redis) was unreachable (error ``unavailable``)."""
    poll_timeout: float = 25.0
    """Seconds a long poll is held when there is nothing to send (PROTOCOL §1.1)."""
    poll_idle_timeout: float = 40.0
    """Seconds without a request after which a polling connection counts as dropped."""
    poll_max_frames: int = 100
    """Frames per poll answer, and per POST, at most."""
    token_expiry_grace: float = 30.0
    """Seconds a connection stays open after its credentials expire (the ``expires_in``
    an authenticator returns, e.g. a JWT's ``exp``); then it is closed with 4008
    TOKEN_EXPIRED and the client reconnects with fresh credentials."""
    presence_ttl: float = 60.0
    """Seconds a presence entry lasts in the broker unless renewed; the node renews its
    sessions' entries every third of it, so a dead node's members are gone within it."""
    presence_grace: float = 20.0
    """Seconds a session whose connection dropped (no goodbye) stays present in its rooms
    waiting for a resume; then it leaves them (``$leave``, reason "disconnected")."""
    demo: bool = False
    """Serve the demo chat page at ``/demo/`` (``rtchat-server --demo``)."""
    metrics: bool = True
    """Serve Prometheus metrics at ``GET /metrics`` on the server's port (docs/server.md,
    Metrics); ``--no-metrics`` answers 404 there instead."""
    request_timing_every: int = 8
    """Time one request or emit handler call in this many, per event, for
    ``rtchat_request_duration_seconds`` (1: every call). The clock reads and the
    bucket cost a sync handler's request more than its other counters together;
    ``rtchat_handler_calls_total`` counts every call either way."""
    compression: bool = False
    """Accept permessage-deflate from clients that ask. Off by default: it costs
    ~33 KB of memory per connection and a third of the throughput on small
    messages (docs/performance.md); turn it on for large, repetitive payloads
    over slow links."""
    certfile: str | None = None
    """PEM certificate chain: serve TLS (``wss://``, ``https://``) on the port."""
    keyfile: str | None = None
    """PEM private key of ``certfile`` (None: the key is in ``certfile``)."""
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    """A server TLS context made by the embedding app (``Server(ssl=...)``); wins over
    ``certfile``."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins (``https://app.example``, or ``*``) allowed to connect; others get
    403. Empty: every origin, and no CORS headers (transports/origins.py)."""
    trusted_proxies: tuple[str, ...] = ()
    """Networks (CIDR) of proxies whose ``X-Forwarded-For`` names the client address.
    Empty: the header is ignored; the client address is the socket's peer."""

    def __post_init__(self) -> None:
        if self.keyfile is not None and self.certfile is None:
            raise ValueError("keyfile needs certfile")
        if self.allowed_origins:  # imported here: transports import this module
            from .transports.origins import normalize_origin

            self.allowed_origins = tuple(normalize_origin(o) for o in self.allowed_origins)
        self.trusted_proxies = tuple(_network(n) for n in self.trusted_proxies)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if f.name == "max_connections_per_address" and value == 0:
                continue  # 0: no limit
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{f.name} must be positive, got {value!r}")
        if self.dedupe_size < self.max_in_flight:
            raise ValueError("dedupe_size must be at least max_in_flight")
        if self.rate_abuse_limit <= self.max_in_flight:
            raise ValueError("rate_abuse_limit must be more than max_in_flight")

    @property
    def tls(self) -> bool:
        """The port serves TLS: its URLs are ``wss://`` and ``https://``."""
        return self.ssl_context is not None or self.certfile is not None

    def server_ssl(self) -> ssl.SSLContext | None:
        """The TLS context to listen with, loading ``certfile`` (OSError if it cannot)."""
        if self.ssl_context is not None or self.certfile is None:
            return self.ssl_context
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.certfile, self.keyfile)
        return context


def _network(cidr: str) -> str:
    """``cidr`` as an IP network (``10.0.0.0/8``, a bare address is a /32 or /128)."""
    try:
        return str(ipaddress.ip_network(cidr.strip(), strict=False))
    except ValueError:
        raise ValueError(f"trusted proxy {cidr!r} is not an IP network (CIDR)") from None
