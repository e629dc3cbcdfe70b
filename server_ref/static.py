"""The files the server hands out over plain HTTP: the browser client and the demo page.

``/rtchat.js`` (and its types, ``/rtchat.d.ts``) is shipped in the client
package (``rtchat_sdk/web/``), so a page can load the client from the server
it talks to, with no build step; ``/demo/`` is a small chat page
(``server_ref/demo/``) served only when the server is started with
``demo`` on. Files are read once, on first request, and kept.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from .transports.base import HttpAnswer

__all__ = ["static_answer"]

_CLIENT = {
    "/rtchat.js": ("rtchat.js", "text/javascript; charset=utf-8"),
    "/rtchat.d.ts": ("rtchat.d.ts", "text/plain; charset=utf-8"),
}
_DEMO = {
    "/demo/": ("index.html", "text/html; charset=utf-8"),
}


@cache
def _read(package: str, folder: str, name: str) -> bytes:
    return resources.files(package).joinpath(folder, name).read_bytes()


def static_answer(path: str, *, demo: bool) -> HttpAnswer | None:
    """The answer for ``path`` if it is one of the served files, else None."""
    if path in _CLIENT:
        name, content_type = _CLIENT[path]
        return HttpAnswer(200, content_type, _read("rtchat_sdk", "web", name))
    if not demo:
        return None
    if path == "/demo":  # relative links in the page need the trailing slash
        return HttpAnswer(308, "text/plain", b"", (("Location", "demo/"),))
    if path in _DEMO:
        name, content_type = _DEMO[path]
        return HttpAnswer(200, content_type, _read("server_ref", "demo", name))
    return None
