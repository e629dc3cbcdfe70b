"""Client addresses on the web transports: connections per address, trusted proxies.

``client_address`` is unit-tested with the spoofing cases; then each way a
connection arrives (websockets' server, WebSocket under uvicorn, long polling
on both) is checked to count its client's address: at the limit taken, one
past it ``overloaded`` and 1013, and behind a trusted proxy the forwarded
address counted instead of the proxy's.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from rtchat_sdk import protocol as p
from server_ref import ServerConfig
from server_ref.__main__ import build_parser, config_from_args
from server_ref.transports.addresses import (
    client_address,
    forwarded_for,
    scope_address,
    trusted_networks,
)
from tests.test_polling import HELLO, SERVERS, open_poller, served

pytestmark = pytest.mark.timeout(30)

PROXIES = trusted_networks(["10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("peer", "header", "expected"),
    [
        ("203.0.113.5", [], "203.0.113.5"),  # no proxy
        ("203.0.113.5", ["198.51.100.1"], "203.0.113.5"),  # untrusted peer: header ignored
        ("10.0.0.1", ["203.0.113.5"], "203.0.113.5"),  # a trusted proxy forwards the client
        # A client sends its own header through the proxy, which appends what it saw:
        ("10.0.0.1", ["198.51.100.1, 203.0.113.5"], "203.0.113.5"),
        ("10.0.0.1", ["198.51.100.1", "203.0.113.5"], "203.0.113.5"),  # two headers, in order
        # ... even naming a trusted address: the right-most untrusted one is the client.
        ("10.0.0.1", ["10.9.9.9, 203.0.113.5"], "203.0.113.5"),
        ("10.0.0.1", ["203.0.113.5, 10.0.0.2"], "203.0.113.5"),  # two trusted proxies in a row
        ("10.0.0.1", ["garbage, 10.0.0.2"], "10.0.0.2"),  # not an address: the last trusted hop
        ("10.0.0.1", ["10.0.0.3, 10.0.0.2"], "10.0.0.3"),  # every hop trusted: the left-most
        ("10.0.0.1", [], "10.0.0.1"),  # a trusted peer without the header is the client
        ("10.0.0.1", ["203.0.113.5:4711"], "203.0.113.5"),  # with a port
        ("fd00::1", ["[2001:db8::7]:443"], "2001:db8::7"),
        ("::ffff:10.0.0.1", ["203.0.113.5"], "203.0.113.5"),  # IPv4 mapped into IPv6
        ("::ffff:203.0.113.5", [], "203.0.113.5"),
        (None, ["203.0.113.5"], None),  # no peer known: nothing to count
    ],
)
def test_the_client_address_is_the_right_most_untrusted_hop(
    peer: str | None, header: list[str], expected: str | None
) -> None:
    headers = [("X-Forwarded-For", value) for value in header]
    assert client_address(peer, forwarded_for(headers), PROXIES) == expected


def test_without_trusted_proxies_the_header_is_ignored_even_from_a_private_peer() -> None:
    assert client_address("10.0.0.1", ["203.0.113.5"], ()) == "10.0.0.1"


def test_an_asgi_scope_gives_its_client_and_its_headers() -> None:
    scope = {"client": ("10.0.0.1", 5555), "headers": [(b"x-forwarded-for", b"203.0.113.5")]}
    assert scope_address(scope, PROXIES) == "203.0.113.5"
    assert scope_address({"headers": []}, PROXIES) is None


def test_trusted_proxy_flags_are_repeatable_and_checked() -> None:
    parser = build_parser()
    args = parser.parse_args(["--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "::1"])
    assert config_from_args(parser, args).trusted_proxies == ("10.0.0.0/8", "::1/128")
    assert config_from_args(parser, parser.parse_args([])).trusted_proxies == ()
    with pytest.raises(SystemExit):
        config_from_args(parser, parser.parse_args(["--trusted-proxy", "not-a-network"]))


# ----------------------------------------------------------------------
# Through the transports, from 127.0.0.1


async def first_frame(ws: ClientConnection) -> dict[str, Any]:
    """What the server says first: a refusal at once, or the welcome to a hello."""
    await ws.send(json.dumps(HELLO))
    frame: dict[str, Any] = json.loads(await ws.recv())
    return frame


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://") + "/"


@pytest.mark.parametrize("kind", SERVERS)
async def test_websocket_connections_per_address_past_the_limit_are_told_to_come_back(
    kind: str,
) -> None:
    config = ServerConfig(max_connections_per_address=1, overload_retry_after=2.0)
    async with served(kind, config) as srv:
        url = ws_url(srv.url)
        async with connect(url) as first:
            assert (await first_frame(first))["type"] == "welcome"  # exactly the limit
            async with connect(url) as second:  # one past it
                notice = json.loads(await second.recv())
                assert (notice["code"], notice["retry_after"]) == ("overloaded", 2.0)
                await second.wait_closed()
                assert second.close_code == p.CloseCode.TRY_AGAIN_LATER
            # (A connection that leaves frees its place: tests/test_limits.py.)


@pytest.mark.parametrize("kind", SERVERS)
async def test_behind_a_trusted_proxy_each_forwarded_client_counts_for_itself(kind: str) -> None:
    config = ServerConfig(max_connections_per_address=1, trusted_proxies=("127.0.0.1/32",))
    async with served(kind, config) as srv:
        url = ws_url(srv.url)

        def via(forwarded: str) -> Any:
            return connect(url, additional_headers={"X-Forwarded-For": forwarded})

        async with via("203.0.113.1") as ann, via("203.0.113.2") as bob:
            assert (await first_frame(ann))["type"] == "welcome"
            assert (await first_frame(bob))["type"] == "welcome"  # not the proxy's address
            async with via("198.51.100.7, 203.0.113.1") as spoofer:  # claims another address
                notice = json.loads(await spoofer.recv())
                assert notice["code"] == "overloaded"  # counted as 203.0.113.1 all the same


@pytest.mark.parametrize("kind", SERVERS)
async def test_polling_connections_count_per_address_too(kind: str) -> None:
    config = ServerConfig(max_connections_per_address=1, trusted_proxies=("127.0.0.1/32",))
    async with served(kind, config) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        first = await open_poller(http)
        assert [f["type"] for f in await first.frames()] == ["welcome"]
        second = await open_poller(http)  # the same address (127.0.0.1): one past the limit
        body = await second.poll()
        assert [f["code"] for f in body["frames"]] == ["overloaded"]
        assert body["close"]["code"] == p.CloseCode.TRY_AGAIN_LATER
        forwarded = await http.post(
            "/poll", json=[HELLO], headers={"X-Forwarded-For": "203.0.113.9"}
        )
        sid = forwarded.json()["sid"]
        answer = await http.get("/poll", params={"sid": sid, "ack": 0})
        assert [f["type"] for f in answer.json()["frames"]] == ["welcome"]
