"""Redis for the tests: the shared server at ``REDIS_URL``, a key prefix per test, cleanup.

Without a reachable Redis the tests that need it skip with the reason; under
``CI=true`` they fail instead, so a CI run never passes by skipping them.

``REDIS_URL`` is taken out of the environment when this module loads (the
tests' conftest imports it first), so the servers that tests start as
processes run on the in-memory broker unless a test gives them ``--redis``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable
from typing import Generic, TypeVar

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

__all__ = ["Collected", "cleanup", "new_prefix", "redis_url", "require_redis"]

T = TypeVar("T")


_URL = os.environ.pop("REDIS_URL", None) or "redis://127.0.0.1:6379/0"


def redis_url() -> str:
    return _URL


async def require_redis() -> str:
    """The URL of a Redis that answers; skips (fails under CI) when there is none."""
    url = redis_url()
    client = Redis.from_url(url, socket_connect_timeout=2)
    try:
        await asyncio.wait_for(client.ping(), 3)
    except (RedisError, OSError, TimeoutError) as exc:
        message = f"no Redis at {url} ({exc}); set REDIS_URL"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    finally:
        await client.aclose()
    return url


def new_prefix() -> str:
    """A key prefix no other test (or deployment) uses."""
    return f"rtchat-test-{secrets.token_hex(6)}"


async def cleanup(url: str, prefix: str) -> None:
    """Delete every key of ``prefix`` (plain and hash-tagged)."""
    client = Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"*{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


class Collected(Generic[T]):
    """Items a callback receives, and a way to wait until enough have come."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self._changed = asyncio.Event()

    def __call__(self, item: T) -> None:
        self.items.append(item)
        self._changed.set()

    async def until(self, done: Callable[[list[T]], bool], timeout: float = 5.0) -> list[T]:
        """Wait (at most ``timeout``) until ``done(items)``; the items then."""

        async def wait() -> None:
            while not done(self.items):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)
        return self.items
