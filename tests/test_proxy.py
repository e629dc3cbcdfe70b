"""Proxies: the environment is honoured by default, ``proxy=`` overrides it."""

from __future__ import annotations

import pytest

from rtchat_sdk import Client, ConnectionFailed
from server_ref import Server
from tests.connectproxy import ConnectProxy

pytestmark = pytest.mark.timeout(20)

_PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "ws_proxy",
    "wss_proxy",
    "all_proxy",
    "socks_proxy",
    "no_proxy",
)


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Each test starts from an environment that names no proxy."""
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def _target(server: Server) -> str:
    return server.url.removeprefix("ws://")


async def _echo_through(url: str, **options: object) -> object:
    async with Client(url, **options) as client:  # type: ignore[arg-type]
        return await client.request("echo", {"via": "proxy"}, timeout=5)


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "ws_proxy"])
async def test_the_environment_proxy_is_used_by_default(
    server: Server, no_proxy_environment: pytest.MonkeyPatch, variable: str
) -> None:
    async with ConnectProxy() as proxy:
        no_proxy_environment.setenv(variable, proxy.url)
        assert await _echo_through(server.url) == {"via": "proxy"}
        assert proxy.requests == [_target(server)]


async def test_no_proxy_in_the_environment_is_honoured(
    server: Server, no_proxy_environment: pytest.MonkeyPatch
) -> None:
    async with ConnectProxy() as proxy:
        no_proxy_environment.setenv("HTTPS_PROXY", proxy.url)
        no_proxy_environment.setenv("NO_PROXY", "127.0.0.1")
        assert await _echo_through(server.url) == {"via": "proxy"}
        assert proxy.requests == []


async def test_an_explicit_proxy_wins_over_the_environment(
    server: Server, no_proxy_environment: pytest.MonkeyPatch
) -> None:
    async with ConnectProxy() as named, ConnectProxy() as from_env:
        no_proxy_environment.setenv("HTTPS_PROXY", from_env.url)
        assert await _echo_through(server.url, proxy=named.url) == {"via": "proxy"}
        assert named.requests == [_target(server)]
        assert from_env.requests == []


async def test_proxy_none_connects_directly(
    server: Server, no_proxy_environment: pytest.MonkeyPatch
) -> None:
    async with ConnectProxy() as proxy:
        no_proxy_environment.setenv("HTTPS_PROXY", proxy.url)
        assert await _echo_through(server.url, proxy=None) == {"via": "proxy"}
        assert proxy.requests == []


async def test_a_refusing_proxy_is_named_in_the_error(server: Server) -> None:
    async with ConnectProxy(refuse=True) as proxy:
        with pytest.raises(ConnectionFailed) as caught:
            await _echo_through(server.url, proxy=proxy.url)
        assert f"the proxy {proxy.url} refused to connect us: HTTP 403" in str(caught.value)
        assert proxy.requests == [_target(server)]
