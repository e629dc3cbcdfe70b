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
import shutil
from collections.abc import Callable
from typing import Generic, TypeVar

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from rtchat_sdk import Client

__all__ = [
    "Collected",
    "OwnRedis",
    "cleanup",
    "exchange",
    "new_prefix",
    "redis_url",
    "require_redis",
]

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


class OwnRedis:
    """A ``redis-server`` of the test's own on a free port (never the shared one).

    Without persistence, so a restart loses everything, as a Redis that was
    not configured to keep its data would. Stopped by its PID.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server is not installed"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
        self.proc = await asyncio.create_subprocess_exec(
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        client = Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            async with asyncio.timeout(10):
                while True:
                    try:
                        await client.ping()
                        return
                    except (RedisError, OSError):
                        await asyncio.sleep(0.02)  # the server is starting: try again
        finally:
            await client.aclose()

    async def stop(self) -> None:
        """SIGKILL: everything it held is gone."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()


async def exchange(alice: Client, bob: Client, count: int, timeout: float = 30.0) -> None:
    """Both join room ``r`` and publish ``count`` messages each at once; each must handle
    every message of the other exactly once, in order (the publishers' id order)."""
    got: dict[str, list[int]] = {"alice": [], "bob": []}
    done = {"alice": asyncio.Event(), "bob": asyncio.Event()}

    def recorder(who: str) -> Callable[[int], None]:
        def handle(n: int) -> None:
            got[who].append(n)
            if len(got[who]) == count:
                done[who].set()

        return handle

    alice.on("m")(recorder("alice"))
    bob.on("m")(recorder("bob"))
    await alice.join("r")
    await bob.join("r")

    async def send(client: Client, base: int) -> None:
        # Tasks start in order, and each enters the outbox at its first step.
        await asyncio.gather(*(client.publish("r", "m", base + i) for i in range(count)))

    async with asyncio.timeout(timeout):
        await asyncio.gather(send(alice, 0), send(bob, 100_000))
        await asyncio.gather(done["alice"].wait(), done["bob"].wait())
    assert got["alice"] == [100_000 + i for i in range(count)]
    assert got["bob"] == list(range(count))
    assert alice.counters["duplicates_dropped"] == bob.counters["duplicates_dropped"] == 0
