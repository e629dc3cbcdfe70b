"""The browser client's own tests (``tests/js/*.test.mjs``), run by Node's test runner.

``node --test tests/js/`` runs the unit tests (fake WebSocket, fake fetch, fake
clock) and the integration tests, which start ``python -m server_ref`` on free
loopback ports themselves and kill them by PID. ``--experimental-websocket``
gives Node 20 the global WebSocket those use (Node 22 has it anyway). Without
Node >= 20 the test is skipped, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"
RUN_TIMEOUT = 150.0  # seconds for the whole Node run; it takes a few


def _node_problem() -> str | None:
    """Why the JS tests cannot run here, or None."""
    node = shutil.which("node")
    if node is None:
        return "node is not on the PATH"
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout.strip()
    match = re.match(r"v(\d+)\.", version)
    if match is None or int(match.group(1)) < 20:
        return f"node {version or '(unknown version)'} is older than 20"
    return None


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_the_browser_client_passes_its_node_tests() -> None:
    problem = _node_problem()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"CI=true, and the JS tests cannot run: {problem}")
        pytest.skip(f"JS tests cannot run: {problem}")
    node = shutil.which("node")
    assert node is not None
    result = subprocess.run(
        [node, "--experimental-websocket", "--test", "tests/js/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,  # kills node if it overruns
        check=False,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
    )
    output = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, f"node --test tests/js/ failed:\n{output}"
    assert _count("pass", result.stdout) > 0, f"no test ran:\n{output}"
    if IN_CI:  # the integration tests must really run there
        skipped = _count("skipped", result.stdout) != 0 or "# SKIP" in result.stdout
        assert not skipped, f"tests were skipped:\n{output}"


def _count(what: str, tap: str) -> int:
    """A total from the runner's summary (``# pass 29``); -1 when it is missing."""
    match = re.search(rf"^# {what} (\d+)$", tap, re.MULTILINE)
    return -1 if match is None else int(match.group(1))
