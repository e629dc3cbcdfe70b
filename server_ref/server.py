"""The reference server: the asyncio driver that wires hub, broker, transport and app.

Every decision is the hub's (``core/hub.py``); this module only carries out
its commands. A transport (``transports/``) reports connections and frames
through the ``Endpoint`` methods (``opened``, ``received``, ``closed``); each
input goes to the hub with the time, then ``_pump`` executes what the hub
asked: frames are written through the connection's transport (one write per
loop pass), closes run as tracked tasks, and calls (broker methods, the
authenticator, join checks, handlers) are awaited and their results handed
back, in the coroutine that fed the input, so a client's frame is processed
before its transport reads the next, as before. Work that starts outside a
reader (a timer, a broker callback) runs in a tracked task. One ``call_at``
timer follows ``hub.get_timer()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from ssl import SSLContext
from typing import Any

from rtchat_sdk import protocol as p
from rtchat_sdk.errors import Forbidden
from rtchat_sdk.events import Event, event_name

from .app import Context, Namespace
from .broker import Broker, Draft, MemoryBroker, StreamEntry
from .calls import WITH_LISTENER, Authenticator, handle_now, run_call
from .config import ServerConfig
from .core.authz import RECEIVE
from .core.commands import (
    CALLS,
    Batching,
    BrokerCall,
    Call,
    Close,
    Deliver,
    Handle,
    Identity,
    Send,
)
from .core.hub import Hub
from .errors import BrokerUnavailable, FrameTooLarge
from .static import static_answer
from .transports.base import HttpAnswer, Listener, ListenerFactory, Transport
from .transports.websocket import websocket_listener

__all__ = ["Authenticator", "FrameTooLarge", "Identity", "Server", "ServerConfig"]

log = logging.getLogger("server_ref")


def _json_answer(status: int, body: dict[str, str]) -> HttpAnswer:
    return HttpAnswer(status, "application/json", json.dumps(body).encode())


class Server:
    """An embeddable rtchat server.

    ``await server.start(host, port)`` ... ``await server.close()``, or
    ``async with server.serving(host, port):``.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        broker: Broker | None = None,
        authenticate: Authenticator | None = None,
        clock: Callable[[], float] = time.monotonic,
        transport: ListenerFactory = websocket_listener,
        ssl: SSLContext | None = None,
    ) -> None:
        self.config = config or ServerConfig()
        if ssl is not None:  # serve TLS with the app's own context (ServerConfig.ssl_context)
            self.config = dataclasses.replace(self.config, ssl_context=ssl)
        self._make_listener = transport
        """What ``start`` listens with (``transports/``): WebSocket unless told otherwise."""
        self.broker = broker or MemoryBroker(
            history_size=self.config.history_size,
            history_seconds=self.config.history_seconds,
            dedupe_size=self.config.dedupe_size,
            clock=clock,
        )
        self.node = secrets.token_hex(8)
        """This node's id: the owner of the sessions whose connections it holds."""
        self._authenticate = authenticate
        self._clock = clock
        self._namespaces: dict[str, Namespace] = {}
        self.namespace(p.DEFAULT_NAMESPACE)
        self.hub = Hub(
            self.config,
            namespaces=self._namespaces,
            node=self.node,
            authenticates=authenticate is not None,
            answer_now=self.broker.answer_now,
            handle_now=partial(handle_now, self._namespaces, self),
            appends_remembered=self.broker.keeps_append_keys,
        )
        self._transports: dict[int, Transport] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closes: set[asyncio.Task[None]] = set()
        self._finished: dict[int, asyncio.Future[Any]] = {}
        self._listener: Listener | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._done: asyncio.Future[None] | None = None
        """What ``_pump`` returns when nothing is left to await (made in the loop)."""
        self._closing = False
        self._opened = False

    # ------------------------------------------------------------------
    # Handlers and namespaces

    def namespace(
        self, path: str, *, presence: bool | None = None, presence_events: bool | None = None
    ) -> Namespace:
        """The namespace at ``path``, created on first use; ``presence`` and
        ``presence_events`` (PROTOCOL §7.5) are set when given."""
        ns = self._namespaces.get(path)
        if ns is None:
            ns = self._namespaces[path] = Namespace(path)
            ns.time_every = self.config.request_timing_every
        if presence_events is not None:
            ns.presence_events = presence_events
            ns.presence = ns.presence or presence_events
        if presence is not None:
            ns.presence = presence
        return ns

    def on(self, event: str | type[Event]) -> Callable[[Any], Any]:
        """Register a handler in the default namespace ``/``."""
        return self._namespaces[p.DEFAULT_NAMESPACE].on(event)

    # ------------------------------------------------------------------
    # Running

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with port 0)."""
        if self._listener is None:
            raise RuntimeError("server is not started")
        return self._listener.port

    @property
    def url(self) -> str:
        scheme = "wss" if self.config.tls else "ws"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def listener(self) -> Listener | None:
        """The transport's listener once started (its own state, e.g. long polling)."""
        return self._listener

    async def open(self) -> None:
        """Start the broker and take connections, without listening on a port of its own.

        For a server whose connections come from another server (``server_ref.asgi``
        under uvicorn); ``start`` calls it. Calling it again does nothing.
        """
        if self._opened:
            return
        await self.broker.start(self._clock)
        await self.broker.watch_replaced(self.node, self._replaced)
        self._opened = True

    async def start(self, host: str = "127.0.0.1", port: int = 8765) -> None:
        """Start listening; returns once the socket is bound."""
        await self.open()
        listener = self._make_listener(self, self.config)
        await listener.start(host, port)
        self._listener = listener
        log.debug("rtchat server listening on %s:%s", host, self.port)

    @contextlib.asynccontextmanager
    async def serving(self, host: str = "127.0.0.1", port: int = 8765) -> AsyncIterator[Server]:
        """Run the server for the duration of an ``async with`` block."""
        await self.start(host, port)
        try:
            yield self
        finally:
            await self.close()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every session with GOING_AWAY, release the broker.

        Clients get ``timeout`` seconds to answer the close; then their
        connections are aborted.
        """
        if self._closing:
            return
        self._closing = True
        if self._listener is not None:
            self._listener.stop_accepting()
        self.hub.shutdown(self._clock())
        self._drain()
        if self._closes:
            _, late = await asyncio.wait(set(self._closes), timeout=timeout)
            if late:
                for transport in list(self._transports.values()):
                    transport.abort()
        if self._listener is not None:
            await self._listener.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self.broker.unwatch_replaced(self.node)
        await self.broker.close()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------
    # Server-side API

    async def publish(
        self,
        room: str,
        event: str | Event,
        data: Any = None,
        *,
        ns: str = p.DEFAULT_NAMESPACE,
        sender: str | None = None,
        echo: bool = False,
    ) -> int:
        """Append to a room's stream and deliver to its members; returns the offset.

        Raises ``FrameTooLarge`` or, for data holding NaN or an infinity,
        ``ValidationFailed``; nothing is appended then.
        """
        entry = await self._append(
            p.room_stream(ns, room), ns, room, event, data, sender=sender, echo=echo
        )
        return entry.offset

    async def send_to(
        self,
        session_id: str,
        event: str | Event,
        data: Any = None,
        *,
        ns: str = p.DEFAULT_NAMESPACE,
    ) -> int:
        """Append to one session's inbox and deliver it; returns the offset (raises as publish).

        With an ``authorize_receive`` hook in ``ns``, it is asked first, with the
        recipient's context (unknown on this node: no user, no claims), and a
        denial raises ``Forbidden`` (from a handler, the caller gets ``forbidden``).
        """
        space = self._namespaces.get(ns)
        if space is not None and RECEIVE in space.guards:
            session = self.hub.sessions.by_id.get(session_id)
            user, claims = (session.record.user, session.claims) if session else (None, {})
            ctx = Context(self, session_id, user, ns, claims)
            name = event_name(event)
            if not await space.authorize(RECEIVE, ctx, None, name):
                raise Forbidden(p.ErrorCode.FORBIDDEN, f"{session_id} may not receive {name!r}")
        entry = await self._append(p.inbox_stream(session_id), ns, None, event, data, sender=None)
        return entry.offset

    async def presence(self, ns: str, room: str) -> list[p.PresenceMember]:
        """Who is in a room of a namespace that keeps presence, across every node, oldest
        member first (PROTOCOL §7.5). Raises ``ValueError`` for one that keeps none."""
        return list(await self.broker.presence(self._presence_stream(ns, room)))

    async def presence_stats(self, ns: str, room: str) -> p.PresenceStats:
        """How many sessions, and distinct users, are in a room (as ``presence``)."""
        stream = self._presence_stream(ns, room)
        sessions, users = await self.broker.presence_stats(stream)
        return p.PresenceStats(stream=stream, sessions=sessions, users=users)

    def _presence_stream(self, ns: str, room: str) -> str:
        space = self._namespaces.get(ns)
        if space is None or not space.presence:
            raise ValueError(f"namespace {ns!r} keeps no presence: Namespace(presence=True)")
        return p.room_stream(ns, room)

    async def history(
        self,
        ns: str,
        room: str,
        *,
        since: p.Since | None = None,
        limit: int = 100,
        reverse: bool = False,
    ) -> p.History:
        """A page of what a room's stream keeps, as a client's ``history`` gets it (§7.6)."""
        if not 1 <= limit <= p.MAX_HISTORY_LIMIT:
            raise ValueError(f"limit must be from 1 to {p.MAX_HISTORY_LIMIT}, got {limit}")
        stream = p.room_stream(ns, room)
        at = None if since is None else (since.epoch, since.offset)
        page = await self.broker.history(stream, at, limit, reverse)
        entries = [p.MessageFrame.model_validate_json(e.text) for e in page.entries]
        return p.History(
            stream=stream,
            epoch=page.epoch,
            offset=page.offset,
            gap=page.gap,
            more=page.more,
            entries=entries,
        )

    async def join_session(self, session_id: str, ns: str, room: str) -> tuple[str, int]:
        """Put a session in a room (``Context.join``); returns the stream's position."""
        position: tuple[str, int] = await self._run(
            self.hub.join(session_id, ns, room, self._clock())
        )
        return position

    async def leave_session(self, session_id: str, ns: str, room: str) -> None:
        await self._run(self.hub.leave(session_id, ns, room, self._clock()))

    def session_ids(self) -> list[str]:
        return self.hub.session_ids()

    def not_ready(self) -> str | None:
        """Why this node should get no new clients now (``/readyz`` 503), or None."""
        if self._closing or self.hub.closing:
            return "shutting down"
        if not self._opened:
            return "not started"
        return self.broker.health()

    async def _run(self, op: int) -> Any:
        """Wait for an operation started on the hub to end; its result."""
        future = self._finished[op] = asyncio.get_running_loop().create_future()
        await self._pump()
        return await future

    async def _append(
        self,
        stream: str,
        ns: str,
        room: str | None,
        event: str | Event,
        data: Any,
        *,
        sender: str | None,
        echo: bool = False,
    ) -> StreamEntry:
        name = event_name(event)
        if name.startswith(p.RESERVED_EVENT_PREFIX):
            raise ValueError(f"event {name!r}: names starting with '$' are the server's own")
        draft = Draft.message(
            stream,
            ns=ns,
            room=room,
            event=name,
            data=p.jsonable(event if isinstance(event, Event) else data),
            sender=sender,
            echo=echo,
            max_bytes=self.config.max_frame_bytes,
        )
        return await self.broker.append(stream, draft)

    # ------------------------------------------------------------------
    # Endpoint: what transports call

    def http_get(self, path: str) -> HttpAnswer | None:
        """``/healthz``: 200 while the process serves; ``/readyz``: 200 only when ready;
        ``/metrics`` (``metrics.py``); ``/rtchat.js`` and, with ``demo`` on, ``/demo/``."""
        if path == "/healthz":
            return _json_answer(200, {"status": "live"})
        if path == "/readyz":
            reason = self.not_ready()
            if reason is not None:
                return _json_answer(503, {"status": "not ready", "reason": reason})
            return _json_answer(200, {"status": "ready"})
        if path == "/metrics" and self.config.metrics:
            from .metrics import scrape  # prometheus_client loads on the first scrape

            return scrape(self)
        return static_answer(path, demo=self.config.demo)

    def opened(self, transport: Transport) -> int:
        conn = self.hub.connection_opened(self._clock(), transport.bearer, transport.address)
        self._transports[conn] = transport
        self._drain()
        return conn

    def received(self, conn: int, text: str | bytes) -> Awaitable[None]:
        # Not a coroutine itself: mostly there is nothing to await (see _pump).
        self.hub.text_received(conn, text, self._clock())
        return self._pump()

    async def closed(self, conn: int, peer_code: int | None) -> None:
        self._transports.pop(conn, None)
        self.hub.connection_closed(conn, peer_code, self._clock())
        await self._pump()

    # ------------------------------------------------------------------
    # Broker callbacks

    def _on_entry(self, entry: StreamEntry) -> None:
        self.hub.entry_appended(entry)
        self._drain()

    def _replaced(self, session_id: str) -> None:
        self.hub.session_replaced(session_id, self._clock())
        self._drain()

    # ------------------------------------------------------------------
    # Executing the hub's commands

    def _pump(self) -> Awaitable[None]:
        """Carry out the hub's commands: the sync ones at once, the calls in order in
        the coroutine returned; without calls (the common case, handle_now) an
        awaitable already done, so a frame needs no coroutine of its own."""
        hub = self.hub
        # A frame's first step is mostly one call (take_call); after a call, mostly the answer.
        call = hub.take_call() or self._execute(spawn_calls=False)
        if call is not None:
            return self._await_calls(call)
        if hub.get_timer() != self._timer_at:  # _arm's own first test, without the call
            self._arm()
        done = self._done
        if done is None:
            done = self._done = asyncio.get_running_loop().create_future()
            done.set_result(None)
        return done

    async def _await_calls(self, first: Call) -> None:
        """Await an input's calls in order, each result back to the hub, then the timer."""
        hub = self.hub
        clock = self._clock
        call: Call | None = first
        while call is not None:
            # The two common calls first, without _outcome's dispatch.
            try:
                if type(call) is Handle and call.started is not None:  # from handle_now
                    result = await call.started
                elif type(call) is BrokerCall and call.method not in WITH_LISTENER:
                    result = await getattr(self.broker, call.method)(*call.args)
                else:
                    result = await self._outcome(call)
            except Exception as exc:
                if isinstance(exc, BrokerUnavailable):
                    hub.stats.broker_errors += 1
                hub.call_failed(call.op, exc, clock())
            else:
                hub.call_done(call.op, result, clock())
            call = self._execute(spawn_calls=False)
        if hub.get_timer() != self._timer_at:  # _arm's own first test, without the call
            self._arm()

    def _drain(self) -> None:
        """Carry out the hub's commands from outside a reader: calls run as tasks."""
        self._execute(spawn_calls=True)
        self._arm()

    def _execute(self, *, spawn_calls: bool) -> Call | None:
        """Run the sync commands; returns the first call unless ``spawn_calls``.

        Calls after the first (commands of independent operations) run in tasks.
        """
        first: Call | None = None
        transports = self._transports
        for cmd in self.hub.take_commands():
            if isinstance(cmd, Send):
                t = transports.get(cmd.conn)
                if t is not None:
                    for text in cmd.frames:
                        if text[9] in "eg":  # {"type":"error"... or "gap": counted (metrics)
                            self.hub.stats.frame_sent(text)
                        t.write(text.encode())
            elif isinstance(cmd, CALLS):
                if first is None and not spawn_calls:
                    first = cmd
                else:
                    self._spawn(self._call_then_pump(cmd))
            elif isinstance(cmd, Deliver):
                self._deliver(cmd)
            elif isinstance(cmd, Close):
                t = transports.get(cmd.conn)
                if t is not None:
                    task = asyncio.ensure_future(t.close(cmd.code, cmd.reason))
                    self._closes.add(task)
                    task.add_done_callback(self._closes.discard)
            elif isinstance(cmd, Batching):
                t = transports.get(cmd.conn)
                if t is not None:
                    t.batching = True
            else:
                future = self._finished.pop(cmd.op, None)
                if future is not None and not future.done():
                    if cmd.error is not None:
                        future.set_exception(cmd.error)
                    else:
                        future.set_result(cmd.result)
        return first

    def _deliver(self, cmd: Deliver) -> None:
        """One delivery to many connections: encoded once; slow consumers are cut off."""
        data = cmd.text.encode()
        limit = self.config.max_pending_bytes
        transports = self._transports
        stats = self.hub.stats
        stats.deliveries += len(cmd.conns)  # once per entry; the few not written taken off
        for conn in cmd.conns:
            t = transports.get(conn)
            if t is None:
                stats.deliveries -= 1
                continue
            if t.pending_bytes() > limit:
                stats.deliveries -= 1
                self.hub.connection_slow(conn, self._clock())
                continue
            t.write(data)

    async def _call(self, call: Call) -> None:
        """Run one call and hand its outcome back to the hub."""
        try:
            result = await self._outcome(call)
        except Exception as exc:
            if isinstance(exc, BrokerUnavailable):
                self.hub.stats.broker_errors += 1
            self.hub.call_failed(call.op, exc, self._clock())
        else:
            self.hub.call_done(call.op, result, self._clock())

    async def _call_then_pump(self, call: Call) -> None:
        await self._call(call)
        await self._pump()

    def _outcome(self, call: Call) -> Awaitable[Any]:
        return run_call(
            call,
            broker=self.broker,
            namespaces=self._namespaces,
            host=self,
            authenticate=self._authenticate,
            listener=self._on_entry,
        )

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------
    # The one timer

    def _arm(self) -> None:
        when = self.hub.get_timer()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is None:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + max(0.0, when - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.hub.handle_timer(self._clock())
        self._drain()
