"""The client side of HTTP long polling (PROTOCOL.md §1.1), over httpx.

``Poller`` is one polling connection: ``open`` posts the ``hello`` and gets
the connection's ``sid``; ``next_batch`` holds a GET until the server has
frames, acknowledging the batch before (so a lost answer comes again);
``send`` queues frames that one writer task posts in order, a POST at a
time, with whatever queued meanwhile; ``goodbye`` is the DELETE. The link
(``connection.py``) feeds each batch to the session core as one message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from .endpoint import tls_failure

__all__ = ["PollingFailed", "Poller", "polling_url"]

log = logging.getLogger("rtchat_sdk")

POLL_MARGIN = 10.0
"""Seconds a poll may take beyond the server's hold (``welcome.limits.poll_timeout``, 25 s
by default) before it counts as lost."""
RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
"""Waits before asking again after a request whose answer was lost on the way (a reset,
a cut, or a 502/503/504: a node that could not reach the one holding the connection, or
a proxy's): a poll with the same ``ack`` gets the same batch, a POST's frames are safe to
send again (ids and dedupe); after these, the connection counts as broken."""
RETRY_STATUSES = frozenset({502, 503, 504})
"""Answers that say the request may not have been carried out: asked again."""


class PollingFailed(Exception):
    """The polling connection cannot go on: why, in words (for ``ConnectionFailed``)."""


def polling_url(url: str) -> str:
    """The polling endpoint for a WebSocket URL: same host and path, http(s), ``/poll``."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/") + "/poll"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class Poller:
    """One polling connection: its sid, its acknowledged cursor, its writer."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        url: str,
        *,
        connect_timeout: float,
        limits: Callable[[], tuple[int, int]] = lambda: (100, 1 << 20),
    ) -> None:
        self._http = http
        self._limits = limits
        """(frames, bytes) one POST may carry: the server's welcome says."""
        self.url = url
        self._timeout = connect_timeout
        self.sid: str | None = None
        self.ack = 0
        self._outgoing: list[str] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.failed: str | None = None
        """Why a POST failed: the connection is over then."""
        self._broken = asyncio.Event()
        self._idle = asyncio.Event()  # nothing queued or being posted
        self._idle.set()

    async def open(self, frames: list[str]) -> None:
        """POST the hello (and what follows it); raises ``PollingFailed``."""
        answer = await self._request("POST", self._body(frames), timeout=self._timeout, retry=False)
        sid = answer.get("sid")
        if not isinstance(sid, str):
            raise PollingFailed(f"the server's answer to the opening POST has no sid: {answer}")
        self.sid = sid
        self._writer = asyncio.create_task(self._write_loop(), name="rtchat-poll-writer")

    async def next_batch(self, hold: float) -> tuple[str, dict[str, Any] | None]:
        """The next batch's frames as one JSON array text, and the server's close if any.

        Raises ``PollingFailed`` when the connection is gone (or a POST failed).
        """
        get = asyncio.ensure_future(
            self._request("GET", None, params={"ack": str(self.ack)}, timeout=hold + POLL_MARGIN)
        )
        broken = asyncio.ensure_future(self._broken.wait())
        try:
            await asyncio.wait({get, broken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            broken.cancel()
        if not get.done():
            get.cancel()
            raise PollingFailed(self.failed or "the polling connection broke")
        answer = get.result()
        cursor = answer.get("cursor")
        frames = answer.get("frames")
        if not isinstance(cursor, int) or not isinstance(frames, list):
            raise PollingFailed(f"not a poll answer: {answer}")
        self.ack = cursor
        close = answer.get("close")
        return json.dumps(frames), close if isinstance(close, dict) else None

    def send(self, frames: list[str]) -> None:
        """Queue frames for the writer, in order."""
        if frames:
            self._outgoing.extend(frames)
            self._idle.clear()
            self._wakeup.set()

    async def goodbye(self) -> None:
        """The client's goodbye (DELETE); what was queued is posted first."""
        if self.sid is None:
            return
        try:
            await asyncio.wait_for(self._drain(), self._timeout)
            await self._request("DELETE", None, timeout=self._timeout)
        except (PollingFailed, TimeoutError):
            log.debug("polling goodbye failed", exc_info=True)
        self.abort()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
        self._broken.set()

    async def _drain(self) -> None:
        if self.failed is None:
            await self._idle.wait()

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._outgoing:
                frames = self._take()
                try:
                    await self._request("POST", self._body(frames), timeout=self._timeout)
                except PollingFailed as exc:
                    self.failed = str(exc)
                    self._broken.set()
                    self._idle.set()
                    return
            self._idle.set()

    def _take(self) -> list[str]:
        """The next POST's frames, in order, within the server's limits (at least one)."""
        max_frames, max_bytes = self._limits()
        taken: list[str] = []
        size = 2
        while self._outgoing and len(taken) < max_frames:
            frame = self._outgoing[0]
            if taken and size + len(frame) + 1 > max_bytes:
                break
            taken.append(self._outgoing.pop(0))
            size += len(frame) + 1
        return taken

    @staticmethod
    def _body(frames: list[str]) -> bytes:
        return ("[" + ",".join(frames) + "]").encode()

    async def _request(
        self,
        method: str,
        body: bytes | None,
        *,
        timeout: float,
        params: dict[str, str] | None = None,
        retry: bool = True,
    ) -> dict[str, Any]:
        """One request's JSON answer; a lost answer is asked for again (``RETRIES``),
        except for the opening POST (a second one would open a second connection)."""
        query = dict(params or {})
        if self.sid is not None:
            query["sid"] = self.sid
        waits = iter(RETRIES if retry else ())
        while True:
            try:
                response = await self._http.request(
                    method,
                    self.url,
                    params=query,
                    content=body,
                    headers={"content-type": "application/json"},
                    timeout=timeout,
                )
            except httpx.TransportError as exc:
                tls = tls_failure(exc)  # a certificate is not fixed by asking again
                why = f"{method} {self.url}: {tls or f'{type(exc).__name__}: {exc}'}"
                wait = None if tls else next(waits, None)
                if wait is None:
                    raise PollingFailed(why) from exc
            except httpx.HTTPError as exc:
                raise PollingFailed(f"{method} {self.url}: {type(exc).__name__}: {exc}") from exc
            else:
                if response.status_code not in RETRY_STATUSES:
                    break
                why = f"{method} {self.url}: HTTP {response.status_code} {response.text}"
                wait = next(waits, None)
                if wait is None:
                    raise PollingFailed(why)
            log.debug("%s: asking again in %ss", why, wait)
            await asyncio.sleep(wait)
        if response.status_code != 200:
            raise PollingFailed(f"{method} {self.url}: HTTP {response.status_code} {response.text}")
        try:
            answer = response.json()
        except ValueError as exc:
            raise PollingFailed(f"{method} {self.url}: the answer is not JSON") from exc
        if not isinstance(answer, dict):
            raise PollingFailed(f"{method} {self.url}: the answer is not a JSON object")
        return answer
