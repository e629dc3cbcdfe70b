"""Type checkers see the installed package from outside the repo (editable or not)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

_USER_CODE = """
    from typing import assert_type

    from rtchat_sdk import Client, Event, SyncClient
    from server_ref import Context, Server


    class Ping(Event, name="ping"):
        n: int


    async def use(client: Client, server: Server) -> None:
        assert_type(await client.request(Ping(n=1), response=Ping), Ping)
        assert_type(await client.publish("room", Ping(n=2)), int)
        assert_type(SyncClient("ws://127.0.0.1:8765").ping(), float)

        @server.on(Ping)
        def answer(ctx: Context, ping: Ping) -> Ping:
            return ping
"""


def test_mypy_strict_checks_user_code_outside_the_repo(tmp_path: Path) -> None:
    user = tmp_path / "user_app.py"
    user.write_text(textwrap.dedent(_USER_CODE))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--cache-dir",
            str(tmp_path / "cache"),
            user.name,
        ],
        cwd=tmp_path,  # no project config, no repo on the path: only what pip installed
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found in 1 source file" in done.stdout
