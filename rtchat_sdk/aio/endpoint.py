"""Where the client dials and why a dial failed: URL check, proxy choice, messages.

Pure functions at the boundary with websockets and the OS:

- ``check_url`` refuses, when the ``Client`` is made, a URL that can never
  work (a scheme rtchat does not speak, no host, a bad port): a usage error
  is a ``ValueError`` at once, not a ``ConnectionFailed`` after a dial.
- ``check_ssl`` refuses an ``ssl=`` that is not a context, or has no ``wss://``
  URL to serve.
- ``choose_proxy`` honours the environment as websockets does
  (``wss``/``ws``/``socks``/``https``/``http`` proxies, ``NO_PROXY``), and
  also ``ALL_PROXY``, which curl and most tools read and websockets does not.
- ``describe_failure`` says in words what happened, for every exception a
  dial can end with; some of them (a reset during TLS) carry no text at all.
"""

from __future__ import annotations

import socket
import ssl
import urllib.request
from typing import Literal

from websockets.exceptions import (
    InvalidMessage,
    InvalidProxy,
    InvalidProxyMessage,
    InvalidProxyStatus,
    InvalidStatus,
    InvalidURI,
    WebSocketException,
)
from websockets.proxy import get_proxy
from websockets.uri import parse_uri

__all__ = [
    "ProxySetting",
    "check_ssl",
    "check_url",
    "choose_proxy",
    "describe_failure",
    "tls_failure",
]

ProxySetting = str | Literal[True] | None
"""``True``: from the environment; a URL: that proxy; ``None``: connect directly."""

SCHEMES = ("ws", "wss")
_NOT_TLS = " (is the server serving TLS? use ws:// for a plain one)"
_PLAIN_PEER_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING", "HTTP_REQUEST"}
)
"""OpenSSL's words for a peer that answered a TLS hello with something else."""


def check_url(url: str) -> str:
    """Return ``url`` if a client can dial it; raise ``ValueError`` saying why not."""
    if not isinstance(url, str):
        raise TypeError(f"a URL is a str, not {type(url).__name__}")
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ValueError(f"invalid URL {url!r}: expected ws://HOST[:PORT] or wss://HOST[:PORT]")
    if scheme.lower() not in SCHEMES:
        raise ValueError(
            f"invalid URL {url!r}: rtchat speaks ws:// and wss://, not {scheme.lower()}://"
        )
    try:
        parse_uri(url)
    except InvalidURI as exc:
        raise ValueError(f"invalid URL {url!r}: {exc.msg}") from None
    except ValueError as exc:  # e.g. the port is out of range
        raise ValueError(f"invalid URL {url!r}: {exc}") from None
    return url


def check_ssl(context: object, urls: list[str]) -> ssl.SSLContext | None:
    """``context`` if it can serve ``urls``: an ``SSLContext`` (used as given) for
    ``wss://`` ones, or None (the system's CAs, verification on). Never a bool, so
    verification cannot be turned off by one word: make a context that does so."""
    if context is None:
        return None
    if not isinstance(context, ssl.SSLContext):
        raise TypeError(
            f"ssl is an ssl.SSLContext or None (verified with the system CAs),"
            f" not {type(context).__name__}"
        )
    if not any(url.lower().startswith("wss://") for url in urls):
        raise ValueError("ssl= is for wss:// URLs, and none was given")
    return context


def choose_proxy(url: str, proxy: ProxySetting) -> str | None:
    """The proxy to dial ``url`` through, or None to connect directly."""
    if proxy is not True:
        return proxy
    uri = parse_uri(url)
    chosen = get_proxy(uri)
    if chosen is None and not urllib.request.proxy_bypass(f"{uri.host}:{uri.port}"):
        chosen = urllib.request.getproxies().get("all")
    return chosen


def describe_failure(exc: BaseException, url: str, *, timeout: float, proxy: str | None) -> str:
    """What a failed dial of ``url`` means, in a sentence that is never empty.

    With ``wss://``, a reset before any HTTP answer is a TLS handshake the
    server did not take part in: most likely a plain server.
    """
    uri = parse_uri(url)
    via = f" through proxy {proxy}" if proxy else ""
    match exc:
        case InvalidProxyStatus():
            return f"the proxy {proxy} refused to connect us: HTTP {exc.response.status_code}"
        case InvalidProxyMessage():
            return f"the proxy {proxy} did not answer with valid HTTP"
        case InvalidProxy():
            return f"invalid proxy setting: {exc}"
        case InvalidStatus():
            status = exc.response.status_code
            return (
                f"the server answered HTTP {status} instead of switching to WebSocket"
                " (is this an rtchat server, and the right path?)"
            )
        case InvalidMessage():
            return (
                "no valid HTTP response to the WebSocket handshake"
                " (is this a WebSocket server? a TLS server needs wss://)"
            )
        case WebSocketException():
            return f"WebSocket handshake failed: {_text(exc)}"
        case ssl.SSLError():
            return tls_failure(exc) or _text(exc)
        case ConnectionResetError() | ConnectionAbortedError() if uri.secure:
            return f"TLS handshake failed: connection reset{via}{_NOT_TLS}"
        case ConnectionRefusedError():
            return f"connection refused{via} (is the server running, on this port?)"
        case ConnectionResetError():
            return f"connection reset by the peer{via}"
        case socket.gaierror():
            return f"cannot resolve the host name {uri.host!r}: {exc.strerror or _text(exc)}"
        case TimeoutError():
            return (
                f"no answer within connect_timeout={timeout:g}s{via}"
                " (TCP connect, TLS and the WebSocket handshake)"
            )
        case ImportError() if "socks" in str(exc).lower():
            return (
                f"the proxy {proxy} is a SOCKS proxy, which needs the python-socks package"
                " (pip install 'python-socks[asyncio]')"
            )
        case OSError():
            return f"{exc.strerror or _text(exc)}{via}"
        case _:
            return _text(exc)


def tls_failure(exc: BaseException) -> str | None:
    """The words for a TLS failure in ``exc`` or its causes (httpx wraps them), else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            detail = getattr(seen, "verify_message", None) or _text(seen)
            return f"TLS certificate verification failed: {detail}"
        if isinstance(seen, ssl.SSLError):
            reason = getattr(seen, "reason", None)  # set by OpenSSL; absent when made by hand
            hint = _NOT_TLS if reason in _PLAIN_PEER_REASONS else ""
            return f"TLS handshake failed: {reason or _text(seen)}{hint}"
        seen = seen.__cause__ or seen.__context__
    return None


def _text(exc: BaseException) -> str:
    """``str(exc)``, or its class name when it has no text of its own."""
    return str(exc) or type(exc).__name__
