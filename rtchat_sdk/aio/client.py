"""The asyncio client's public API: ``Client`` and its namespaces.

A ``Client`` joins three parts, each in its own module, around one sans-I/O
``ClientSession``: the ``Link`` (``connection.py``: dial, read, write, timer,
back off), the ``Dispatcher`` (``dispatcher.py``: deliveries to handlers, in
order) and this API, which turns each call into a core operation and a
future, and the core's events into results, errors and callbacks. Every task
the client starts (the link's loop and writer, the dispatcher) is owned and
finished when ``connect()`` fails or ``close()`` returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from ssl import SSLContext
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError, to_json

from .. import protocol as p
from ..backoff import ReconnectPolicy
from ..core import (
    ClientSession,
    ConnectionState,
    Delivered,
    Dropped,
    Failed,
    GapReported,
    ProtocolViolation,
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
    ConnectionLost,
    MessageDropped,
    MessageExpired,
    RTChatError,
    ValidationFailed,
    remote_error,
)
from ..outbox import Outbox, OverflowPolicy
from .connection import AttemptCallback, Link
from .credentials import Credentials, TokenSource
from .dispatcher import Dispatcher, GapCallback
from .endpoint import ProxySetting, check_ssl, check_url
from .handlers import ErrorCallback, HandlerRegistry
from .namespace import NamespaceClient

__all__ = ["Client", "NamespaceClient", "StateCallback"]

log = logging.getLogger("rtchat_sdk")

T = TypeVar("T", bound=BaseModel)
H = TypeVar("H", bound=Callable[..., Any])

StateCallback = Callable[[ConnectionState], Any]


class Client(NamespaceClient):
    """An rtchat client. Use ``async with Client(url) as client:``."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        auth: dict[str, Any] | None = None,
        token: TokenSource | None = None,
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
        ssl: SSLContext | None = None,
        transports: Sequence[str] = ("websocket", "polling"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(self, p.DEFAULT_NAMESPACE)
        transports = tuple(transports)
        unknown = set(transports) - {"websocket", "polling"}
        if not transports or unknown:
            raise ValueError(
                f"transports are 'websocket' and/or 'polling', in the order to try: {transports}"
            )
        urls = [check_url(u) for u in ([url] if isinstance(url, str) else list(url))]
        if not urls:
            raise ValueError("at least one URL is needed")
        _check_auth(auth)
        credentials = Credentials(auth, token)
        # The options as given, for the app to read back (the link holds its own).
        self.urls = urls
        self.reconnect = reconnect or ReconnectPolicy()
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.max_frame_bytes = max_frame_bytes
        self.max_pending_deliveries = max_pending_deliveries
        self.retry_first_connect = retry_first_connect
        self.compression = compression
        """Ask for permessage-deflate (used only if the server enables it too)."""
        self.proxy = proxy
        """True: the proxy the environment names (HTTPS_PROXY, ALL_PROXY, NO_PROXY...);
        a URL: that proxy; None: always connect directly."""
        self.ssl = check_ssl(ssl, urls)
        """TLS for ``wss://`` URLs (and their ``https://`` polling): None verifies the
        server's certificate with the system's CAs; a context is used as given."""
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
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._rtt_waiters: list[asyncio.Future[float]] = []
        self._space_freed = asyncio.Event()
        self._first_welcome: asyncio.Future[None] | None = None
        self._closing = False
        self.closed_reason: RTChatError | None = None
        self._dispatcher = Dispatcher(
            self._session,
            self._handlers,
            report=self._report,
            gap_callbacks=self._gap_callbacks,
            max_pending=max_pending_deliveries,
        )
        self._link = Link(
            self._session,
            self._dispatcher,
            urls=urls,
            policy=self.reconnect,
            retry_first_connect=retry_first_connect,
            connect_timeout=connect_timeout,
            max_frame_bytes=max_frame_bytes,
            compression=compression,
            proxy=proxy,
            ssl=self.ssl,
            transports=transports,
            credentials=credentials,
            clock=clock,
            on_event=self._on_event,
            on_state=self._set_state,
            on_finished=self._finish,
        )

    # ------------------------------------------------------------------
    # Observable state

    @property
    def state(self) -> ConnectionState:
        """What the client is doing about its connection: the value last passed to
        ``on_state_change``. ``CONNECTING`` or ``RECONNECTING`` is reported as an
        attempt starts, ``CONNECTED`` at the server's welcome, ``CLOSED`` once the
        client has stopped."""
        return self._state

    @property
    def transport(self) -> str | None:
        """What carries the connection now: ``"websocket"``, ``"polling"`` (HTTP long
        polling, when a WebSocket could not be opened), or None between connections."""
        return self._link.transport if self._link.ws or self._link.poller else None

    @property
    def session_id(self) -> str | None:
        return self._session.session_id

    @property
    def rtt(self) -> float | None:
        """Last measured heartbeat round trip, in seconds."""
        return self._session.rtt

    async def ping(self) -> float:
        """Measure one round trip to the server now, in seconds."""
        if self._session.state is not ConnectionState.CONNECTED:  # a connection to ping over
            raise ConnectionLost("not connected")
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._rtt_waiters.append(future)
        self._session.ping(self._clock())
        self._link.after_io()
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
            "retried": c.retried,
            "duplicates_dropped": c.duplicates_dropped,
            "gaps": c.gaps,
            "timed_out": c.timed_out,
            "dropped": c.dropped,
            "connections": c.connections,
            "reconnects": max(0, c.connections - 1),
            "failed_attempts": self._link.failed_attempts,
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
        self._link.attempt_callbacks.append(callback)
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
        if not self._link.started:
            self._first_welcome = asyncio.get_running_loop().create_future()
            self._link.start()
            self._dispatcher.start()
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
        self._closing = True
        if len(self._session.outbox):
            code, reason = p.CloseCode.GOING_AWAY, "client closed with unanswered messages"
        else:
            code, reason = p.CloseCode.NORMAL, "client closed"
        await self._link.stop(code, reason)
        self._finish(self._link.fatal or ClientClosed("the client was closed"))
        await self._dispatcher.finish(timeout=5.0)

    def _finish(self, reason: RTChatError) -> None:
        """Fail everything still waiting, once, and settle into CLOSED."""
        self._closing = True
        if self.closed_reason is None:
            self.closed_reason = reason
        self._session.close()
        self._link.cancel_timer()
        for future in [*self._pending.values(), *self._rtt_waiters]:
            if not future.done():
                future.set_exception(reason)
        self._pending.clear()
        self._rtt_waiters.clear()
        if self._first_welcome is not None and not self._first_welcome.done():
            self._first_welcome.set_exception(reason)
        self._space_freed.set()
        # The dispatcher hands out what was received, then ends by itself, so
        # no task outlives a client that stopped (even one never closed).
        self._dispatcher.end()
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
        if not self._link.started:
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
        self._link.after_io()
        return await future

    def _fail(self, message_id: int, exc: RTChatError) -> None:
        future = self._pending.pop(message_id, None)
        if future is not None and not future.done():
            future.set_exception(exc)

    # ------------------------------------------------------------------
    # The connection manager

    def _on_event(self, event: SessionEvent) -> None:
        match event:
            case Replied(id=message_id, data=data):
                future = self._pending.pop(message_id, None)
                if future is not None and not future.done():
                    future.set_result(data)
                self._space_freed.set()
            case Delivered(frame=frame):
                self._dispatcher.deliver(frame)
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
                self._set_state(ConnectionState.CONNECTED)
                if self._first_welcome is not None and not self._first_welcome.done():
                    self._first_welcome.set_result(None)
            case ServerNotice(code=code, message=message):
                self._report(remote_error(code, message))  # the link took its retry_after
            case GapReported():
                log.warning(
                    "gap in %s (%s): carrying on after %s:%d",
                    event.stream,
                    event.reason,
                    event.epoch,
                    event.offset,
                )
                self._dispatcher.gap(event)
            case RoundTrip(seconds=seconds):
                waiters, self._rtt_waiters = self._rtt_waiters, []
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(seconds)
            case ProtocolViolation(error=error):
                self._report(ValidationFailed(error))
            case _:
                pass  # Refused and LinkDead concern the link, which acted on them

    def _report(self, exc: RTChatError) -> None:
        if not self._error_callbacks:
            log.warning("%s", exc)
        for callback in list(self._error_callbacks):
            try:
                callback(exc)
            except Exception:
                log.exception("error callback raised")


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
