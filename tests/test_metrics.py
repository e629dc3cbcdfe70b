"""GET /metrics: known workloads against real servers, each counter checked exactly.

Servers run in-process with real clients (the SDK's, or a raw WebSocket where
a test needs frames the SDK never sends); ``/metrics`` is scraped over HTTP
and parsed with prometheus_client's own parser. The Redis tests use the
shared Redis with a prefix of their own; the multiprocess test runs uvicorn
with two workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from rtchat_sdk import Client, RemoteError
from rtchat_sdk import protocol as p
from server_ref import Context, MemoryBroker, Server, ServerConfig
from server_ref.__main__ import build_parser, config_from_args
from server_ref.asgi import uvicorn_listener
from server_ref.broker import Draft, StreamEntry
from server_ref.core.stats import LAG_BOUNDS, MESSAGE_KINDS, Buckets
from server_ref.errors import BrokerUnavailable, HandlerFailure
from server_ref.metrics import ServerCollector
from tests.conftest import make_server
from tests.faultproxy import FaultProxy
from tests.helpers import Inbox, free_port
from tests.redis_support import cleanup, new_prefix, require_redis

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    """Every sample of ``GET /metrics``, by (name, labels)."""
    async with httpx.AsyncClient(timeout=5) as http:
        answer = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a labelled counter that never counted (no sample yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def labelled(samples: Samples, name: str, label: str) -> dict[str, float]:
    """A counter's nonzero values by its one label."""
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name and v != 0.0}


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait for state the server reaches in its own time (a close it carries out)."""
    async with asyncio.timeout(timeout):
        while not await condition():  # noqa: ASYNC110 (server state with no event to await)
            await asyncio.sleep(0.02)


async def raw(url: str, **hello: Any) -> tuple[ClientConnection, dict[str, Any]]:
    """A WebSocket client that speaks frames itself: connected, hello sent, welcome read."""
    ws = await connect(url, proxy=None)
    await ws.send(json.dumps({"type": "hello", "protocol": 1, **hello}))
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


class RelayedBroker(MemoryBroker):
    """The memory broker, reporting relay counters as the Redis one does."""

    def __init__(self) -> None:
        super().__init__()
        self.stats = SimpleNamespace(gap_fills=2, lag=Buckets(LAG_BOUNDS))
        self.stats.lag.observe(0.003)

    def relay_stats(self) -> Any:
        return self.stats


def test_the_docs_and_the_dashboard_name_exactly_the_metrics_served() -> None:
    server = Server(broker=RelayedBroker())  # (the collector holds it weakly)
    families = list(ServerCollector(server).collect())
    served = {family.name for family in families}
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    samples = {f.name + end for f in families for end in suffixes[f.type]}
    pubsub = {f.name: f for f in families}["rtchat_pubsub_lag_seconds"].samples
    assert [s.value for s in pubsub if s.labels.get("le") in ("0.0025", "0.005")] == [0, 1]
    table = (ROOT / "docs" / "server.md").read_text()
    documented = set(re.findall(r"^\| `(rtchat_\w+)` \|", table, re.MULTILINE))
    # Counters are documented with their _total, as they are queried.
    assert documented == {f.name + ("_total" if f.type == "counter" else "") for f in families}
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    charted = {name for expr in exprs for name in re.findall(r"\b(?:rtchat|process)_\w+", expr)}
    assert charted - samples == {"process_cpu_seconds_total"}  # the process collector's
    assert {name for name in served if any(s.startswith(name) for s in charted)} == served


def test_every_frame_type_the_hub_takes_has_a_label() -> None:
    """The hub's ``received[kind] += 1`` must never meet a kind it was not given."""
    assert set(MESSAGE_KINDS) == p.CLIENT_FRAME_TYPES - {"ping", "pong"}


async def test_a_known_workload_is_counted_exactly(server: Server) -> None:
    alice, bob, carol = (Client(server.url) for _ in range(3))
    async with alice, bob, carol:
        inboxes = [Inbox(bob), Inbox(carol)]
        for i in range(3):
            assert await alice.request("echo", i) == i
        await alice.emit("echo", "x")
        with pytest.raises(RemoteError) as failed:
            await alice.request("fail", 1)
        assert failed.value.code == p.ErrorCode.HANDLER_ERROR
        for client in (alice, bob, carol):
            await client.join("r")
        for i in range(2):
            await alice.publish("r", "m", i)  # to bob and carol: alice asked for no echo
        for inbox in inboxes:
            assert await inbox.wait_for(2) == [0, 1]
        ws, _ = await raw(server.url)
        try:
            await ws.send("this is not JSON")
            error = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert error["code"] == p.ErrorCode.BAD_JSON
            got = await scrape(server.port)
        finally:
            await ws.close()

    assert labelled(got, "rtchat_messages_received_total", "kind") == {
        "hello": 4,
        "request": 4,
        "emit": 1,
        "join": 3,
        "publish": 2,
    }
    assert value(got, "rtchat_deliveries_total") == 4  # 2 publishes x 2 recipients
    assert labelled(got, "rtchat_errors_total", "code") == {"handler_error": 1, "bad_json": 1}
    assert value(got, "rtchat_connections", transport="websocket") == 4
    assert value(got, "rtchat_connections", transport="polling") == 0
    assert value(got, "rtchat_connections", transport="asgi-websocket") == 0
    assert value(got, "rtchat_sessions") == 4
    assert value(got, "rtchat_rooms") == 1
    assert value(got, "rtchat_handler_calls_total", ns="/", event="echo") == 4  # 3 req, 1 emit
    assert value(got, "rtchat_handler_calls_total", ns="/", event="fail") == 1
    duration = "rtchat_request_duration_seconds"  # one call in 8 timed: the first of each
    assert value(got, f"{duration}_count", ns="/", event="echo") == 1
    assert value(got, f"{duration}_count", ns="/", event="fail") == 1
    assert value(got, f"{duration}_bucket", ns="/", event="echo", le="+Inf") == 1
    assert 0 < value(got, f"{duration}_sum", ns="/", event="echo") < 10
    for name in ("replays", "slow_consumers", "broker_errors"):
        assert value(got, f"rtchat_{name}_total") == 0, name
    assert labelled(got, "rtchat_gaps_total", "reason") == {}
    assert not any(name.startswith("rtchat_pubsub") for name, _ in got)  # no relay in memory
    assert value(got, "process_cpu_seconds_total") > 0

    async def all_gone() -> bool:
        after = await scrape(server.port)
        return value(after, "rtchat_connections", transport="websocket") == 0

    await until(all_gone)


async def test_one_handler_call_in_request_timing_every_is_timed_and_every_one_counted() -> None:
    """The first call of each event, then every 8th; sync, async and failing alike."""
    server = Server(ServerConfig(request_timing_every=8))
    ns = server.namespace("/sampled")
    assert ns.time_every == 8
    assert server.namespace("/").time_every == 8

    @ns.on("sync")
    def sync(ctx: Context, data: Any) -> Any:
        return data

    @ns.on("slow")
    async def slow(ctx: Context, data: Any) -> Any:
        await asyncio.sleep(0)
        return data

    @ns.on("fails")
    def fails(ctx: Context, data: Any) -> Any:
        raise ValueError("no")

    ctx = Context(server, "s1", None, "/sampled")
    for i in range(17):
        assert await ns.call(ctx, "sync", i) == i
        assert await ns.call(ctx, "slow", i) == i
        with pytest.raises(HandlerFailure):
            await ns.call(ctx, "fails", i)
    for event in ("sync", "slow", "fails"):
        timing = ns.timings[event]
        assert timing.calls == 17, event
        assert sum(timing.counts) == 3, event  # calls 1, 9 and 17
        assert timing.total > 0, event
    every = Server(ServerConfig(request_timing_every=1)).namespace("/")
    every.on("e")(sync)
    for i in range(5):
        await every.call(ctx, "e", i)
    assert sum(every.timings["e"].counts) == every.timings["e"].calls == 5
    with pytest.raises(ValueError, match="request_timing_every must be positive"):
        ServerConfig(request_timing_every=0)


def test_the_asgi_apps_timing_variable_is_read_and_bad_values_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from server_ref.asgi import _default_server

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("RTCHAT_REQUEST_TIMING_EVERY", "3")
    assert _default_server().namespace("/").time_every == 3
    for bad, says in (("x", "whole number"), ("-1", "whole number"), ("0", "positive")):
        monkeypatch.setenv("RTCHAT_REQUEST_TIMING_EVERY", bad)
        with pytest.raises(ValueError, match=says):
            _default_server()


async def test_a_resume_past_the_history_is_one_replay_and_one_trimmed_gap() -> None:
    server = make_server(ServerConfig(history_size=2))
    await server.start("127.0.0.1", 0)
    try:
        for i in range(3):
            await server.publish("g", "m", i)  # nobody follows it: no deliveries
        epoch, _ = await server.broker.position(p.room_stream("/", "g"))
        position = {"stream": "room:/:g", "ns": "/", "room": "g", "epoch": epoch, "offset": 0}
        # A session this server never made: its rooms are restored, then replayed from 0.
        ws, _ = await raw(server.url, resume={"token": "lost-token", "streams": [position]})
        try:
            frames = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
            assert [f["type"] for f in frames] == ["gap", "message", "message"]
            assert frames[0]["reason"] == "trimmed"
            got = await scrape(server.port)
        finally:
            await ws.close()
        assert value(got, "rtchat_replays_total") == 1
        assert labelled(got, "rtchat_gaps_total", "reason") == {"trimmed": 1}
        assert value(got, "rtchat_deliveries_total") == 0  # replayed, not live
        assert labelled(got, "rtchat_messages_received_total", "kind") == {"hello": 1}
        assert labelled(got, "rtchat_errors_total", "code") == {}
    finally:
        await server.close()


async def test_a_consumer_that_stops_reading_counts_one_slow_consumer() -> None:
    server = make_server(ServerConfig(max_pending_bytes=256 * 1024))
    await server.start("127.0.0.1", 0)
    try:
        # max_queue=1: with one frame unread, websockets stops reading the socket, so
        # the server's send buffer fills (as in test_slow_consumer.py).
        slow = await connect(server.url, proxy=None, max_queue=1)
        await slow.send(json.dumps({"type": "hello", "protocol": 1}))
        await slow.send(json.dumps({"type": "join", "id": 1, "room": "firehose"}))
        async with Client(server.url) as publisher:
            await publisher.join("firehose")
            blob = "x" * 8192
            for i in range(2000):  # 16 MiB: far above every buffer on the way
                await publisher.publish("firehose", "blob", {"i": i, "blob": blob})
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(15):
                    while True:
                        await slow.recv()
            assert slow.close_code == p.CloseCode.SLOW_CONSUMER
            got = await scrape(server.port)
        assert value(got, "rtchat_slow_consumers_total") == 1
        assert 0 < value(got, "rtchat_deliveries_total") < 2000  # cut off on the way
        assert labelled(got, "rtchat_messages_received_total", "kind") == {
            "hello": 2,
            "join": 2,
            "publish": 2000,
        }
        assert labelled(got, "rtchat_errors_total", "code") == {}
    finally:
        await server.close(timeout=1)


class FlakyBroker(MemoryBroker):
    """The memory broker, whose next append fails as a Redis out of reach would."""

    fail_next = True

    async def append(self, stream: str, draft: Draft, key: str | None = None) -> StreamEntry:
        if self.fail_next:
            self.fail_next = False
            raise BrokerUnavailable("the store is out of reach (a test)")
        return await super().append(stream, draft, key)


async def test_a_broker_out_of_reach_counts_a_broker_error_and_the_unavailable_answer() -> None:
    server = Server(ServerConfig(unavailable_retry_after=0.05), broker=FlakyBroker())
    await server.start("127.0.0.1", 0)
    try:
        async with Client(server.url) as client:
            await client.join("r")
            await client.publish("r", "m", 1)  # refused once (unavailable), resent, appended
            got = await scrape(server.port)
        assert value(got, "rtchat_broker_errors_total") == 1
        assert labelled(got, "rtchat_errors_total", "code") == {"unavailable": 1}
        assert value(got, "rtchat_messages_received_total", kind="publish") == 2
    finally:
        await server.close()


async def test_the_asgi_app_under_uvicorn_serves_metrics_and_names_its_transports() -> None:
    server = make_server()
    server._make_listener = uvicorn_listener  # rtchat-server --asgi
    await server.start("127.0.0.1", 0)
    try:
        async with Client(server.url) as ws, Client(server.url, transports=["polling"]) as poll:
            assert await ws.request("echo", 1) == 1
            assert await poll.request("echo", 2) == 2
            assert poll.transport == "polling"
            got = await scrape(server.port)
        assert value(got, "rtchat_connections", transport="asgi-websocket") == 1
        assert value(got, "rtchat_connections", transport="polling") == 1
        assert value(got, "rtchat_connections", transport="websocket") == 0
        assert value(got, "rtchat_messages_received_total", kind="request") == 2
    finally:
        await server.close()


async def test_no_metrics_answers_404() -> None:
    parser = build_parser()
    config = config_from_args(parser, parser.parse_args(["--no-metrics"]))
    assert config.metrics is False
    assert config_from_args(parser, parser.parse_args([])).metrics is True
    server = make_server(config)
    await server.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            answer = await http.get(f"http://127.0.0.1:{server.port}/metrics")
        assert answer.status_code == 404
    finally:
        await server.close()


def test_importing_the_server_does_not_load_prometheus_client() -> None:
    """Covered for the package by test_layering; here: a server that is never scraped."""
    code = (
        "import sys, asyncio\n"
        "from server_ref import Server\n"
        "async def main():\n"
        "    s = Server(); await s.start('127.0.0.1', 0); await s.close()\n"
        "asyncio.run(main())\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "False"


@pytest.mark.redis
async def test_redis_pubsub_lag_and_gap_fills_are_counted_per_node() -> None:
    from server_ref.broker.redis import RedisBroker

    url = await require_redis()
    prefix = new_prefix()
    target = urlsplit(url)
    proxy = FaultProxy(target.port or 6379, target.hostname or "127.0.0.1")
    await proxy.start()
    proxied = target._replace(netloc=f"{target.netloc.rpartition('@')[0]}@127.0.0.1:{proxy.port}")
    probes: dict[str, Any] = {"prefix": prefix, "probe_interval": 0.1, "probe_timeout": 0.5}
    # Node a reaches Redis through a proxy that can swallow its pub/sub; node b does not.
    node_a = Server(broker=RedisBroker(urlunsplit(proxied).replace("//@", "//"), **probes))
    node_b = Server(broker=RedisBroker(url, **probes))
    await node_a.start("127.0.0.1", 0)
    await node_b.start("127.0.0.1", 0)
    try:
        async with Client(node_a.url) as client:
            received = Inbox(client)
            await client.join("r")
            await node_b.publish("r", "m", 0)
            await received.wait_for(1)
            first = await scrape(node_a.port)
            assert value(first, "rtchat_pubsub_lag_seconds_count") == 1
            assert value(first, "rtchat_pubsub_lag_seconds_bucket", le="+Inf") == 1
            assert 0 <= value(first, "rtchat_pubsub_lag_seconds_sum") < 5
            assert value(first, "rtchat_pubsub_gap_fills_total") == 0

            proxy.blackhole(True)  # node a's pub/sub hears nothing of the next 50
            for i in range(1, 51):
                await node_b.publish("r", "m", i)

            async def not_ready() -> bool:
                return node_a.not_ready() is not None

            async def ready() -> bool:
                return node_a.not_ready() is None

            await until(not_ready)
            proxy.end_blackhole()
            await until(ready)
            assert await received.wait_for(51) == list(range(51))
            got = await scrape(node_a.port)
            other = await scrape(node_b.port)
        assert value(got, "rtchat_pubsub_gap_fills_total") == 50  # read from the log
        assert value(got, "rtchat_pubsub_lag_seconds_count") == 51  # each handed over once
        assert value(got, "rtchat_deliveries_total") == 51
        assert value(got, "rtchat_broker_errors_total") == 0  # the hub asked nothing meanwhile
        # Per node: b relayed nothing (nobody follows r there) and delivered nothing.
        assert value(other, "rtchat_pubsub_lag_seconds_count") == 0
        assert value(other, "rtchat_deliveries_total") == 0
    finally:
        await node_a.close()
        await node_b.close()
        await proxy.close()
        await cleanup(url, prefix)


async def test_uvicorn_workers_share_one_scrape_in_multiprocess_mode(tmp_path: Path) -> None:
    """Two workers behind one port, PROMETHEUS_MULTIPROC_DIR set: any worker's scrape
    counts every worker's clients; a stopped worker takes its live gauges with it."""
    pytest.importorskip("uvicorn")
    files = tmp_path / "metrics"
    files.mkdir()
    port = free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(files)}
    env["RTCHAT_REQUEST_TIMING_EVERY"] = "1"  # every call timed: the count is exact
    env.pop("REDIS_URL", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvicorn",
        "server_ref.asgi:app",
        "--workers",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        async def both_workers_write() -> bool:
            return len(list(files.glob("gauge_livesum_*.db"))) == 2

        await until(both_workers_write, timeout=30)
        clients = [Client(f"ws://127.0.0.1:{port}", transports=["websocket"]) for _ in range(6)]
        for client in clients:
            await client.connect()
            assert await client.request("echo", 1) == 1

        async def all_counted() -> bool:
            got = await scrape(port)  # whichever worker answers, the sum of both
            return (
                value(got, "rtchat_messages_received_total", kind="request") == 6
                and value(got, "rtchat_connections", transport="asgi-websocket") == 6
            )

        await until(all_counted)
        for client in clients:
            await client.close()

        async def none_left() -> bool:
            got = await scrape(port)
            return value(got, "rtchat_connections", transport="asgi-websocket") == 0

        await until(none_left)
        got = await scrape(port)
        assert value(got, "rtchat_messages_received_total", kind="hello") == 6
        assert value(got, "rtchat_handler_calls_total", ns="/", event="echo") == 6
        assert value(got, "rtchat_request_duration_seconds_count", ns="/", event="echo") == 6
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    # A graceful stop takes each worker's live gauges out; its counters stay.
    assert list(files.glob("gauge_livesum_*.db")) == []
    assert len(list(files.glob("counter_*.db"))) == 2
