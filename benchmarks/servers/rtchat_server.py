"""The rtchat server under test: the shipped ``rtchat-server`` command line.

``python -m benchmarks.servers.rtchat_server --port 0 [rtchat-server flags]``

This only pins the process to its CPU and raises the open-files limit, then
runs ``server_ref.__main__.main`` unchanged (built-in ``echo`` handler,
in-memory broker, rooms and publish as shipped). It prints
``rtchat server listening on ws://HOST:PORT`` once bound; SIGTERM shuts down
gracefully and exits 0.
"""

from __future__ import annotations

import sys

from benchmarks.common import (
    exit_with_parent,
    gc_monitor_from_env,
    pin_from_env,
    raise_nofile,
)

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    pin_from_env()
    raise_nofile()
    gc_monitor_from_env()
    exit_with_parent()
    from server_ref.__main__ import main as server_main

    return server_main(argv)


if __name__ == "__main__":
    sys.exit(main())
