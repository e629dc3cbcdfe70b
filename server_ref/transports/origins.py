"""Which browser pages may use the server: the ``Origin`` check and its CORS headers.

One check for every transport: websockets' handshake (``websocket.py``), the
ASGI app's WebSocket scope (``server_ref/asgi.py``) and every plain HTTP
request (``asgi.serve_http``, which the built-in port also runs through).

* No allowed origins (the default): every request is taken, whatever its
  ``Origin``, and no CORS header is sent, so browsers keep pages of other
  origins off long polling (their same-origin rule) but not off WebSocket.
* With allowed origins: a request without ``Origin`` (not a browser, or a
  browser's plain navigation) is taken; one from an origin not listed gets
  403; one from a listed origin gets ``Access-Control-Allow-Origin`` with
  that origin and ``Vary: Origin``, and its preflight ``OPTIONS`` is
  answered. ``*`` in the list allows every origin, with the same headers.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "PREFLIGHT_MAX_AGE",
    "cors_headers",
    "normalize_origin",
    "origin_allowed",
    "origin_of",
    "preflight_headers",
]

PREFLIGHT_MAX_AGE = 600
"""Seconds a browser may cache a preflight answer (``Access-Control-Max-Age``)."""


def normalize_origin(origin: str) -> str:
    """``origin`` as browsers send it (``scheme://host[:port]``, lower case, no path);
    ``ValueError`` for a setting that could never match one."""
    text = origin.strip().lower().rstrip("/")
    if text == "*":
        return text
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
        raise ValueError(f"an allowed origin is scheme://host[:port] or *, got {origin!r}")
    return text


def origin_of(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The request's ``Origin`` header, if it has one (ASGI-style header pairs)."""
    for name, value in headers:
        if name.lower() == b"origin":
            return value.decode("latin-1")
    return None


def origin_allowed(allowed: tuple[str, ...], origin: str | None) -> bool:
    """May a request with this ``Origin`` be served? (No setting, or no header: yes.)"""
    if not allowed or origin is None:
        return True
    return "*" in allowed or origin.lower().rstrip("/") in allowed


def cors_headers(allowed: tuple[str, ...], origin: str | None) -> list[tuple[bytes, bytes]]:
    """The CORS headers of an answer to an allowed request (none without a setting)."""
    if not allowed or origin is None:
        return []
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]


def preflight_headers(allowed: tuple[str, ...], origin: str) -> list[tuple[bytes, bytes]]:
    """The answer to an allowed origin's preflight: what long polling sends."""
    return [
        *cors_headers(allowed, origin),
        (b"access-control-allow-methods", b"GET, POST, DELETE"),
        (b"access-control-allow-headers", b"Content-Type"),
        (b"access-control-max-age", str(PREFLIGHT_MAX_AGE).encode()),
    ]
