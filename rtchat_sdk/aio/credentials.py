"""What the client sends in each ``hello.auth``: the app's ``auth`` and a token.

A token is a string, or a callable (sync or async) returning one, called again
before every dial so an expired token is refreshed. It travels as
``auth.token``, as the browser client sends it (PROTOCOL §3.3). ``renew()`` is
the one retry a refused token gets: after a 4001, a callable that now gives
another token is tried once more (the server may have rotated keys or the
token may have expired between the callable and the hello).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import ConnectionFailed

__all__ = ["Credentials", "TokenSource"]

TokenSource = str | Callable[[], "str | Awaitable[str]"]
"""A token, or what makes one (sync or async), called before each connection."""


class Credentials:
    """The ``auth`` for each hello: the app's ``auth`` dict plus ``token`` when given."""

    def __init__(self, auth: dict[str, Any] | None, token: TokenSource | None) -> None:
        if token is not None and not isinstance(token, str) and not callable(token):
            raise TypeError(f"token must be a string or a callable returning one, got {token!r}")
        if token is not None and auth is not None and "token" in auth:
            raise ValueError("give the token as token= or as auth['token'], not both")
        self._auth = auth
        self._source = token
        self._last: str | None = None
        self._renewed: str | None = None

    @property
    def refreshable(self) -> bool:
        """The token comes from a callable: asking again may give another."""
        return callable(self._source)

    async def for_hello(self) -> dict[str, Any] | None:
        """The ``auth`` of the next hello; raises ``ConnectionFailed`` if the callable fails."""
        if self._source is None:
            return self._auth
        token, self._renewed = self._renewed or await self._fetch(), None
        self._last = token
        return {**(self._auth or {}), "token": token}

    async def renew(self) -> bool:
        """After a refusal: whether the callable now gives another token (used next)."""
        if not self.refreshable:
            return False
        try:
            token = await self._fetch()
        except ConnectionFailed:
            return False
        if token == self._last:
            return False
        self._renewed = token
        return True

    async def _fetch(self) -> str:
        source = self._source
        if isinstance(source, str):
            return source
        assert source is not None
        try:
            token: Any = source()
            if inspect.isawaitable(token):
                token = await token
        except Exception as exc:
            raise ConnectionFailed(
                f"the token callable raised {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(token, str) or not token:
            raise ConnectionFailed(f"the token callable returned {token!r}, not a token string")
        return token
