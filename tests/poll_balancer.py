"""A round-robin HTTP load balancer for the tests, with no sticky sessions.

It is an ASGI app (served by uvicorn through ``tests.test_asgi.serving``): each
HTTP request, not each TCP connection, goes to the next backend in turn, so a
client's keep-alive connection does not make it sticky by accident, as a TCP
(layer 4) balancer would. A backend that cannot be reached or drops the
request gets the client a 502, as nginx would. Every request is logged
(``hops``) with the backend it went to and the status it got.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import httpx

from server_ref.transports.asgi import Receive, Scope, Send
from tests.redis_support import Collected

__all__ = ["Balancer", "Hop"]


@dataclass(frozen=True, slots=True)
class Hop:
    """One request through the balancer."""

    backend: int
    method: str
    sid: str
    """The ``sid`` query parameter ('' for an opening POST, or a path that is not /poll)."""
    status: int


class Balancer:
    """``async with Balancer([url, ...]) as lb``: forwards each request to the next URL."""

    def __init__(self, backends: list[str]) -> None:
        self.backends = backends
        self.hops: Collected[Hop] = Collected()
        self._turn = 0
        self._http = httpx.AsyncClient(timeout=120.0)

    async def __aenter__(self) -> Balancer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    def statuses(self, sid: str) -> list[int]:
        return [hop.status for hop in self.hops.items if hop.sid == sid]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return  # no WebSocket through this balancer: the clients poll
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        backend = self._turn
        self._turn = (self._turn + 1) % len(self.backends)
        query: str = scope.get("query_string", b"").decode()
        status, content = await self._forward(scope["method"], backend, scope["path"], query, body)
        sid = parse_qs(query).get("sid", [""])[0]
        self.hops(Hop(backend, scope["method"], sid, status))
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def _forward(
        self, method: str, backend: int, path: str, query: str, body: bytes
    ) -> tuple[int, bytes]:
        url = f"{self.backends[backend]}{path}" + (f"?{query}" if query else "")
        extra: dict[str, Any] = {"content": body} if body else {}
        try:
            response = await self._http.request(
                method, url, headers={"content-type": "application/json"}, **extra
            )
        except httpx.TransportError as exc:
            return 502, f'{{"error": "bad_gateway: {type(exc).__name__}"}}'.encode()
        return response.status_code, response.content
