"""Entry point of a client process: run one scenario of one implementation."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.common import emit, pin_from_env, raise_nofile

Runner = Callable[[str, str, dict[str, Any], int], Awaitable[dict[str, Any] | None]]


def _runner(impl: str) -> Runner:
    if impl.startswith("rtchat"):  # every rtchat variant runs the same client program
        from benchmarks.clients.rtchat_client import run as rtchat_run

        return rtchat_run
    if impl in ("ws", "ws-deflate"):
        from benchmarks.clients.ws_client import run as ws_run

        return ws_run
    if impl == "sio":
        from benchmarks.clients.sio_client import run as sio_run

        return sio_run
    raise SystemExit(f"unknown implementation {impl!r}")


async def _call(
    run: Runner, scenario: str, url: str, params: dict[str, Any], server_pid: int
) -> dict[str, Any] | None:
    return await run(scenario, url, params, server_pid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clients")
    parser.add_argument("impl")
    parser.add_argument("scenario")
    parser.add_argument("--url", required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--params", default="{}", help="scenario parameters as JSON")
    args = parser.parse_args(argv)
    pin_from_env()
    raise_nofile()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    params: dict[str, Any] = json.loads(args.params)
    if params.get("nice"):
        os.nice(int(params["nice"]))  # a load generator: it must not starve the probe
    run = _runner(args.impl)
    try:
        result = asyncio.run(_call(run, args.scenario, args.url, params, args.server_pid))
    except Exception as exc:
        traceback.print_exc()
        emit({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    if result is not None:
        emit({"event": "result", **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
