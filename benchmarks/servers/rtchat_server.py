"""The rtchat server under test: the shipped ``rtchat-server`` command line.

``python -m benchmarks.servers.rtchat_server --port 0 [rtchat-server flags]``

This only pins the process to its CPU and raises the open-files limit, then
runs ``server_ref.__main__.main`` unchanged (built-in ``echo`` handler,
in-memory broker, rooms and publish as shipped). It prints
``rtchat server listening on ws://HOST:PORT`` once bound; SIGTERM shuts down
gracefully and exits 0.

The per-connection message rate limit (``--rate-per-second``, ``--rate-burst``;
1,000/s by default) is lifted: the benchmarks measure how fast one connection
can go, which a production limit would cap (flags given on the command line
still win).
"""

from __future__ import annotations

import sys

from benchmarks.common import (
    exit_with_parent,
    gc_monitor_from_env,
    pin_from_env,
    raise_nofile,
)

__all__ = ["UNLIMITED_RATE", "main"]

UNLIMITED_RATE = ("--rate-per-second", "1e9", "--rate-burst", "1000000000")
"""Flags that take the per-connection rate limit out of the way of a throughput run."""


def main(argv: list[str] | None = None) -> int:
    pin_from_env()
    raise_nofile()
    gc_monitor_from_env()
    exit_with_parent()
    from server_ref.__main__ import main as server_main

    given = sys.argv[1:] if argv is None else argv
    return server_main([*UNLIMITED_RATE, *given])


if __name__ == "__main__":
    sys.exit(main())
