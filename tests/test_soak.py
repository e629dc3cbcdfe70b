"""Soak: 10 000 malformed and random frames against a real server process.

``python -m server_ref`` runs as a subprocess on 127.0.0.1 (its RSS is read
from ``/proc/<pid>/status``). Several raw websockets clients send hostile
frames (bad JSON, bad UTF-8, binary, unknown types, wrong fields, huge
numbers, deep nesting, frames before ``hello``, second ``hello``s, oversized
messages), reconnecting whenever the server closes them, and a few raw HTTP
long-polling requests carry garbage bodies. Meanwhile one well-behaved
``rtchat_sdk.Client`` keeps sending ``echo`` requests: every one must be
answered with its own data, the server must print no traceback, and its
memory must stay bounded (loosely: below 2x + 50 MB; the numbers are printed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sys
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from rtchat_sdk import Client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

TOTAL_FRAMES = int(os.environ.get("RTCHAT_SOAK_FRAMES", "10000"))
RAW_CLIENTS = 6
TIME_BUDGET = 45.0
"""Seconds the hostile clients get; they stop early when the frames are sent."""

LISTENING = re.compile(r"listening on ws://127\.0\.0\.1:(\d+)")
DOCUMENTED_CLOSES = {1000, 1001, 1007, 1008, 1009, 4002, 4003, 4004, 4005, 4007}
POLL_STATUSES = {200, 400, 404, 405, 413}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def hostile_frame(rng: random.Random) -> tuple[str | bytes, bool]:
    """One malformed or random frame, and whether to send bytes as a *text* message."""
    n = rng.randrange(1, 10**6)
    choices: list[str | bytes] = [
        "{oops",
        "",
        "[]",
        "null",
        '"hello"',
        '{"id": 1}',
        '{"type": 5}',
        '{"type": "subscribe", "id": 1}',
        '{"type": "reply", "id": 1, "data": null}',
        '{"type": "ping", "ts": NaN}',
        '{"type": "ping", "ts": 1e999}',
        f'{{"type": "request", "id": {n}, "event": ["x"]}}',
        f'{{"type": "request", "id": -{n}, "event": "echo"}}',
        f'{{"type": "request", "id": {n}, "event": "echo", "data": {"9" * 5000}}}',
        f'{{"type": "request", "id": {n}, "event": "echo", "data": {"[" * 2000 + "]" * 2000}}}',
        f'{{"type": "request", "id": {n}, "event": "echo", "data": "{"é" * 500}"}}',
        f'{{"type": "request", "id": {n}, "event": "nope"}}',
        f'{{"type": "join", "id": {n}, "room": "soak{n % 7}"}}',
        f'{{"type": "publish", "id": {n}, "room": "soak{n % 7}", "event": "e", "data": {n}}}',
        f'{{"type": "emit", "id": {n}, "event": "echo", "ns": "/nope"}}',
        '{"type": "hello", "protocol": 1, "auth": true}',
        '{"type": "hello", "protocol": 1}',
        '{"type": "hello", "protocol": 2}',
        '{"type": "hello", "protocol": 1, "resume": {"token": "forged", "last_reply": -1}}',
        b"\xff\xfe\x00",
        b'{"type": "ping", "ts": 1}',
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))),
        "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 40))),
    ]
    frame = rng.choice(choices)
    if rng.random() < 0.002:
        return b'{"type": "ping", "ts": "\xff"}', True  # invalid UTF-8 in a text message: 1007
    if rng.random() < 0.0005:
        return '{"type":"emit","id":1,"event":"e","data":"' + "x" * 1_100_000 + '"}', False
    return frame, False


class Counts:
    def __init__(self) -> None:
        self.sent = 0
        self.connections = 0
        self.closes: dict[int | None, int] = {}
        self.errors: dict[str, int] = {}
        self.polls: dict[int, int] = {}


async def drain(ws: ClientConnection, counts: Counts) -> None:
    """Read everything the server answers (so the server never sees a slow consumer)."""
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            frames = json.loads(message)
            for frame in frames if isinstance(frames, list) else [frames]:
                if frame["type"] == "error":
                    counts.errors[frame["code"]] = counts.errors.get(frame["code"], 0) + 1


async def hostile_client(url: str, seed: int, quota: int, counts: Counts, stop: float) -> None:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    left = quota
    while left > 0 and loop.time() < stop:
        try:
            ws = await connect(url, proxy=None, max_size=None, open_timeout=5)
        except (OSError, InvalidHandshake, TimeoutError):
            await asyncio.sleep(0.05)  # the server refused (overloaded): try again shortly
            continue
        counts.connections += 1
        reader = asyncio.create_task(drain(ws, counts))
        try:
            if rng.random() < 0.7:
                await ws.send('{"type": "hello", "protocol": 1, "batch": true}')
            while left > 0 and loop.time() < stop:
                frame, as_text = hostile_frame(rng)
                left -= 1
                counts.sent += 1
                if as_text:
                    await ws.send(frame, text=True)
                else:
                    await ws.send(frame)
                # A WebSocket ping after each frame: its pong comes once the server has
                # read the frame (it reads the next only after handling one), so every
                # frame sent is one the server took, and a close is seen at once.
                await asyncio.wait_for(await ws.ping(), 5)
        except ConnectionClosed:
            pass
        finally:
            if ws.close_code is None:
                await ws.close()
            await reader
            counts.closes[ws.close_code] = counts.closes.get(ws.close_code, 0) + 1


async def garbage_polls(base: str, counts: Counts, rounds: int) -> None:
    """Raw HTTP long-polling requests with garbage bodies and bad session ids (§1.1)."""
    rng = random.Random(99)
    bodies: list[bytes] = [
        b"",
        b"{oops",
        b"{}",
        b"[1, 2]",
        b'[{"type": "hello", "protocol": 1}, NaN]',
        b"\xff\xfe",
        b"[" * 5000 + b"]" * 5000,  # past Python's recursion limit: 400, not a traceback
        b'[{"type": "ping", "ts": 1}]',
        json.dumps([{"type": "bad"}] * 500).encode(),
    ]
    async with httpx.AsyncClient(base_url=base, timeout=10, trust_env=False) as http:
        opened = await http.post("/poll", content=b'[{"type": "hello", "protocol": 1}]')
        sid = opened.json()["sid"] if opened.status_code == 200 else "none"
        for _ in range(rounds):
            body = rng.choice(bodies)
            kind = rng.randrange(4)
            if kind == 0:
                answer = await http.post("/poll", content=body)
            elif kind == 1:
                answer = await http.post(f"/poll?sid={sid}", content=body)
            elif kind == 2:
                answer = await http.post("/poll?sid=forged", content=body)
            else:
                answer = await http.put(f"/poll?sid={sid}", content=body)
            counts.polls[answer.status_code] = counts.polls.get(answer.status_code, 0) + 1
            counts.sent += 1
        await http.delete(f"/poll?sid={sid}")


async def good_client(url: str, done: asyncio.Event) -> tuple[int, int]:
    """Echo requests one after the other until ``done``; (sent, answered right)."""
    sent = answered = 0
    async with Client(url) as client:
        while not done.is_set() or sent == 0:
            sent += 1
            if await client.request("echo", {"n": sent}, timeout=10) == {"n": sent}:
                answered += 1
    return sent, answered


async def test_soak_hostile_frames_while_a_good_client_is_served() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server_ref",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    stderr_task = asyncio.create_task(proc.stderr.read())
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        match = LISTENING.search(line)
        assert match, line
        port = int(match.group(1))
        url = f"ws://127.0.0.1:{port}"

        # Warm up (imports, first connections) before the first measurement.
        async with Client(url) as warm:
            assert await warm.request("echo", "warm", timeout=10) == "warm"
        rss_before = rss_kb(proc.pid)

        counts = Counts()
        done = asyncio.Event()
        good = asyncio.create_task(good_client(url, done))
        loop = asyncio.get_running_loop()
        start = loop.time()
        stop = start + TIME_BUDGET
        polls = 120
        base, extra = divmod(TOTAL_FRAMES - polls, RAW_CLIENTS)
        quotas = [base + (seed < extra) for seed in range(RAW_CLIENTS)]
        await asyncio.gather(
            *(hostile_client(url, seed, quotas[seed], counts, stop) for seed in range(RAW_CLIENTS)),
            garbage_polls(f"http://127.0.0.1:{port}", counts, polls),
        )
        elapsed = loop.time() - start
        done.set()
        sent, answered = await asyncio.wait_for(good, 15)
        rss_after = rss_kb(proc.pid)
        print(
            f"\nsoak: {counts.sent} hostile frames in {elapsed:.1f}s over "
            f"{counts.connections} connections; closes {counts.closes}; "
            f"errors {counts.errors}; poll statuses {counts.polls}; "
            f"good client: {answered}/{sent} requests answered; "
            f"server RSS {rss_before} kB before, {rss_after} kB after"
        )
        assert counts.sent == TOTAL_FRAMES, "ran out of time before the quota"
        assert sent == answered
        assert sent > 10
        assert set(counts.closes) <= DOCUMENTED_CLOSES, counts.closes
        assert set(counts.polls) <= POLL_STATUSES, counts.polls
        assert "internal" not in counts.errors
        assert rss_after < 2 * rss_before + 50_000
        assert proc.returncode is None, "the server died"
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()
        stderr = (await asyncio.wait_for(stderr_task, 10)).decode(errors="replace")
    assert "Traceback" not in stderr, stderr[-5000:]
    assert proc.returncode == 0, stderr[-3000:]
