"""The browser client (``/rtchat.js``) and the demo page (``/demo/``) in real Chromium.

Playwright drives Debian's ``/usr/bin/chromium`` (headless, one browser for the
module) against a real ``python -m server_ref --demo`` process on a free
loopback port, killed by PID at the end. Pages talk to Python clients of the
same server, over WebSocket and over HTTP long polling; a proxy in front of
the server refuses WebSocket upgrades (the fallback), or cuts every link while
messages flow (reliability). The tests skip without Chromium or playwright,
except under ``CI=true``, where they fail.

Every wait is on a condition with a timeout (``Tab.wait``, ``Received.wait_for``,
Playwright's ``wait_for_function``/``expect``); none sleeps.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from rtchat_sdk import Client, Delivery, ReconnectPolicy
from tests.browser_support import (
    CHROMIUM,
    STEP,
    ServerProcess,
    Tab,
    UpgradeRefusingProxy,
    browser_problem,
)
from tests.faultproxy import FaultProxy

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, Page

PROBLEM = browser_problem()
IN_CI = os.environ.get("CI") == "true"

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(
        PROBLEM is not None and not IN_CI, reason=f"browser tests cannot run: {PROBLEM}"
    ),
]

FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.3)
"""For Python clients that must come back quickly after a fault."""

PAGE_FAST = {"initialDelay": 0.05, "maxDelay": 0.3}
"""The same, as the browser client's ``reconnect`` option."""

BOTH = pytest.mark.parametrize("transport", ["websocket", "polling"])

SCREENSHOTS = Path(__file__).resolve().parent.parent / "build" / "screenshots"
"""Where the demo test leaves its screenshots of the chat page."""


# ----------------------------------------------------------------------
# Fixtures: one browser and one server for the module


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    if PROBLEM is not None:  # only reached under CI=true (else the module is skipped)
        pytest.fail(f"CI=true, and the browser tests cannot run: {PROBLEM}")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rtserver() -> AsyncIterator[ServerProcess]:
    """``python -m server_ref --demo`` on a free port, for the whole module."""
    server = await ServerProcess.start("--demo")
    try:
        yield server
    finally:
        await server.kill()
    assert server.tracebacks == 0, server.transcript()


@pytest_asyncio.fixture(loop_scope="module")
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile (cookies, storage) per test."""
    ctx = await browser.new_context()
    try:
        yield ctx
    finally:
        await ctx.close()


@pytest.fixture
def room() -> str:
    """A room no other test uses (the server lives for the whole module)."""
    return f"room-{uuid.uuid4().hex[:10]}"


class Received:
    """What a Python client handled on ``event``: (data, offset, sender), in order."""

    def __init__(self, client: Client, event: str = "m") -> None:
        self.items: list[tuple[Any, int, str | None]] = []
        self._changed = asyncio.Event()
        client.on(event)(self._add)

    def _add(self, data: Any, meta: Delivery) -> None:
        self.items.append((data, meta.offset, meta.sender))
        self._changed.set()

    async def until(self, done: Callable[[], bool], timeout: float = STEP) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"not within {timeout}s; received {self.items}") from None

    async def wait_for(self, count: int) -> list[tuple[Any, int, str | None]]:
        await self.until(lambda: len(self.items) >= count)
        return self.items

    def data(self) -> list[Any]:
        return [data for data, _, _ in self.items]


async def new_tab(context: BrowserContext, origin: str) -> Tab:
    return await Tab.open(await context.new_page(), origin)


# ----------------------------------------------------------------------
# The browser client against a Python client


@BOTH
async def test_a_page_and_a_python_client_talk_both_ways(
    context: BrowserContext, rtserver: ServerProcess, room: str, transport: str
) -> None:
    tab = await new_tab(context, rtserver.http_url)
    started = await tab.start(rtserver.ws_url, transports=[transport], name="browser-test")
    assert started["transport"] == transport
    assert await tab.transport() == transport
    states = await tab.states()
    assert states[-1] == {"state": "connected", "transport": transport}, states

    async with Client(rtserver.ws_url) as python:
        got = Received(python)
        await tab.js("(r) => t.client.join(r)", room)
        await python.join(room)

        sent = [await python.publish(room, "m", {"n": i, "from": "python"}) for i in range(20)]
        items = await tab.wait_received(20)
        assert [item["data"] for item in items] == [{"n": i, "from": "python"} for i in range(20)]
        assert [item["offset"] for item in items] == sent
        assert {item["room"] for item in items} == {room}
        assert {item["sender"] for item in items} == {python.session_id}

        offsets = await tab.js(
            """async (r) => {
                const offsets = [];
                for (let i = 0; i < 20; i++) {
                    offsets.push(await t.client.publish(r, "m", { n: i, from: "browser" }));
                }
                return offsets;
            }""",
            room,
        )
        await got.wait_for(20)
        assert got.data() == [{"n": i, "from": "browser"} for i in range(20)]
        assert [offset for _, offset, _ in got.items] == offsets
        assert offsets[0] > sent[-1]
        senders = {sender for _, _, sender in got.items}
        assert len(senders) == 1
        assert senders != {python.session_id}  # the page's own session

        payload = {"text": "héllo 😀 <b>&amp;</b>", "list": [1, 2.5, None, True], "nested": {}}
        answer = await tab.js("(d) => t.client.request('echo', d, { timeout: 5 })", payload)
        assert answer == payload

        assert len(await tab.received()) == 20  # the page does not get its own publishes
        await tab.close()
        await tab.wait_state("closed")
        assert await tab.js("() => t.gaps") == []


@BOTH
async def test_many_calls_at_once_from_a_page_are_each_answered_once(
    context: BrowserContext, rtserver: ServerProcess, transport: str
) -> None:
    """250 requests in one go: over polling they go in several POSTs (at most
    ``poll_max_frames`` frames each); every answer matches its request."""
    tab = await new_tab(context, rtserver.http_url)
    await tab.start(rtserver.ws_url, transports=[transport])
    answers = await tab.js(
        """() => Promise.all(Array.from({ length: 250 },
            (_, i) => t.client.request("echo", { i, text: "é".repeat(i % 7) }, { timeout: 10 })))"""
    )
    assert answers == [{"i": i, "text": "é" * (i % 7)} for i in range(250)]
    refused = await tab.js(
        """() => t.client.request("echo", { x: [1, NaN] }).then(
            () => "sent", (e) => [e instanceof rtchat.ValidationFailed, e.name, e.message])"""
    )
    assert refused[:2] == [True, "ValidationFailed"], refused
    assert "data.x[1] is NaN" in refused[2], refused
    assert await tab.js("() => t.client.outboxSize") == 0
    await tab.close()


# ----------------------------------------------------------------------
# Fallback to long polling


async def test_a_page_behind_a_proxy_that_refuses_websocket_falls_back_to_polling(
    context: BrowserContext, rtserver: ServerProcess, room: str
) -> None:
    async with UpgradeRefusingProxy(rtserver.port) as proxy:
        origin = f"http://127.0.0.1:{proxy.port}"
        tab = await new_tab(context, origin)  # the page and rtchat.js come through the proxy
        started = await tab.start(
            f"ws://127.0.0.1:{proxy.port}", transports=["websocket", "polling"]
        )
        assert started["transport"] == "polling"
        assert proxy.refused >= 1  # a WebSocket was tried first, and refused
        states = await tab.states()
        assert {"state": "connected", "transport": "polling"} in states, states
        # The client says that it fell back (as the Python client logs a warning).
        said = [text for kind, text in tab.console if "polling" in text.lower()]
        assert said, f"nothing on the console says the client fell back: {tab.console}"

        async with Client(rtserver.ws_url) as python:
            got = Received(python)
            await tab.js("(r) => t.client.join(r)", room)
            await python.join(room)
            await python.publish(room, "m", "to the page")
            assert [item["data"] for item in await tab.wait_received(1)] == ["to the page"]
            await tab.js("(r) => t.client.publish(r, 'm', 'to python')", room)
            assert (await got.wait_for(1))[0][0] == "to python"
            assert await tab.js("() => t.client.request('echo', 42, { timeout: 5 })") == 42
        assert await tab.transport() == "polling"
        await tab.close()


async def test_a_page_on_an_asgi_app_without_websocket_falls_back_to_polling(
    context: BrowserContext,
) -> None:
    from server_ref.asgi import create_app
    from tests.test_asgi import echo_server, serving

    async with serving(create_app(echo_server(), websocket=False)) as base:
        tab = await new_tab(context, base)
        started = await tab.start(base.replace("http://", "ws://"))  # default transports
        assert started["transport"] == "polling"
        assert await tab.js("() => t.client.request('echo', 'over http', { timeout: 5 })") == (
            "over http"
        )
        await tab.close()


# ----------------------------------------------------------------------
# Reliability: the link is cut under the page while messages flow both ways


@pytest.mark.slow
@pytest.mark.timeout(60)
@BOTH
async def test_a_cut_link_loses_duplicates_and_reorders_nothing_in_the_browser(
    context: BrowserContext, rtserver: ServerProcess, room: str, transport: str
) -> None:
    async with FaultProxy(rtserver.port) as proxy:
        tab = await new_tab(context, proxy.url.replace("ws://", "http://"))
        await tab.start(proxy.url, transports=[transport], reconnect=PAGE_FAST)
        async with Client(rtserver.ws_url, reconnect=FAST) as python:
            got = Received(python)
            await tab.js("(r) => t.client.join(r)", room)
            await python.join(room)

            # Both ways at once, and the link is cut in the middle of it.
            await tab.js("([r, v]) => t.publishMany(r, v)", [room, list(range(10))])
            for i in range(10):
                await python.publish(room, "m", i)
            proxy.refuse(True)  # no way back until the test says so
            assert proxy.drop() >= 1
            await tab.wait("() => t.states.at(-1).state !== 'connected'", timeout=STEP)

            # While the page is cut off: it publishes into its outbox, Python publishes
            # into the room (the page must get it by replay).
            await tab.js("([r, v]) => t.publishMany(r, v)", [room, list(range(10, 30))])
            for i in range(10, 30):
                await python.publish(room, "m", i)
            assert await tab.js("() => t.client.outboxSize") >= 20  # held, unanswered
            assert all(data < 10 for data in got.data())  # nothing came through the cut

            proxy.refuse(False)
            await tab.wait_state("connected", count=2, timeout=STEP + 5)

            await tab.js("([r, v]) => t.publishMany(r, v)", [room, list(range(30, 40))])
            for i in range(30, 40):
                await python.publish(room, "m", i)
            offsets = await tab.js("() => t.settle()")  # every page publish was answered
            assert len(offsets) == 40
            assert offsets == sorted(set(offsets))  # increasing: in order, each once

            # Settle each side with a last message: a room's stream is delivered in
            # order, so once it arrived, everything before it (duplicates too) did.
            await python.publish(room, "m", "end")
            await tab.wait("() => t.received.some((x) => x.data === 'end')")
            await tab.js("(r) => t.client.publish(r, 'm', 'end')", room)
            await got.until(lambda: "end" in got.data())

            page_got = [item["data"] for item in await tab.received()]
            assert page_got == [*range(40), "end"], page_got
            page_offsets = [item["offset"] for item in await tab.received()]
            assert page_offsets == sorted(set(page_offsets))
            assert got.data() == [*range(40), "end"]
            assert [offset for _, offset, _ in got.items[:40]] == offsets
            assert await tab.js("() => t.gaps") == []
            assert await tab.transport() == transport
            counters = await tab.js("() => t.client.counters")
            assert counters["reconnects"] == 1, counters
            assert counters["sent"] == 42, counters  # join, 40 publishes, "end": once each
            assert counters["outboxSize"] == 0, counters
            assert counters["gaps"] == 0, counters
            states = [entry["state"] for entry in await tab.states()]
            assert states == ["connecting", "connected", "reconnecting", "connected"], states
        await tab.close()
    assert proxy.stats.drops == 1


@pytest.mark.slow
@BOTH
async def test_a_half_open_link_is_noticed_by_heartbeats_and_nothing_is_lost(
    context: BrowserContext, room: str, transport: str
) -> None:
    """A middlebox that silently discards traffic: only the heartbeats can tell."""
    server = await ServerProcess.start("--heartbeat-interval", "0.5", "--heartbeat-timeout", "1")
    try:
        async with FaultProxy(server.port) as proxy:
            tab = await new_tab(context, proxy.url.replace("ws://", "http://"))
            await tab.start(proxy.url, transports=[transport], reconnect=PAGE_FAST)
            async with Client(server.ws_url, reconnect=FAST) as python:
                got = Received(python)
                await tab.js("(r) => t.client.join(r)", room)
                await python.join(room)
                await tab.js("([r, v]) => t.publishMany(r, v)", [room, list(range(5))])
                for i in range(5):
                    await python.publish(room, "m", i)
                await tab.wait_received(5)
                await got.wait_for(5)

                proxy.blackhole(True)
                await tab.js("([r, v]) => t.publishMany(r, v)", [room, list(range(5, 10))])
                for i in range(5, 10):
                    await python.publish(room, "m", i)
                await tab.wait_state("reconnecting")  # declared dead: no pong came
                proxy.end_blackhole()
                await tab.wait_state("connected", count=2)
                assert len(await tab.js("() => t.settle()")) == 10

                await python.publish(room, "m", "end")
                await tab.wait("() => t.received.some((x) => x.data === 'end')")
                await tab.js("(r) => t.client.publish(r, 'm', 'end')", room)
                await got.until(lambda: "end" in got.data())
                assert [item["data"] for item in await tab.received()] == [*range(10), "end"]
                assert got.data() == [*range(10), "end"]
                assert await tab.js("() => t.gaps") == []
                assert await tab.js("() => t.client.counters.reconnects") == 1
            await tab.close()
    finally:
        await server.kill()


@pytest.mark.slow
async def test_a_restarted_memory_server_makes_the_page_report_gaps_and_carry_on(
    context: BrowserContext, room: str
) -> None:
    """A memory-only server that restarts has lost its streams: the page says so per
    stream (onGap), is put back in its room, and gets what is published next."""
    from tests.helpers import free_port

    port = free_port()
    server = await ServerProcess.start("--port", str(port))
    try:
        tab = await new_tab(context, server.http_url)
        await tab.start(server.ws_url, reconnect=PAGE_FAST)
        async with Client(server.ws_url, reconnect=FAST) as python:
            await tab.js("(r) => t.client.join(r)", room)
            await python.join(room)
            for i in range(3):
                await python.publish(room, "m", i)
            await tab.wait_received(3)
            old_session = await tab.js("() => t.client.sessionId")

            await server.kill()
            await tab.wait_state("reconnecting")
            server = await ServerProcess.start("--port", str(port))
            await tab.wait_state("connected", count=2)
            await tab.wait("() => t.gaps.length >= 2")
            gaps = {
                (gap["stream"], gap["room"], gap["reason"]) for gap in await tab.js("() => t.gaps")
            }
            assert (f"inbox:{old_session}", None, "session_unknown") in gaps, gaps
            assert any(stream.startswith("room:") and name == room for stream, name, _ in gaps), (
                gaps
            )

            await python.publish(room, "m", "after")  # python is back in the room too
            items = await tab.wait_received(4)
            assert [item["data"] for item in items] == [0, 1, 2, "after"]
            assert await tab.js("() => t.client.sessionId") != old_session
        await tab.close()
    finally:
        await server.kill()


# ----------------------------------------------------------------------
# The demo page


async def open_demo(browser: Browser, url: str, errors: list[str]) -> tuple[BrowserContext, Page]:
    """A demo page in a context of its own; its uncaught errors go to ``errors``."""
    context = await browser.new_context()
    page = await context.new_page()
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(url, timeout=STEP * 1000)
    await page.wait_for_function("document.body.dataset.ready === 'true'", timeout=STEP * 1000)
    return context, page


async def test_two_people_chat_on_the_demo_page_one_over_polling(
    browser: Browser, rtserver: ServerProcess, room: str
) -> None:
    from playwright.async_api import expect

    demo = f"{rtserver.http_url}/demo/"
    people = {"alice": f"{demo}?room={room}", "bob": f"{demo}?transport=polling&room={room}"}
    errors: list[str] = []
    opened = {name: await open_demo(browser, url, errors) for name, url in people.items()}
    try:
        pages = {name: page for name, (_, page) in opened.items()}
        for name, page in pages.items():
            await page.get_by_test_id("name-input").fill(name)
            await page.get_by_test_id("connect-button").click()
        for name, transport in (("alice", "websocket"), ("bob", "polling")):
            page = pages[name]
            await expect(page.get_by_test_id("state")).to_have_text("connected")
            await expect(page.get_by_test_id("transport")).to_have_text(transport)
            await expect(page.locator(f'[data-testid="room"][data-room="{room}"]')).to_have_count(1)
            await expect(page.get_by_test_id("chat-title")).to_have_text(f"# {room}")

        async def say(name: str, text: str) -> None:
            page = pages[name]
            await page.get_by_test_id("message-input").fill(text)
            await page.get_by_test_id("send-button").click()
            mine = page.locator('[data-testid="message"][data-status="sent"]').filter(has_text=text)
            await expect(mine).to_have_count(1)  # answered by the server

        await say("alice", "hi bob")
        await say("bob", "hello alice")
        hostile = '<img src=x onerror="window.pwned=1"><b>bold</b> & done'
        await say("alice", hostile)

        def messages(name: str) -> Any:
            return pages[name].get_by_test_id("messages").get_by_test_id("message")

        await expect(messages("bob")).to_have_count(3)
        await expect(messages("alice")).to_have_count(3)
        for name in ("alice", "bob"):
            names = messages(name).get_by_test_id("message-name")
            texts = messages(name).get_by_test_id("message-text")
            await expect(names).to_have_text(["alice", "bob", "alice"])
            await expect(texts).to_have_text(["hi bob", "hello alice", hostile])
            page = pages[name]
            assert await page.evaluate("() => window.pwned") is None
            assert await page.locator("#messages img, #messages b").count() == 0
        # Someone who comes later sees what was said (history), then the room live.
        opened["carol"] = await open_demo(browser, f"{demo}?room={room}", errors)
        carol = pages["carol"] = opened["carol"][1]
        await carol.get_by_test_id("name-input").fill("carol")
        await carol.get_by_test_id("connect-button").click()
        await expect(carol.get_by_test_id("state")).to_have_text("connected")
        earlier = messages("carol").get_by_test_id("message-text")
        await expect(earlier).to_have_text(["hi bob", "hello alice", hostile])
        await say("bob", "welcome carol")
        await expect(earlier).to_have_text(["hi bob", "hello alice", hostile, "welcome carol"])
        assert await carol.locator("#messages img, #messages b").count() == 0
        for name, page in pages.items():  # for a person to look at (build/ is not tracked)
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=SCREENSHOTS / f"demo-{name}.png", full_page=True)

        await pages["bob"].get_by_test_id("leave-button").click()
        await expect(pages["bob"].get_by_test_id("room")).to_have_count(0)
        await pages["alice"].get_by_test_id("disconnect-button").click()
        await expect(pages["alice"].get_by_test_id("state")).to_have_text("closed")
        assert errors == []
    finally:
        for context, _ in opened.values():
            await context.close()


async def test_the_demo_page_works_under_a_prefix_and_talks_to_python(
    browser: Browser, room: str
) -> None:
    """Mounted at ``/rt`` in FastAPI, the page finds ``../rtchat.js`` and the server
    (``ws://host/rt/``, long polling at ``/rt/poll``) relative to itself."""
    from fastapi import FastAPI
    from playwright.async_api import expect

    from server_ref import ServerConfig
    from server_ref.asgi import create_app
    from tests.test_asgi import echo_server, serving

    rtchat = create_app(echo_server(ServerConfig(demo=True)))
    app = FastAPI(lifespan=rtchat.lifespan)
    app.mount("/rt", rtchat)
    errors: list[str] = []
    async with serving(app) as base:
        context, page = await open_demo(browser, f"{base}/rt/demo", errors)
        try:
            assert page.url == f"{base}/rt/demo/"  # redirected to the folder
            await page.goto(f"{base}/rt/demo/?transport=polling&name=carol&room={room}")
            await page.wait_for_function(
                "document.body.dataset.ready === 'true'", timeout=STEP * 1000
            )
            async with Client(base.replace("http://", "ws://") + "/rt/") as python:
                got = Received(python, "chat.message")
                await python.join(room)
                await page.get_by_test_id("connect-button").click()
                await expect(page.get_by_test_id("state")).to_have_text("connected")
                await expect(page.get_by_test_id("transport")).to_have_text("polling")
                await expect(page.get_by_test_id("chat-title")).to_have_text(f"# {room}")

                await page.get_by_test_id("message-input").fill("hi from the page")
                await page.get_by_test_id("send-button").click()
                await got.wait_for(1)
                assert got.data() == [{"name": "carol", "text": "hi from the page"}]

                await python.publish(room, "chat.message", {"name": "dave", "text": "hi carol"})
                message = page.get_by_test_id("messages").get_by_test_id("message").last
                await expect(message.get_by_test_id("message-name")).to_have_text("dave")
                await expect(message.get_by_test_id("message-text")).to_have_text("hi carol")
            # Leaving says goodbye (DELETE /rt/poll), so no poll is left held: uvicorn's
            # shutdown below waits for requests in progress.
            await page.get_by_test_id("disconnect-button").click()
            await expect(page.get_by_test_id("state")).to_have_text("closed")
            assert errors == []
        finally:
            await context.close()
