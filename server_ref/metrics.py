"""Prometheus metrics at ``GET /metrics``: read from the server's own counters at scrape time.

The hub and its driver count in plain ints and dicts (``core/stats.py``),
namespaces time their handlers (``Namespace.timings``) and the Redis relay
its hand-overs; this module turns them into metric families only when
``/metrics`` is asked for (a custom collector, ``ServerCollector``), so the
hot path never touches ``prometheus_client`` and importing ``server_ref``
does not load it (``Server.http_get`` imports this module on the first
scrape). Gauges are counted from the hub's state then, not kept up to date.

Each ``Server`` has its own ``CollectorRegistry`` (tests run many servers
in one process; the global registry would mix them up or refuse the second).

Several worker processes behind one port (``uvicorn --workers``, gunicorn)
use prometheus_client's multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR``
is set: each worker copies its values into its own files there (``mirror``,
every ``MIRROR_INTERVAL`` seconds and before answering a scrape), and a
scrape of any worker answers the sum over every worker's files, with the
gauges of workers that are gone left out (docs/server.md, Metrics).
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .core.stats import Buckets
from .transports.base import HttpAnswer

if TYPE_CHECKING:
    from .server import Server

__all__ = ["MIRROR_INTERVAL", "TRANSPORTS", "ServerCollector", "mirror", "mirror_forever", "scrape"]

log = logging.getLogger("server_ref")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The classic text format, which every Prometheus reads (the names here need no escaping)."""

TRANSPORTS = ("websocket", "asgi-websocket", "polling")
"""The ``transport`` labels always shown (at 0 when none), so dashboards have a line each."""

MIRROR_INTERVAL = 1.0
"""Seconds between a worker's copies of its values in multiprocess mode: how stale the
other workers' part of a scrape may be."""

_registries: weakref.WeakKeyDictionary[Server, CollectorRegistry] = weakref.WeakKeyDictionary()
_mirrors: weakref.WeakKeyDictionary[Server, _Mirror] = weakref.WeakKeyDictionary()


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _by(name: str, doc: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(counts.items()):
        family.add_metric([key], value)
    return family


def _histogram(
    name: str, doc: str, labels: list[str], series: Iterable[tuple[list[str], Buckets]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, buckets in series:
        family.add_metric(values, buckets.cumulative(), buckets.total)
    return family


class ServerCollector(Collector):
    """The metric families of one server, made from its counters when collected."""

    def __init__(self, server: Server) -> None:
        self._server = weakref.ref(server)  # a registry kept alive must not keep the server

    def collect(self) -> Iterator[Metric]:
        server = self._server()
        if server is None:
            return
        hub, stats = server.hub, server.hub.stats
        kinds = dict.fromkeys(TRANSPORTS, 0)
        for transport in list(server._transports.values()):  # the driver's own table
            kinds[transport.kind] = kinds.get(transport.kind, 0) + 1
        connections = GaugeMetricFamily(
            "rtchat_connections", "Open client connections, by transport.", labels=["transport"]
        )
        for kind, count in kinds.items():
            connections.add_metric([kind], count)
        yield connections
        yield GaugeMetricFamily(
            "rtchat_sessions",
            "Sessions this node holds: attached, or detached and resumable here.",
            value=len(hub.sessions.by_id),
        )
        rooms = sum(1 for stream in list(hub.sessions.members) if stream.startswith("room:"))
        yield GaugeMetricFamily(
            "rtchat_rooms", "Room streams with members on this node (followed here).", value=rooms
        )
        yield _by(
            "rtchat_messages_received_total",
            "Client frames the hub took, by frame type (pings and pongs not counted).",
            "kind",
            stats.received,
        )
        yield _counter(
            "rtchat_deliveries_total",
            "Live room and inbox entries written to connections, one per recipient.",
            stats.deliveries,
        )
        yield _by("rtchat_errors_total", "Error frames sent, by error code.", "code", stats.errors)
        yield _counter(
            "rtchat_replays_total",
            "Resumes (hellos with stream positions) whose streams were replayed.",
            stats.replays,
        )
        yield _by("rtchat_gaps_total", "Gap frames sent, by reason.", "reason", stats.gaps)
        yield _counter(
            "rtchat_slow_consumers_total",
            "Connections closed with 4005: more unsent data than max_pending_bytes.",
            stats.slow_consumers,
        )
        yield _counter(
            "rtchat_broker_errors_total",
            "Broker calls that raised BrokerUnavailable (the store out of reach).",
            stats.broker_errors,
        )
        calls = CounterMetricFamily(
            "rtchat_handler_calls_total",
            "Request and emit handler calls, by namespace and event.",
            labels=["ns", "event"],
        )
        for path, space in list(server._namespaces.items()):
            for event, timing in sorted(space.timings.items()):
                calls.add_metric([path, event], timing.calls)
        yield calls
        yield _histogram(
            "rtchat_request_duration_seconds",
            "Time in request and emit handlers, by namespace and event: one call in"
            " request_timing_every (default 8) is timed.",
            ["ns", "event"],
            (
                ([path, event], buckets)
                for path, space in list(server._namespaces.items())
                for event, buckets in sorted(space.timings.items())
            ),
        )
        relay = server.broker.relay_stats()
        if relay is not None:
            yield _histogram(
                "rtchat_pubsub_lag_seconds",
                "Seconds from an entry's append to its hand-over by this node's pub/sub relay.",
                [],
                [([], relay.lag)],
            )
            yield _counter(
                "rtchat_pubsub_gap_fills_total",
                "Entries the pub/sub relay read from the log because pub/sub skipped them.",
                relay.gap_fills,
            )


def scrape(server: Server) -> HttpAnswer:
    """The answer to ``GET /metrics``: this server's metrics, or in multiprocess mode
    every worker's, summed."""
    path = _multiprocess_dir()
    registry = _registries.get(server)
    if registry is None:
        registry = _registries[server] = CollectorRegistry(auto_describe=False)
        if path is None:
            registry.register(ServerCollector(server))
            ProcessCollector(registry=registry)  # process_cpu_seconds_total, memory, fds
        else:
            from prometheus_client.multiprocess import MultiProcessCollector

            MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
    if path is not None:
        mirror(server)  # this worker's part fresh; the others' at most MIRROR_INTERVAL old
    return HttpAnswer(200, CONTENT_TYPE, generate_latest(registry))


# ----------------------------------------------------------------------
# Multiprocess mode


def _multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _Mirror:
    """One worker's values in its multiprocess files (prometheus_client's mmap format)."""

    def __init__(self, server: Server) -> None:
        from prometheus_client import values

        self._collector = ServerCollector(server)
        # The library's own class when it chose multiprocess mode at import (so an app's
        # own metrics share its files); else one of our own, from the same code.
        value_class: Any = values.ValueClass
        if not getattr(value_class, "_multiprocess", False):
            value_class = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        self._value_class = value_class
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        self._gauges: set[tuple[str, tuple[tuple[str, str], ...]]] = set()

    def write(self) -> None:
        """Copy every current value into this process's files (absolute values: each
        worker's file holds its own totals, which a scrape adds up)."""
        gauges: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        for family in self._collector.collect():
            below = 0.0  # histogram buckets are stored one by one, not cumulative
            for sample in family.samples:
                value = sample.value
                if family.type == "histogram":
                    if not sample.name.endswith(("_bucket", "_sum")):
                        continue  # _count is the sum of the buckets, made at collection
                    if sample.name.endswith("_bucket"):
                        value, below = value - below, value
                        if sample.labels["le"] == "+Inf":
                            below = 0.0
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if family.type == "gauge":
                    gauges.add(key)
                self._value(family, key).set(value)
        for key in self._gauges - gauges:  # a label that went away reads 0, not its last value
            self._values[key].set(0.0)
        self._gauges |= gauges

    def _value(self, family: Metric, key: tuple[str, tuple[tuple[str, str], ...]]) -> Any:
        value = self._values.get(key)
        if value is None:
            name, labels = key
            value = self._values[key] = self._value_class(
                family.type,
                family.name,
                name,
                tuple(label for label, _ in labels),
                tuple(text for _, text in labels),
                family.documentation,
                multiprocess_mode="livesum",  # gauges: summed over the workers alive
            )
        return value


def mirror(server: Server) -> None:
    """Write this worker's values to its multiprocess files now."""
    copy = _mirrors.get(server)
    if copy is None:
        copy = _mirrors[server] = _Mirror(server)
    copy.write()


def _forget_dead_workers(path: str) -> None:
    """Drop the live gauges of workers that died without saying so (killed, crashed):
    uvicorn restarts workers but calls no ``mark_process_dead``, so the survivors do."""
    from prometheus_client.multiprocess import mark_process_dead

    pids = {
        os.path.basename(name).rsplit("_", 1)[-1].removesuffix(".db")
        for name in glob.glob(os.path.join(path, "gauge_live*_*.db"))
    }
    for pid in pids:
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            mark_process_dead(int(pid), path)  # type: ignore[no-untyped-call]
        except PermissionError:
            continue  # alive, someone else's


async def mirror_forever(server: Server, interval: float = MIRROR_INTERVAL) -> None:
    """Keep this worker's part of the multiprocess files fresh until cancelled; then take
    its live gauges out (its connections are gone) and leave its counters, which stay
    part of the totals."""
    path = _multiprocess_dir()
    if path is None:
        return
    try:
        while True:
            try:
                mirror(server)
                _forget_dead_workers(path)
            except Exception:  # metrics must never take the server down
                log.exception("could not write the multiprocess metrics")
            await asyncio.sleep(interval)
    finally:
        from prometheus_client.multiprocess import mark_process_dead

        try:
            mirror(server)
            mark_process_dead(os.getpid(), path)  # type: ignore[no-untyped-call]
        except Exception:  # shutting down: say so, and go on closing
            log.exception("could not take this worker's gauges out of the multiprocess files")
