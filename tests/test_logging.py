"""Library logging: silent unless the app configures logging, as libraries should."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(30)

# Each script makes the SDK or the server log a WARNING or an ERROR, with no
# logging configured by the "app", then says it got there.
_CLIENT_RETRIES = """
    import asyncio, socket
    from rtchat_sdk import Client, GaveUp, ReconnectPolicy

    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        policy = ReconnectPolicy(initial_delay=0.01, max_attempts=2)
        client = Client(f"ws://127.0.0.1:{port}", retry_first_connect=True, reconnect=policy)
        try:
            await client.connect()
        except GaveUp:
            print("gave up")

    asyncio.run(main())
"""

_SERVER_HANDLER_RAISES = """
    import asyncio
    from rtchat_sdk import Client, HandlerError
    from server_ref import Server

    async def main() -> None:
        server = Server()

        @server.on("boom")
        def boom(ctx: object, data: object) -> None:
            raise RuntimeError("boom")

        await server.start("127.0.0.1", 0)
        try:
            async with Client(server.url) as client:
                try:
                    await client.request("boom", timeout=5)
                except HandlerError:
                    print("handler failed")
        finally:
            await server.close()

    asyncio.run(main())
"""


def _run(script: str, *, configure: bool) -> subprocess.CompletedProcess[str]:
    prelude = "import logging; logging.basicConfig(level=logging.WARNING)\n" if configure else ""
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )


@pytest.mark.parametrize(
    ("script", "reached", "logged"),
    [
        (_CLIENT_RETRIES, "gave up", "WARNING:rtchat_sdk:connection attempt failed"),
        (_SERVER_HANDLER_RAISES, "handler failed", "ERROR:server_ref:"),
    ],
)
def test_nothing_reaches_stderr_unless_the_app_configures_logging(
    script: str, reached: str, logged: str
) -> None:
    quiet = _run(script, configure=False)
    assert quiet.stdout.strip() == reached
    assert quiet.stderr == ""
    # The same run with logging configured shows what the library logged.
    loud = _run(script, configure=True)
    assert loud.stdout.strip() == reached
    assert logged in loud.stderr
