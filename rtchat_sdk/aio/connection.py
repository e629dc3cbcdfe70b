"""The client's link to a server over time: dial, serve, back off, dial again.

``Link`` is the part of the asyncio driver that owns sockets and timers: one
task runs the reconnect loop (tenacity's jittered backoff from the
``ReconnectPolicy``, URLs tried in turn, a ``retry_after`` from the server
added to the wait), each connection's read loop feeds the sans-I/O core, and
``after_io()`` is the one driver step — take the core's events, write its
frames, re-arm its one timer — run after every input. The core's events go
on to the client (``on_event``); the link itself acts on the few that
concern the connection (a welcome, a refusal, a dead link).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from ssl import SSLContext
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidStatus,
    WebSocketException,
)
from websockets.protocol import State

from ..backoff import ReconnectPolicy, close_error, reconnect_at_once, refusal_error
from ..core import (
    ClientSession,
    ConnectionState,
    LinkDead,
    Refused,
    ServerNotice,
    SessionEvent,
    Welcomed,
)
from ..errors import (
    ConnectionFailed,
    GaveUp,
    RTChatError,
    Unauthorized,
)
from ..wsio import write_framed
from .credentials import Credentials
from .dispatcher import Dispatcher
from .endpoint import ProxySetting, choose_proxy, describe_failure
from .polling import Poller, PollingFailed, polling_url

__all__ = ["AttemptCallback", "ConnectionState", "Link"]

log = logging.getLogger("rtchat_sdk")


AttemptCallback = Callable[[int, str], Any]


_LINK_EVENTS = frozenset({Welcomed, Refused, ServerNotice, LinkDead})
"""The events ``Link._observe`` acts on: the ones that concern the connection itself."""


class Link:
    """Connections to the server, one after another, for one client session."""

    def __init__(
        self,
        session: ClientSession,
        dispatcher: Dispatcher,
        *,
        urls: list[str],
        policy: ReconnectPolicy,
        retry_first_connect: bool,
        connect_timeout: float,
        max_frame_bytes: int,
        compression: bool,
        proxy: ProxySetting,
        ssl: SSLContext | None = None,
        transports: tuple[str, ...] = ("websocket", "polling"),
        credentials: Credentials | None = None,
        clock: Callable[[], float],
        on_event: Callable[[SessionEvent], None],
        on_state: Callable[[ConnectionState], None],
        on_finished: Callable[[RTChatError], None],
    ) -> None:
        self._session = session
        self._dispatcher = dispatcher
        self.urls = urls
        self.policy = policy
        self.retry_first_connect = retry_first_connect
        self.connect_timeout = connect_timeout
        self.max_frame_bytes = max_frame_bytes
        self.compression = compression
        self.proxy = proxy
        self.ssl = ssl
        """The TLS context for ``wss://`` and ``https://`` (None: verified, system CAs)."""
        self.transports = transports
        """What to dial, in order: "websocket" and/or "polling" (HTTP long polling)."""
        self.transport: str | None = None
        """What carries the current connection ("websocket" or "polling"), if any."""
        self.poller: Poller | None = None
        self._credentials = credentials or Credentials(session.auth, None)
        """The hello's ``auth`` (and token, fetched again before each dial)."""
        self._at_once = False
        """The last connection closed with a code that wants a new one without waiting."""
        self._http: httpx.AsyncClient | None = None
        self._clock = clock
        self._on_event = on_event
        self._on_state = on_state
        self._on_finished = on_finished
        self.attempt_callbacks: list[AttemptCallback] = []
        self.ws: ClientConnection | None = None
        self._wakeup = asyncio.Event()  # set when the transport pushes back
        self._write_blocked = False
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._runner: asyncio.Task[None] | None = None
        self.closing = False
        """Set once: no more connections (close() was called, or the link gave up)."""
        self._welcomed_here = False
        self._poll_limits = (100, 25.0)
        """Frames per POST and a poll's hold: the welcome's ``poll_max_frames`` and
        ``poll_timeout`` (PROTOCOL §1.1), their defaults until one came."""
        self.fatal: RTChatError | None = None
        """Why no retry can help, once the server said so (or a fatal close code)."""
        self._retry_after: float | None = None
        self.failed_attempts = 0
        self._failure_log = _FailureLog(clock)

    @property
    def started(self) -> bool:
        return self._runner is not None

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="rtchat-connection")

    async def stop(self, code: int, reason: str) -> None:
        """Close the current connection with ``code``, then end the reconnect loop."""
        ws = None if self.closing else self.ws
        poller = None if self.closing else self.poller
        self.closing = True
        if poller is not None:
            if code == 1000:
                await poller.goodbye()
            else:
                poller.abort()
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(code, reason), 5.0)
            except Exception:  # already gone, or slow to answer: the loop ends anyway
                log.debug("close of the connection failed", exc_info=True)
        runner = self._runner
        if runner is not None and runner is not asyncio.current_task():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        self.cancel_timer()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _end(self, reason: RTChatError) -> None:
        """No more connections: the loop stops here, and the client closes with ``reason``."""
        self.closing = True
        self.cancel_timer()
        self._on_finished(reason)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _observe(self, event: SessionEvent) -> None:
        """The events that concern the connection itself."""
        match event:
            case Welcomed(limits=limits):
                self._welcomed_here = True
                if limits is not None:
                    self._poll_limits = limits.poll_max_frames, limits.poll_timeout
            case Refused(code=code, message=message, retry_after=retry_after):
                self.fatal = self.fatal or refusal_error(code, message)
                if self.fatal is None:
                    self._retry_after = retry_after  # e.g. overloaded: come back later
            case ServerNotice(retry_after=retry_after) if retry_after is not None:
                self._retry_after = retry_after
            case LinkDead(reason=reason):
                log.warning("connection declared dead: %s", reason)
                if self.ws is not None and self.ws.transport is not None:
                    self.ws.transport.abort()
                if self.poller is not None:
                    self.poller.abort()
            case _:
                pass

    async def _run(self) -> None:
        policy = self.policy
        delays = policy.delays()
        failures = 0
        failing_since: float | None = None
        index = 0
        attempt = 0
        ever_welcomed = False
        renewed = False  # a refused token was renewed: the next refusal is final
        while not self.closing:
            url = self.urls[index % len(self.urls)]
            self._on_state(
                ConnectionState.RECONNECTING if ever_welcomed else ConnectionState.CONNECTING
            )
            attempt += 1
            for callback in list(self.attempt_callbacks):
                try:
                    callback(attempt, url)
                except Exception:
                    log.exception("attempt callback raised")
            started = self._clock()
            error = await self._connect_with_credentials(url)
            if self.closing:
                return
            if self._welcomed_here:
                ever_welcomed, renewed = True, False
                attempt = 0
                if self._clock() - started >= policy.stable_after:
                    delays, failures, failing_since = policy.delays(), 0, None
            else:
                self.failed_attempts += 1
            if isinstance(self.fatal, Unauthorized) and not renewed:
                renewed = await self._credentials.renew()
                if renewed and not self.closing:  # another token: try it once, at once
                    log.info("credentials refused (%s): retrying with a new token", self.fatal)
                    self.fatal = None
                    continue
            if self.fatal is not None or not policy.classify(error):
                self._end(self.fatal or error)
                return
            if not ever_welcomed and not self.retry_first_connect:
                self._end(error)
                return
            if not policy.enabled:
                self._end(error)
                return
            failures += 1
            failing_since = failing_since if failing_since is not None else started
            elapsed = self._clock() - failing_since
            if (policy.max_attempts is not None and failures >= policy.max_attempts) or (
                policy.max_elapsed is not None and elapsed >= policy.max_elapsed
            ):
                self._end(
                    GaveUp(f"gave up after {failures} attempt(s) over {elapsed:.1f}s: {error}")
                )
                return
            if not self._welcomed_here:
                index += 1  # this URL failed: try the next one
            delay = 0.0 if self._at_once else next(delays)
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

    async def _connect_with_credentials(self, url: str) -> RTChatError:
        """Fetch the hello's credentials (a token callable runs here), then connect."""
        self._welcomed_here = self._at_once = False
        try:
            self._session.auth = await self._credentials.for_hello()
        except ConnectionFailed as exc:
            return exc
        if self.closing:
            return ConnectionFailed("the client was closed")
        return await self._connect_once(url)

    async def _connect_once(self, url: str) -> RTChatError:
        """One connection, from its dial to its end; returns why it ended.

        WebSocket first when it is in ``transports``; when its opening handshake
        fails (an HTTP error from a proxy or the server, a timeout) and polling
        is allowed, a polling connection to the same URL at once.
        """
        self._welcomed_here = False
        if "websocket" not in self.transports:
            return await self._poll_once(url)
        error, fallback = await self._websocket_once(url)
        if fallback and "polling" in self.transports and not self.closing:
            log.warning("no WebSocket to %s (%s): trying HTTP long polling", url, error)
            polled = await self._poll_once(url)
            if not self._welcomed_here:  # neither worked: say both
                return ConnectionFailed(f"{error}; over HTTP long polling: {polled}")
            return polled
        return error

    async def _websocket_once(self, url: str) -> tuple[RTChatError, bool]:
        """One WebSocket connection; (why it ended, whether long polling may do better)."""
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
                ssl=(self.ssl or True) if url.lower().startswith("wss://") else None,
            )
        except (OSError, TimeoutError, WebSocketException, ImportError, ValueError) as exc:
            why = describe_failure(exc, url, timeout=self.connect_timeout, proxy=proxy)
            # An HTTP answer that is not an upgrade, or no answer in time: HTTP may pass.
            fallback = isinstance(exc, (TimeoutError, InvalidStatus))
            return ConnectionFailed(f"cannot connect to {url}: {why}"), fallback
        self.ws = ws
        self.transport = "websocket"
        self._write_blocked = False
        self._wakeup.clear()
        self._cancel_flush()
        self._session.connection_made(self._clock())
        writer = asyncio.create_task(self._write_loop(ws), name="rtchat-writer")
        self.after_io()
        try:
            async for text in ws:
                self._session.receive_text(text, self._clock())
                self.after_io()
                if self._dispatcher.full:
                    await self._dispatcher.wait_for_handlers()
        except ConnectionClosed:
            pass
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            self.ws = None
            self._cancel_flush()
            if not self.closing:
                self._session.connection_lost(self._clock())
                self.after_io()
        code = ws.close_code
        sent = ws.protocol.close_sent
        self.fatal = self.fatal or close_error(
            code,
            ws.close_reason or "",
            sent=None if sent is None else sent.code,
            max_frame_bytes=self.max_frame_bytes,
        )
        self._at_once = reconnect_at_once(code)
        why = f"connection to {url} closed (code {code}: {ws.close_reason})"
        return ConnectionFailed(why), False

    async def _poll_once(self, url: str) -> RTChatError:
        """One HTTP long-polling connection (PROTOCOL §1.1), from its opening POST to its end."""
        target = polling_url(url)
        if self._http is None:
            # No Nagle: a request's headers and body go out as written, not 40 ms later.
            nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            verify = self.ssl or True  # the transport's, and the proxy's: never off by default
            self._http = httpx.AsyncClient(
                trust_env=self.proxy is True,
                proxy=self._proxy_url(),
                verify=verify,
                transport=httpx.AsyncHTTPTransport(verify=verify, socket_options=nodelay),
            )
        session = self._session
        poller = Poller(
            self._http,
            target,
            connect_timeout=self.connect_timeout,
            limits=lambda: (self._poll_limits[0], session.max_frame_bytes),
        )
        self._cancel_flush()
        self._session.connection_made(self._clock())
        try:
            await poller.open(self._session.data_to_send())
        except PollingFailed as exc:
            self._session.connection_lost(self._clock())
            self.after_io()
            return ConnectionFailed(f"cannot open a polling connection to {target}: {exc}")
        self.poller, self.transport = poller, "polling"
        close: dict[str, Any] | None = None
        why = "the polling connection ended"
        try:
            self.after_io()
            while close is None and not self.closing:
                batch, close = await poller.next_batch(hold=self._poll_limits[1])
                self._session.receive_text(batch, self._clock())
                self.after_io()
                if self._dispatcher.full:
                    await self._dispatcher.wait_for_handlers()
        except PollingFailed as exc:
            why = str(exc)
        finally:
            poller.abort()
            self.poller = None
            if not self.closing:
                self._session.connection_lost(self._clock())
                self.after_io()
        if close is None:
            return ConnectionFailed(f"polling connection to {target} lost: {why}")
        code, reason = close.get("code"), str(close.get("reason", ""))
        if isinstance(code, int):
            self.fatal = self.fatal or close_error(
                code, reason, sent=None, max_frame_bytes=self.max_frame_bytes
            )
            self._at_once = reconnect_at_once(code)
        return ConnectionFailed(f"polling connection to {target} closed (code {code}: {reason})")

    def _proxy_url(self) -> str | None:
        return self.proxy if isinstance(self.proxy, str) else None

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
        if self.poller is not None:
            self.poller.send(self._session.data_to_send())
            return
        ws = self.ws
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
        write_framed(ws)
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

    def after_io(self) -> None:
        """Act on the session's events, write what is due, re-arm the timer."""
        for event in self._session.events_received():
            if type(event) in _LINK_EVENTS:  # deliveries and replies skip the match
                self._observe(event)
            self._on_event(event)
        self._flush()
        if self.closing:
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
        if self._dispatcher.reading_paused:
            self._session.keepalive(now)  # our handlers are slow, the link is not dead
        self._session.handle_timer(now)
        self.after_io()


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
