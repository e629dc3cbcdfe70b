// The browser client against a real reference server (python -m server_ref) on a free
// loopback port: WebSocket (Node's global WebSocket, under --experimental-websocket
// on Node 20) against the default server, HTTP long polling (fetch) against the
// server run through uvicorn (--asgi). Each server is killed by its PID at the end.
// Every wait is on an event with a timeout; nothing sleeps.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import net from "node:net";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import { Client, NotEnabled, UnknownEvent } from "../../rtchat_sdk/web/rtchat.js";

const ROOT = fileURLToPath(new URL("../../", import.meta.url));
const PYTHON = `${ROOT}.venv/bin/python`;
const STEP = 10_000; // ms: the bound on any one wait; only reached when something is wrong
const T = { timeout: 30_000 };
const NO_PYTHON = existsSync(PYTHON) ? false : `no Python venv at ${PYTHON} (python3 dev.py setup)`;
const NO_WEBSOCKET = typeof WebSocket === "function" ? false : "no global WebSocket (Node 20: run with --experimental-websocket)";
const quiet = { warn() {}, error() {}, debug() {}, info() {} };

/** `python -m server_ref --port 0 ...args`; resolves once it says where it listens. */
function startServer(...args) {
  const proc = spawn(PYTHON, ["-m", "server_ref", "--host", "127.0.0.1", "--port", "0", ...args], {
    cwd: ROOT, env: { ...process.env, PYTHONUNBUFFERED: "1" }, stdio: ["ignore", "pipe", "pipe"],
  });
  const output = [];
  const stop = async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      const exited = new Promise((resolve) => proc.once("exit", resolve));
      process.kill(proc.pid, "SIGKILL");
      await exited;
    }
  };
  const listening = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server not listening within ${STEP} ms:\n${output.join("")}`)), STEP);
    const scan = (chunk) => {
      output.push(String(chunk));
      const match = /rtchat server listening on ws:\/\/127\.0\.0\.1:(\d+)/.exec(output.join(""));
      if (match) {
        clearTimeout(timer);
        resolve(Number(match[1]));
      }
    };
    proc.stdout.on("data", scan);
    proc.stderr.on("data", scan);
    proc.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`server exited (${code}) before listening:\n${output.join("")}`));
    });
  });
  return listening.then((port) => ({ port, url: `ws://127.0.0.1:${port}`, stop, output }), async (error) => {
    await stop();
    throw error;
  });
}

/** Resolves with the first `count` deliveries of `event` to `client`. */
function collect(client, event, count) {
  const got = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`only ${got.length} of ${count} ${event} deliveries within ${STEP} ms`)), STEP);
    client.on(event, (data, meta) => {
      got.push({ data, ...meta });
      if (got.length === count) {
        clearTimeout(timer);
        resolve(got);
      }
    });
  });
}

/** A TCP proxy to `port` on 127.0.0.1 whose links `cut()` breaks (no close frame: a dropped link). */
function cuttableProxy(port) {
  const sockets = new Set();
  const server = net.createServer((down) => {
    const up = net.connect(port, "127.0.0.1");
    const end = () => {
      for (const s of [down, up]) s.destroy(), sockets.delete(s);
    };
    for (const s of [down, up]) sockets.add(s), s.on("error", end).on("close", end);
    down.pipe(up);
    up.pipe(down);
  });
  const cut = () => sockets.forEach((s) => s.destroy());
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve({
    url: `ws://127.0.0.1:${server.address().port}`, cut, close: () => (cut(), new Promise((r) => server.close(r))),
  })));
}

/** Resolves when `client` next reports `state`. */
function nextState(client, state) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${state} within ${STEP} ms`)), STEP);
    const off = client.onStateChange((s) => s === state && (off(), clearTimeout(timer), resolve()));
  });
}

const room = () => `room-${Math.random().toString(36).slice(2, 10)}`;

/** Two clients in one room: each publish reaches the other, in order, with its offset. */
async function talk(a, b) {
  const r = room();
  await a.join(r);
  await b.join(r);
  const toB = collect(b, "chat", 5);
  const offsets = [];
  for (let i = 0; i < 5; i++) offsets.push(await a.publish(r, "chat", { n: i, text: "héllo 😀" }));
  const got = await toB;
  assert.deepEqual(got.map((m) => m.data), [0, 1, 2, 3, 4].map((n) => ({ n, text: "héllo 😀" })));
  assert.deepEqual(got.map((m) => m.offset), offsets);
  assert.ok(got.every((m) => m.room === r && m.sender === a.sessionId && m.ns === "/"));
  const toA = collect(a, "chat", 1);
  const offset = await b.publish(r, "chat", "back");
  assert.deepEqual((await toA).map((m) => [m.data, m.offset, m.sender]), [["back", offset, b.sessionId]]);
  assert.equal(offset, offsets.at(-1) + 1);
}

describe("against the default server, over WebSocket", { skip: NO_PYTHON || NO_WEBSOCKET }, () => {
  let server;
  before(async () => (server = await startServer()));
  after(() => server?.stop());

  test("connect, join, publish between two clients, request echo", T, async () => {
    const a = new Client(server.url, { transports: ["websocket"], logger: quiet });
    const b = new Client(`http://127.0.0.1:${server.port}/`, { transports: ["websocket"], logger: quiet }); // http:// works too
    const states = [];
    a.onStateChange((state) => states.push([state, a.transport]));
    try {
      await a.connect();
      await b.connect();
      assert.equal(a.transport, "websocket");
      assert.deepEqual(states, [["connecting", null], ["connected", "websocket"]]);
      assert.notEqual(a.sessionId, b.sessionId);
      await talk(a, b);
      const payload = { text: "héllo 😀 <b>&amp;</b>", list: [1, 2.5, null, true], nested: {} };
      assert.deepEqual(await a.request("echo", payload, { timeout: 5 }), payload);
      await assert.rejects(a.request("no-such-handler", 1, { timeout: 5 }), UnknownEvent);
      await assert.rejects(a.presence("lobby", { timeout: 5 }), NotEnabled); // no --presence
      assert.ok((await a.ping()) >= 0);
    } finally {
      await a.close();
      await b.close();
    }
    assert.equal(a.state, "closed");
    assert.equal(a.counters.gaps, 0);
  });
  test("a cut link: the outbox is resent and missed deliveries replayed, once each, in order", T, async () => {
    const proxy = await cuttableProxy(server.port);
    const fast = { initialDelay: 0.05, maxDelay: 0.2 };
    const a = new Client(proxy.url, { transports: ["websocket"], reconnect: fast, logger: quiet });
    const b = new Client(server.url, { transports: ["websocket"], logger: quiet });
    try {
      await a.connect();
      await b.connect();
      const r = room();
      await a.join(r);
      await b.join(r);
      const toA = collect(a, "m", 6);
      const toB = collect(b, "m", 6);
      for (let i = 0; i < 3; i++) await b.publish(r, "m", `b${i}`);
      const session = a.sessionId;
      const lost = nextState(a, "reconnecting");
      proxy.cut();
      await lost;
      const back = nextState(a, "connected");
      const fromA = [3, 4, 5].map((i) => a.publish(r, "m", `a${i}`)); // into the outbox while offline
      for (let i = 3; i < 6; i++) await b.publish(r, "m", `b${i}`); // a gets these by replay or live
      await back;
      await Promise.all([0, 1, 2].map((i) => a.publish(r, "m", `a${i}`)));
      const offsets = await Promise.all(fromA);
      assert.deepEqual((await toA).map((m) => m.data), ["b0", "b1", "b2", "b3", "b4", "b5"]);
      const gotB = await toB;
      assert.deepEqual(gotB.map((m) => m.data), ["a3", "a4", "a5", "a0", "a1", "a2"]);
      assert.deepEqual(gotB.slice(0, 3).map((m) => m.offset), offsets);
      assert.equal(a.sessionId, session); // resumed, not a new session
      assert.equal(a.counters.reconnects, 1);
      assert.equal(a.counters.gaps, 0);
    } finally {
      await a.close();
      await b.close();
      await proxy.close();
    }
  });
});

describe("against a server with presence and its events (--presence --presence-events)", { skip: NO_PYTHON || NO_WEBSOCKET }, () => {
  let server;
  before(async () => (server = await startServer("--presence", "--presence-events")));
  after(() => server?.stop());

  test("presence, $join/$leave, and from history to live with join since", T, async () => {
    const options = { transports: ["websocket"], logger: quiet };
    const a = new Client(server.url, { ...options, auth: { user: "ada" }, name: "page/a" });
    const b = new Client(server.url, { ...options, name: "page/b" });
    const c = new Client(server.url, options);
    try {
      await Promise.all([a.connect(), b.connect(), c.connect()]);
      const r = room();
      await a.join(r);
      const comings = collect(a, "$join", 1);
      await b.join(r);
      const [came] = await comings;
      assert.deepEqual([came.data.session, came.data.user, came.data.client, came.sender, came.room], [b.sessionId, null, "page/b", b.sessionId, r]);
      const members = await a.presence(r);
      assert.deepEqual(members.map((m) => [m.session, m.user, m.client]), [[a.sessionId, "ada", "page/a"], [b.sessionId, null, "page/b"]]);
      assert.ok(members.every((m) => typeof m.joined_at === "number"));
      assert.deepEqual(await c.presenceStats(r), { stream: `room:/:${r}`, sessions: 2, users: 1 });

      for (let i = 0; i < 3; i++) await b.publish(r, "chat", `old ${i}`);
      const page = await c.history(r, { reverse: true, limit: 2 });
      assert.deepEqual(page.entries.map((e) => e.data), ["old 2", "old 1"]);
      assert.equal(page.more, true);
      assert.equal(page.gap, null);
      const toC = collect(c, "chat", 2);
      await b.publish(r, "chat", "between"); // after the read, before the join: replayed to c
      await c.join(r, { since: page.position });
      await b.publish(r, "chat", "live");
      assert.deepEqual((await toC).map((m) => m.data), ["between", "live"]);

      const goings = collect(a, "$leave", 1);
      await b.leave(r);
      const [went] = await goings;
      assert.deepEqual([went.data.session, went.data.reason], [b.sessionId, "left"]);
      assert.deepEqual((await a.presence(r)).map((m) => m.session), [a.sessionId, c.sessionId]);
      assert.equal(c.counters.gaps, 0);
    } finally {
      await Promise.all([a.close(), b.close(), c.close()]);
    }
  });
});

describe("against the server under uvicorn (--asgi), over HTTP long polling", { skip: NO_PYTHON }, () => {
  let server;
  before(async () => (server = await startServer("--asgi")));
  after(() => server?.stop());

  test("polling clients join, publish to each other and request echo", T, async () => {
    const a = new Client(server.url, { transports: ["polling"], logger: quiet });
    const b = new Client(server.url, { transports: ["polling"], logger: quiet });
    try {
      await a.connect();
      await b.connect();
      assert.equal(a.transport, "polling");
      await talk(a, b);
      assert.deepEqual(await b.request("echo", ["over", "http"], { timeout: 5 }), ["over", "http"]);
      // More than poll_max_frames (100) at once: the POSTs are split, everything answered in order.
      const answers = await Promise.all(Array.from({ length: 250 }, (_, i) => a.request("echo", i, { timeout: 10 })));
      assert.deepEqual(answers, Array.from({ length: 250 }, (_, i) => i));
    } finally {
      await a.close();
      await b.close();
    }
  });

  test("a WebSocket that cannot be opened falls back to polling on the real server", T, async () => {
    class Refused {
      constructor() {
        setTimeout(() => this.onclose?.({ code: 1006, reason: "" }), 0); // as a proxy refusing upgrades looks
      }
      close() {}
    }
    const warnings = [];
    const c = new Client(server.url, { WebSocket: Refused, logger: { ...quiet, warn: (w) => warnings.push(w) } });
    try {
      await c.connect();
      assert.equal(c.transport, "polling");
      assert.ok(warnings.some((w) => w.includes("polling")), warnings.join("\n"));
      assert.equal(await c.request("echo", "fell back", { timeout: 5 }), "fell back");
    } finally {
      await c.close();
    }
  });
});
