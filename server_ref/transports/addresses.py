"""The client's address: the socket's peer, or, behind a trusted proxy, the one it forwards.

A proxy appends the address it got the request from to ``X-Forwarded-For``,
so the header reads client, proxy 1, proxy 2... left to right, and only the
entries written by proxies we trust are true: anything to their left may be
made up by the client. ``client_address`` therefore walks the header from the
right, past every trusted address, and takes the first one that is not
trusted. With no trusted proxies (the default), or a peer that is not one,
the header is ignored. The server counts connections per client address
(``max_connections_per_address``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["Network", "client_address", "forwarded_for", "scope_address", "trusted_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def trusted_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """The networks of ``ServerConfig.trusted_proxies`` (already checked there)."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def _parse(text: str) -> Address | None:
    """An address as a peer or a proxy writes it (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``,
    ``::1``); IPv4 mapped into IPv6 as IPv4; None if it is none of those."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_for(headers: Iterable[tuple[str | bytes, str | bytes]]) -> list[str]:
    """Every ``X-Forwarded-For`` entry among ``headers``, in order (several headers join)."""
    entries: list[str] = []
    for name, value in headers:
        name = name.decode("latin-1") if isinstance(name, bytes) else name
        if name.lower() == "x-forwarded-for":
            value = value.decode("latin-1") if isinstance(value, bytes) else value
            entries.extend(part.strip() for part in value.split(","))
    return entries


def client_address(
    peer: str | None, forwarded: list[str], trusted: tuple[Network, ...]
) -> str | None:
    """The client's address: ``peer`` unless it is a trusted proxy; then the right-most
    entry of ``forwarded`` that is not trusted.

    An entry that is not an address (``unknown``, garbage) ends the walk: what lies to
    its left was not written by a proxy we trust, so the last trusted hop is taken.
    With every entry trusted, the left-most is the client.
    """
    if peer is None:
        return None
    address = _parse(peer)
    if address is None:
        return peer  # not an IP socket (a Unix socket's path): count it as it is
    if not trusted or not any(address in network for network in trusted):
        return str(address)
    for entry in reversed(forwarded):
        hop = _parse(entry)
        if hop is None:
            break
        address = hop
        if not any(hop in network for network in trusted):
            break
    return str(address)


def scope_address(scope: Mapping[str, Any], trusted: tuple[Network, ...]) -> str | None:
    """``client_address`` of an ASGI scope (its ``client`` and ``headers``)."""
    client = scope.get("client")
    peer = str(client[0]) if client else None
    return client_address(peer, forwarded_for(scope.get("headers", ())), trusted)
