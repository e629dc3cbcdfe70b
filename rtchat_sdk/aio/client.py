"""The asyncio client: a thin driver around the sans-I/O ``ClientSession``.

The driver owns three tasks per client, all tracked and cancelled on close:
the connection manager (connect, serve, back off, reconnect), the writer of
the current connection, and the dispatcher that hands deliveries to
handlers one after another, in stream order. Deliveries queue between the
reader and the dispatcher, so a handler may itself ``await client.request()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar, overload

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError, to_json
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.protocol import State

from .. import protocol as p
from ..backoff import ReconnectPolicy
from ..core import (
    ClientSession,
    Delivered,
    Dropped,
    Failed,
    GapReported,
    LinkDead,
    ProtocolViolation,
    Refused,
    Replied,
    RoundTrip,
    ServerNotice,
    SessionEvent,
    TimedOut,
    Welcomed,
)
from ..errors import (
    AckTimeout,
    ClientClosed,
    ConnectionFailed,
    ConnectionLost,
    FatalConnectionError,
    GaveUp,
    IncompatibleProtocol,
    MessageDropped,
    MessageExpired,
    RTChatError,
    SessionReplaced,
    Unauthorized,
    ValidationFailed,
    remote_error,
)
from ..events import Event, event_name, validate_payload
from ..outbox import Outbox, OverflowPolicy
from .endpoint import ProxySetting, check_url, choose_proxy, describe_failure
from .handlers import ErrorCallback, HandlerRegistry

__all__ = [
    "AttemptCallback",
    "Client",
    "ConnectionState",
    "GapCallback",
    "NamespaceClient",
    "StateCallback",
]

log = logging.getLogger("rtchat_sdk")

T = TypeVar("T", bound=BaseModel)
H = TypeVar("H", bound=Callable[..., Any])


class ConnectionState(StrEnum):
    """What the client is doing about its connection."""

    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


StateCallback = Callable[[ConnectionState], Any]
GapCallback = Callable[[GapReported], Any]
AttemptCallback = Callable[[int, str], Any]

_FATAL_CLOSE = {
    p.CloseCode.UNAUTHORIZED: Unauthorized,
    p.CloseCode.UNSUPPORTED_PROTOCOL: IncompatibleProtocol,
    p.CloseCode.SESSION_REPLACED: SessionReplaced,
}


class NamespaceClient:
    """The messaging API bound to one namespace of a client's connection."""

    def __init__(self, client: Client, path: str) -> None:
        if not path.startswith("/"):
            raise ValueError(f"namespace must start with '/': {path!r}")
        self._client = client
        self.path = path

    async def join(self, room: str) -> None:
        """Join ``room``; deliveries start after the position returned by the server."""
        c = self._client
        await c._send(lambda now: c._session.join(self.path, room, now=now))

    async def leave(self, room: str) -> None:
        c = self._client
        await c._send(lambda now: c._session.leave(self.path, room, now=now))

    async def publish(
        self,
        room: str,
        event: str | Event,
        data: Any = None,
        *,
        echo: bool = False,
        expires_in: float | None = None,
    ) -> int:
        """Publish to a room; returns the stream offset once the server has it."""
        c = self._client
        name, payload = _event_and_data(event, data)
        reply = await c._send(
            lambda now: c._session.publish(
                self.path, room, name, payload, now=now, echo=echo, expires_in=expires_in
            )
        )
        return int(reply["offset"]) if isinstance(reply, dict) else 0

    async def emit(
        self, event: str | Event, data: Any = None, *, expires_in: float | None = None
    ) -> None:
        """Send to a server handler and wait until the server acknowledges it."""
        c = self._client
        name, payload = _event_and_data(event, data)
        await c._send(
            lambda now: c._session.emit(self.path, name, payload, now=now, expires_in=expires_in)
        )

    @overload
    async def request(
        self,
        event: str | Event,
        data: Any = None,
        *,
        response: type[T],
        timeout: float | None = None,
    ) -> T: ...

    @overload
    async def request(
        self,
        event: str | Event,
        data: Any = None,
        *,
        response: None = None,
        timeout: float | None = None,
    ) -> Any: ...

    async def request(
        self,
        event: str | Event,
        data: Any = None,
        *,
        response: type[T] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Call a server handler and return its reply (validated into ``response``).

        ``timeout`` defaults to the client's ``request_timeout``; when it runs
        out, ``AckTimeout`` is raised and the request is never sent later.
        """
        c = self._client
        name, payload = _event_and_data(event, data)
        wait = c.request_timeout if timeout is None else timeout
        reply = await c._send(
            lambda now: c._session.request(self.path, name, payload, now=now, timeout=wait)
        )
        if response is None:
            return reply
        return validate_payload(response, reply)

    def on(self, event: str | type[Event]) -> Callable[[H], H]:
        """Decorator: call the handler for each delivery of ``event`` ("*": all)."""

        def register(func: H) -> H:
            self._client._handlers.add(self.path, event, func)
            return func

        return register

    def off(self, event: str | type[Event], func: Callable[..., Any]) -> None:
        self._client._handlers.remove(self.path, event, func)


class Client(NamespaceClient):
    """An rtchat client. Use ``async with Client(url) as client:``."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        auth: dict[str, Any] | None = None,
        reconnect: ReconnectPolicy | None = None,
        outbox: Outbox | None = None,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_in_flight: int = 1_000,
        max_frame_bytes: int = 1024 * 1024,
        max_pending_deliveries: int = 10_000,
        retry_first_connect: bool = False,
        name: str = "rtchat-python",
        compression: bool = False,
        proxy: ProxySetting = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(self, p.DEFAULT_NAMESPACE)
        self.urls = [check_url(u) for u in ([url] if isinstance(url, str) else list(url))]
        if not self.urls:
            raise ValueError("at least one URL is needed")
        self.proxy = proxy
        _check_auth(auth)
        """True: the proxy the environment names (HTTPS_PROXY, ALL_PROXY, NO_PROXY...);
        a URL: that proxy; None: always connect directly."""
        self.reconnect = reconnect or ReconnectPolicy()
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.max_frame_bytes = max_frame_bytes
        self.compression = compression
        """Ask for permessage-deflate (used only if the server enables it too)."""
        if max_pending_deliveries < 1:
            raise ValueError("max_pending_deliveries must be at least 1")
        self.max_pending_deliveries = max_pending_deliveries
        self._reading_paused = False
        self._handlers_caught_up = asyncio.Event()
        self.retry_first_connect = retry_first_connect
        self._clock = clock
        self._session = ClientSession(
            outbox=outbox,
            auth=auth,
            client_name=name,
            max_in_flight=max_in_flight,
            handshake_timeout=connect_timeout,
        )
        self._handlers = HandlerRegistry()
        self._state = ConnectionState.IDLE
        self._state_callbacks: list[StateCallback] = []
        self._error_callbacks: list[ErrorCallback] = []
        self._gap_callbacks: list[GapCallback] = []
        self._attempt_callbacks: list[AttemptCallback] = []
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._rtt_waiters: list[asyncio.Future[float]] = []
        # Deliveries and gap notices, in stream order, for the dispatcher.
        self._deliveries: asyncio.Queue[p.MessageFrame | GapReported | _Unfinished | None] = (
            asyncio.Queue()
        )
        self._undispatched = 0
        self._ws: ClientConnection | None = None
        self._wakeup = asyncio.Event()  # set when the transport pushes back
        self._write_blocked = False
        self._flush_handle: asyncio.Handle | None = None
        self._space_freed = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._runner: asyncio.Task[None] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._first_welcome: asyncio.Future[None] | None = None
        self._closing = False
        self._dispatch_ending = False
        self._welcomed_here = False
        self._fatal: RTChatError | None = None
        self._retry_after: float | None = None
        self._failed_attempts = 0
        self._failure_log = _FailureLog(clock)
        self.closed_reason: RTChatError | None = None

    # ------------------------------------------------------------------
    # Observable state

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def session_id(self) -> str | None:
        return self._session.session_id

    @property
    def rtt(self) -> float | None:
        """Last measured heartbeat round trip, in seconds."""
        return self._session.rtt

    async def ping(self) -> float:
        """Measure one round trip to the server now, in seconds."""
        if self._state is not ConnectionState.CONNECTED:
            raise ConnectionLost("not connected")
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._rtt_waiters.append(future)
        self._session.ping(self._clock())
        self._after_io()
        return await future

    @property
    def outbox_size(self) -> int:
        return len(self._session.outbox)

    @property
    def counters(self) -> dict[str, int]:
        """What reliability work happened; each key is defined in docs/client.md."""
        c = self._session.counters
        return {
            "sent": c.sent,
            "resent": c.resent,
            "duplicates_dropped": c.duplicates_dropped,
            "gaps": c.gaps,
            "timed_out": c.timed_out,
            "dropped": c.dropped,
            "connections": c.connections,
            "reconnects": max(0, c.connections - 1),
            "failed_attempts": self._failed_attempts,
            "outbox_size": len(self._session.outbox),
        }

    def on_state_change(self, callback: StateCallback) -> StateCallback:
        self._state_callbacks.append(callback)
        return callback

    def on_error(self, callback: ErrorCallback) -> ErrorCallback:
        """Called with invalid deliveries, handler failures and server notices."""
        self._error_callbacks.append(callback)
        return callback

    def on_gap(self, callback: GapCallback) -> GapCallback:
        """Called when the server says part of a stream cannot be replayed."""
        self._gap_callbacks.append(callback)
        return callback

    def on_attempt(self, callback: AttemptCallback) -> AttemptCallback:
        """Called as each connection attempt starts, with ``(attempt, url)``.

        ``attempt`` is 1 for the first try since the client started or since
        its last connection ended, 2 for the retry after one backoff wait, and
        so on: a way to watch (and measure) how reconnections are spread.
        """
        self._attempt_callbacks.append(callback)
        return callback

    def namespace(self, path: str) -> NamespaceClient:
        """The same API on another namespace, over the same connection."""
        return NamespaceClient(self, path)

    # ------------------------------------------------------------------
    # Life cycle

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect and wait for the server's welcome (or raise why not)."""
        if self._state is ConnectionState.CLOSED:
            raise ClientClosed("this client was closed; make a new one")
        if self._runner is None:
            loop = asyncio.get_running_loop()
            self._first_welcome = loop.create_future()
            self._runner = asyncio.create_task(self._run(), name="rtchat-connection")
            self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="rtchat-dispatch")
        welcome = self._first_welcome
        assert welcome is not None
        try:
            await asyncio.shield(welcome)
        except BaseException:
            await self.close()
            if welcome.done() and not welcome.cancelled():
                welcome.exception()  # retrieved: our caller gets its own exception
            raise

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until the outbox is empty: everything sent has been answered."""
        async with asyncio.timeout(timeout):
            while len(self._session.outbox) and not self._closing:
                self._space_freed.clear()
                await self._space_freed.wait()

    async def close(self) -> None:
        """Close for good; waiting calls get ClientClosed.

        With an empty outbox the server ends the session. With messages still
        unanswered (kept by a persistent outbox for the next run) the session
        is left resumable for the server's ``session_ttl``, so the next run
        resumes it and the server's dedupe still applies.

        When it returns, every task the client started has finished, however
        the client got here (a failed connect, a fatal refusal, an earlier
        ``close``); handlers of deliveries already received get up to 5 s.
        """
        ws = None if self._closing else self._ws
        self._closing = True
        if ws is not None:
            if len(self._session.outbox):
                code, reason = p.CloseCode.GOING_AWAY, "client closed with unanswered messages"
            else:
                code, reason = p.CloseCode.NORMAL, "client closed"
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code, reason), 5.0)
        runner = self._runner
        if runner is not None and runner is not asyncio.current_task():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        self._finish(self._fatal or ClientClosed("the client was closed"))
        dispatcher = self._dispatcher
        if dispatcher is not None and dispatcher is not asyncio.current_task():
            try:
                await asyncio.wait_for(dispatcher, 5.0)
            except TimeoutError:
                log.warning("handlers did not finish within 5 s of close; cancelled")

    def _finish(self, reason: RTChatError) -> None:
        """Fail everything still waiting, once, and settle into CLOSED."""
        self._closing = True
        if self.closed_reason is None:
            self.closed_reason = reason
        self._session.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for future in [*self._pending.values(), *self._rtt_waiters]:
            if not future.done():
                future.set_exception(reason)
        self._pending.clear()
        self._rtt_waiters.clear()
        if self._first_welcome is not None and not self._first_welcome.done():
            self._first_welcome.set_exception(reason)
        self._space_freed.set()
        if not self._dispatch_ending:
            # The dispatcher hands out what was received, then ends by itself,
            # so no task outlives a client that stopped (even one never closed).
            self._dispatch_ending = True
            self._deliveries.put_nowait(None)
        self._set_state(ConnectionState.CLOSED)

    def _set_state(self, state: ConnectionState) -> None:
        if state is self._state:
            return
        self._state = state
        for callback in list(self._state_callbacks):
            try:
                callback(state)
            except Exception:
                log.exception("state callback raised")

    # ------------------------------------------------------------------
    # Sending

    async def _send(self, op: Callable[[float], tuple[int, list[Dropped]]]) -> Any:
        if self._closing:
            raise ClientClosed("the client is closed")
        if self._runner is None:
            raise ClientClosed("the client is not connected; use 'async with Client(...)'")
        outbox = self._session.outbox
        if outbox.policy is OverflowPolicy.BLOCK:
            while not outbox.fits(1) and not self._closing:
                self._space_freed.clear()
                await self._space_freed.wait()
            if self._closing:
                raise self.closed_reason or ClientClosed("the client is closed")
        message_id, dropped = op(self._clock())
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        for d in dropped:
            self._fail(d.id, MessageDropped(f"{d.kind} {d.id} evicted from the full outbox"))
        self._after_io()
        return await future

    def _fail(self, message_id: int, exc: RTChatError) -> None:
        future = self._pending.pop(message_id, None)
        if future is not None and not future.done():
            future.set_exception(exc)

    # ------------------------------------------------------------------
    # The connection manager

    async def _run(self) -> None:
        policy = self.reconnect
        delays = policy.delays()
        failures = 0
        failing_since: float | None = None
        index = 0
        attempt = 0
        ever_welcomed = False
        while not self._closing:
            url = self.urls[index % len(self.urls)]
            self._set_state(
                ConnectionState.RECONNECTING if ever_welcomed else ConnectionState.CONNECTING
            )
            attempt += 1
            for callback in list(self._attempt_callbacks):
                try:
                    callback(attempt, url)
                except Exception:
                    log.exception("attempt callback raised")
            started = self._clock()
            error = await self._connect_once(url)
            if self._closing:
                return
            if self._welcomed_here:
                ever_welcomed = True
                attempt = 0
                if self._clock() - started >= policy.stable_after:
                    delays, failures, failing_since = policy.delays(), 0, None
            else:
                self._failed_attempts += 1
            if self._fatal is not None or not policy.classify(error):
                self._finish(self._fatal or error)
                return
            if not ever_welcomed and not self.retry_first_connect:
                self._finish(error)
                return
            if not policy.enabled:
                self._finish(error)
                return
            failures += 1
            failing_since = failing_since if failing_since is not None else started
            elapsed = self._clock() - failing_since
            if (policy.max_attempts is not None and failures >= policy.max_attempts) or (
                policy.max_elapsed is not None and elapsed >= policy.max_elapsed
            ):
                self._finish(
                    GaveUp(f"gave up after {failures} attempt(s) over {elapsed:.1f}s: {error}")
                )
                return
            if not self._welcomed_here:
                index += 1  # this URL failed: try the next one
            delay = next(delays)
            if self._retry_after is not None:
                # The server asked for a pause: wait it out, then add our jitter so
                # everyone it sent away does not come back in the same instant.
                delay += self._retry_after
                self._retry_after = None
            self._failure_log.report(
                error,
                lost=self._welcomed_here,
                next_url=self.urls[index % len(self.urls)],
                delay=delay,
            )
            await asyncio.sleep(delay)

    async def _connect_once(self, url: str) -> RTChatError:
        """One connection, from TCP connect to its end; returns why it ended."""
        self._welcomed_here = False
        proxy = None
        try:
            proxy = choose_proxy(url, self.proxy)
            ws = await connect(
                url,
                open_timeout=self.connect_timeout,
                ping_interval=None,  # rtchat heartbeats run at the app level
                compression="deflate" if self.compression else None,
                max_size=self.max_frame_bytes,
                proxy=proxy,
            )
        except (OSError, TimeoutError, WebSocketException, ImportError, ValueError) as exc:
            why = describe_failure(exc, url, timeout=self.connect_timeout, proxy=proxy)
            return ConnectionFailed(f"cannot connect to {url}: {why}")
        self._ws = ws
        self._write_blocked = False
        self._wakeup.clear()
        self._cancel_flush()
        self._session.connection_made(self._clock())
        writer = asyncio.create_task(self._write_loop(ws), name="rtchat-writer")
        self._after_io()
        try:
            async for text in ws:
                self._session.receive_text(text, self._clock())
                self._after_io()
                if self._deliveries.qsize() >= self.max_pending_deliveries:
                    await self._wait_for_handlers()
        except ConnectionClosed:
            pass
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            self._ws = None
            self._cancel_flush()
            if not self._closing:
                self._session.connection_lost(self._clock())
                self._after_io()
        code = ws.close_code
        sent = ws.protocol.close_sent
        if sent is not None and sent.code == p.CloseCode.MESSAGE_TOO_BIG and self._fatal is None:
            # We refused a frame over our own limit: resuming would replay it forever.
            self._fatal = FatalConnectionError(
                "message_too_big",
                f"the server sent a frame over max_frame_bytes={self.max_frame_bytes}; "
                "use at least the server's limit",
            )
        if code in _FATAL_CLOSE and self._fatal is None:
            self._fatal = _FATAL_CLOSE[p.CloseCode(code)](
                "refused", ws.close_reason or f"closed with code {code}"
            )
        return ConnectionFailed(f"connection to {url} closed (code {code}: {ws.close_reason})")

    def _flush(self) -> None:
        """Write every frame the session produced, in order: the one write path.

        Frames are framed with ``ws.protocol.send_text`` and handed to the
        transport in one ``write`` (one system call), as websockets'
        ``broadcast()`` does. The first frames of an event-loop pass are
        written at once (a lone request costs no hop through another task);
        whatever the same pass produces after them is written together by one
        callback at the start of the next pass, so a burst of requests (or of
        pongs) shares a system call. While the transport's buffer is above its
        high-water mark nothing is written: frames stay queued in the session,
        in order, until the writer task has waited for the transport to drain.
        A connection that is closing takes no frames: whatever was unanswered
        is written again on the next connection.
        """
        ws = self._ws
        if (
            ws is None
            or self._flush_handle is not None
            or self._write_blocked
            or not self._session.has_data_to_send()
        ):
            return
        frames = self._session.data_to_send()
        transport = ws.transport
        if ws.protocol.state is not State.OPEN or transport.is_closing():
            return
        protocol = ws.protocol
        for text in frames:
            protocol.send_text(text.encode())
        chunks = protocol.data_to_send()
        if all(chunks):
            transport.write(b"".join(chunks))
        else:  # an end-of-stream marker among them (never after send_text): websockets' way
            protocol.writes[:0] = chunks
            ws.send_data()
        if ws.paused:
            self._write_blocked = True
            self._wakeup.set()
        else:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_next_pass)

    def _flush_next_pass(self) -> None:
        self._flush_handle = None
        self._flush()

    def _cancel_flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    async def _write_loop(self, ws: ClientConnection) -> None:
        """Wait out the transport's back-pressure, then write what queued meanwhile."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await ws.drain()
            self._write_blocked = False
            self._flush()

    def _after_io(self) -> None:
        """Act on the session's events, write what is due, re-arm the timer."""
        for event in self._session.events_received():
            self._on_event(event)
        self._flush()
        if self._closing:
            return
        when = self._session.get_timer()
        if when == self._timer_when:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_when = when
        if when is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + max(0.0, when - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = None
        now = self._clock()
        if self._reading_paused:
            self._session.keepalive(now)  # our handlers are slow, the link is not dead
        self._session.handle_timer(now)
        self._after_io()

    def _on_event(self, event: SessionEvent) -> None:
        match event:
            case Replied(id=message_id, data=data):
                future = self._pending.pop(message_id, None)
                if future is not None and not future.done():
                    future.set_result(data)
                self._space_freed.set()
            case Delivered(frame=frame):
                if self._undispatched:
                    # Behind what is queued: handled, and its position persisted, in order.
                    self._dispatch_later(frame)
                else:
                    self._handle_now(frame)
            case Failed(id=message_id, code=code, message=message, details=details):
                self._fail(message_id, remote_error(code, message, details))
                self._space_freed.set()
            case TimedOut(id=message_id, kind=kind):
                if kind == "request":
                    self._fail(message_id, AckTimeout(f"no reply to request {message_id} in time"))
                else:
                    self._fail(
                        message_id,
                        MessageExpired(
                            f"{kind} {message_id} expired before the server acknowledged it "
                            "(if it was sent, it may have been processed)"
                        ),
                    )
                self._space_freed.set()
            case Welcomed():
                self._welcomed_here = True
                self._set_state(ConnectionState.CONNECTED)
                if self._first_welcome is not None and not self._first_welcome.done():
                    self._first_welcome.set_result(None)
            case Refused(code=code, message=message, fatal=fatal, retry_after=retry_after):
                if fatal:
                    cls = Unauthorized if code == p.ErrorCode.UNAUTHORIZED else IncompatibleProtocol
                    self._fatal = cls(code, message)
                else:
                    self._retry_after = retry_after  # e.g. overloaded: come back later
            case ServerNotice(code=code, message=message, retry_after=retry_after):
                if retry_after is not None:
                    self._retry_after = retry_after
                self._report(remote_error(code, message))
            case GapReported():
                log.warning(
                    "gap in %s (%s): carrying on after %s:%d",
                    event.stream,
                    event.reason,
                    event.epoch,
                    event.offset,
                )
                self._dispatch_later(event)
            case LinkDead(reason=reason):
                log.warning("connection declared dead: %s", reason)
                if self._ws is not None and self._ws.transport is not None:
                    self._ws.transport.abort()
            case RoundTrip(seconds=seconds):
                waiters, self._rtt_waiters = self._rtt_waiters, []
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(seconds)
            case ProtocolViolation(error=error):
                self._report(ValidationFailed(error))
            case _:
                pass

    def _report(self, exc: RTChatError) -> None:
        if not self._error_callbacks:
            log.warning("%s", exc)
        for callback in list(self._error_callbacks):
            try:
                callback(exc)
            except Exception:
                log.exception("error callback raised")

    async def _wait_for_handlers(self) -> None:
        """Stop reading until handlers catch up: TCP backpressure reaches the server,
        which cuts us off as a slow consumer if it lasts; we then resume without loss."""
        self._reading_paused = True
        self._handlers_caught_up.clear()
        try:
            await self._handlers_caught_up.wait()
        finally:
            self._reading_paused = False

    def _handle_now(self, frame: p.MessageFrame) -> None:
        """Nothing is queued ahead: call the handlers from here, without a task switch.

        Synchronous handlers finish here; from the first one that returns an
        awaitable on, the rest is queued for the dispatcher, and everything
        after it queues behind.
        """
        rest = self._handlers.call(frame, self._report)
        if rest is None:
            self._session.delivery_handled(frame)
        else:
            self._dispatch_later(_Unfinished(frame, rest))

    def _dispatch_later(self, item: p.MessageFrame | GapReported | _Unfinished) -> None:
        self._undispatched += 1
        self._deliveries.put_nowait(item)

    async def _dispatch_loop(self) -> None:
        """Hand deliveries and gap notices to the app one by one, in stream order."""
        try:
            while True:
                if self._deliveries.qsize() <= self.max_pending_deliveries // 2:
                    self._handlers_caught_up.set()
                item = await self._deliveries.get()
                if item is None:
                    return
                if isinstance(item, GapReported):
                    for callback in list(self._gap_callbacks):
                        try:
                            callback(item)
                        except Exception:
                            log.exception("gap callback raised")
                    self._session.gap_handled(item)
                elif isinstance(item, _Unfinished):
                    await item.rest
                    self._session.delivery_handled(item.frame)
                else:
                    await self._handlers.dispatch(item, self._report)
                    self._session.delivery_handled(item)
                self._undispatched -= 1
        finally:
            while not self._deliveries.empty():  # never run now: close their coroutines
                left = self._deliveries.get_nowait()
                if isinstance(left, _Unfinished):
                    left.rest.close()


class _FailureLog:
    """One WARNING per failed attempt, at most one per ``interval`` seconds.

    A client retrying for hours against a server that is down says so now
    and then, with the count of the failures it did not report one by one
    (those go to DEBUG), instead of either silence or a line per second.
    """

    interval = 10.0

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last: float | None = None
        self._unreported = 0

    def report(self, error: RTChatError, *, lost: bool, next_url: str, delay: float) -> None:
        what = "connection lost" if lost else "connection attempt failed"
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            self._unreported += 1
            log.debug("%s: %s; retrying %s in %.2fs", what, error, next_url, delay)
            return
        more = (
            f" ({self._unreported} more failures since the last report)" if self._unreported else ""
        )
        log.warning("%s: %s; retrying %s in %.2fs%s", what, error, next_url, delay, more)
        self._last, self._unreported = now, 0


@dataclass(frozen=True, slots=True)
class _Unfinished:
    """A delivery whose handlers started inline; ``rest`` awaits what they left."""

    frame: p.MessageFrame
    rest: Coroutine[Any, Any, None]


def _check_auth(auth: dict[str, Any] | None) -> None:
    """``auth`` goes in every hello: refuse now what could never be sent as it is."""
    if auth is None:
        return
    try:
        text = to_json(auth, inf_nan_mode="constants")
    except PydanticSerializationError as exc:
        raise ValidationFailed(f"auth cannot be sent as JSON: {exc}") from None
    if (problem := p.non_finite(text, "auth")) is not None:
        raise ValidationFailed(problem)


def _event_and_data(event: str | Event, data: Any) -> tuple[str, Any]:
    if isinstance(event, Event):
        if data is not None:
            raise TypeError("pass either an Event instance or an event name with data, not both")
        return event.event_name, event
    return event_name(event), data
