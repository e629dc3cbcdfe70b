"""The README's quick start runs as written against a live server."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from server_ref import Server

ROOT = Path(__file__).resolve().parent.parent


def quick_start_code() -> str:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    code: str = next(b for b in blocks if "asyncio.run(main())" in b)
    return code


@pytest.mark.timeout(30)
async def test_quick_start_runs(server: Server, tmp_path: Path) -> None:
    code = quick_start_code().replace("ws://127.0.0.1:8765", server.url)
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert "bob got: hello" in lines
    assert "echo replied: {'n': 1}" in lines


def test_quick_start_is_about_fifteen_lines() -> None:
    body = [line for line in quick_start_code().splitlines() if line.strip()]
    assert len(body) <= 25
