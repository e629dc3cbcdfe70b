"""What the server counts for its metrics: plain ints and dicts, no metrics library.

The hub and its driver add to a ``Stats`` on their paths (one increment per
message at most: a counter behind an attribute, or a dict entry); the
Prometheus collector (``server_ref/metrics.py``) reads them only when
``/metrics`` is scraped, so nothing on the hot path touches
``prometheus_client``, and a server that is never scraped pays for the
increments alone. Gauges (connections, sessions, rooms) are not kept here
at all: the collector counts them from the hub's own state at scrape time.

``Buckets`` is a histogram as fixed bucket counts, for the few observations
that are worth a ``bisect``: a handler call (kept by its ``Namespace``, which
knows its handlers, so a client's made-up event names add no labels) and a
Redis pub/sub hand-over (kept by the relay).
"""

from __future__ import annotations

from bisect import bisect_left

from rtchat_sdk import protocol as p

__all__ = ["DURATION_BOUNDS", "LAG_BOUNDS", "MESSAGE_KINDS", "Buckets", "Stats", "Timing"]

MESSAGE_KINDS = tuple(sorted(p.CLIENT_FRAME_TYPES - {"ping", "pong"}))
"""The client frames the hub takes, hello included (pings and pongs are answered by
the connection's core, uncounted): the labels of ``rtchat_messages_received_total``.
Every type the decoder can return is here, so the hub's ``+= 1`` never misses."""

DURATION_BOUNDS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds (seconds) of the handler-duration buckets: a sync handler takes
microseconds, one that calls a database milliseconds to seconds."""

LAG_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds (seconds) of the pub/sub lag buckets: Redis on a LAN hands an entry
over in well under a millisecond; seconds mean a backlog or a pub/sub outage."""


class Buckets:
    """One histogram: a count per bucket (not cumulative; the last is +Inf), and the sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        """The sum of the observed values."""

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound falls in that bound's bucket (le="bound").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus exposes them, ending with ``+Inf``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class Timing(Buckets):
    """One event's handler durations: every call counted, one in ``every`` timed.

    Reading the clock twice and bisecting costs a request more than the rest of
    its counting together (docs/performance.md), so the handlers' histogram is a
    sample (``ServerConfig.request_timing_every``); ``calls`` stays exact.
    """

    __slots__ = ("calls",)

    def __init__(self, bounds: tuple[float, ...]) -> None:
        super().__init__(bounds)
        self.calls = 0
        """Handler calls, timed or not (``rtchat_handler_calls_total``)."""


class Stats:
    """The counters of one server (one ``Hub``): each test's servers count apart."""

    __slots__ = (
        "broker_errors",
        "deliveries",
        "errors",
        "gaps",
        "received",
        "replays",
        "slow_consumers",
    )

    def __init__(self) -> None:
        self.received: dict[str, int] = dict.fromkeys(MESSAGE_KINDS, 0)
        """Client messages taken by the hub, by frame type (prefilled: ``+= 1`` only)."""
        self.deliveries = 0
        """Live entries written to connections, one per recipient (``Deliver``)."""
        self.errors: dict[str, int] = {}
        """Error frames written, by error code."""
        self.gaps: dict[str, int] = {}
        """Gap frames written, by reason."""
        self.replays = 0
        """Hellos with resume positions whose session was attached and replayed."""
        self.slow_consumers = 0
        """Connections closed with 4005 (too much unsent data)."""
        self.broker_errors = 0
        """Broker calls of the hub's operations that raised ``BrokerUnavailable``."""

    def frame_sent(self, text: str) -> None:
        """An error or gap frame was written (the driver calls this only for those)."""
        if text.startswith('{"type":"error"'):
            code = _field(text, '"code":"')
            self.errors[code] = self.errors.get(code, 0) + 1
        elif text.startswith('{"type":"gap"'):
            reason = _field(text, '"reason":"')
            self.gaps[reason] = self.gaps.get(reason, 0) + 1


def _field(text: str, key: str) -> str:
    """The string value after ``key`` in a frame the server encoded (compact JSON; codes
    and reasons are plain words, never escaped)."""
    start = text.find(key)
    if start < 0:
        return "unknown"
    start += len(key)
    end = text.find('"', start)
    return text[start:end] if end > start else "unknown"
