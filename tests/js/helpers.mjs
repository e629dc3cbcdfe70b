// Fakes for the browser client's unit tests: a clock with timers, a WebSocket, a
// long-polling server behind a fake fetch. Everything is driven by the test: time
// moves only in `clock.advance()`, sockets open only when the test says so, and
// `settle()` lets pending promise callbacks run (a real macrotask turn: every
// microtask queued before it runs first), so no test waits on real time.

import { Client } from "../../rtchat_sdk/web/rtchat.js";

/** Let every pending promise callback run (they do before the next macrotask). */
export async function settle() {
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
}

/** Time in seconds, and timers on it; nothing fires until `advance`. */
export class FakeClock {
  constructor() {
    this.now = 0;
    this.timers = new Map();
    this.seq = 0;
    this.clock = () => this.now;
    this.setTimeout = (fn, ms) => {
      const id = ++this.seq;
      this.timers.set(id, { at: this.now + Math.max(0, ms || 0) / 1000, fn });
      return id;
    };
    this.clearTimeout = (id) => this.timers.delete(id);
  }

  /** Run every timer due within `seconds`, in time order, settling promises between them. */
  async advance(seconds) {
    const end = this.now + seconds;
    await settle();
    for (;;) {
      let next = null;
      for (const [id, t] of this.timers) if (t.at <= end && (next === null || t.at < next[1].at)) next = [id, t];
      if (next === null) break;
      this.timers.delete(next[0]);
      this.now = Math.max(this.now, next[1].at);
      next[1].fn();
      await settle();
    }
    this.now = end;
    await settle();
  }
}

/** A WebSocket class whose instances the test opens, feeds and closes. */
export function fakeWebSocketClass() {
  class FakeWebSocket {
    static instances = [];
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.closedWith = null;
      FakeWebSocket.instances.push(this);
    }
    static get last() {
      return FakeWebSocket.instances.at(-1);
    }
    send(text) {
      if (this.readyState !== 1) throw new Error("send on a WebSocket that is not open");
      this.sent.push(text);
    }
    close(code, reason) {
      if (this.readyState >= 2) return;
      this.readyState = 2;
      this.closedWith = { code, reason };
      queueMicrotask(() => this.serverClose(code ?? 1005, reason ?? ""));
    }
    // --- the test's side
    accept() {
      this.readyState = 1;
      this.onopen?.({});
    }
    fail() {
      this.onerror?.({});
      this.readyState = 3;
      this.onclose?.({ code: 1006, reason: "" });
    }
    deliver(frame) {
      this.onmessage?.({ data: typeof frame === "string" ? frame : JSON.stringify(frame) });
    }
    serverClose(code, reason = "") {
      if (this.readyState === 3) return;
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
    frames() {
      return this.sent.map((text) => JSON.parse(text));
    }
  }
  return FakeWebSocket;
}

/** A welcome frame, with overrides. */
export function welcome(over = {}) {
  return {
    type: "welcome", protocol: 1, session: "s1", token: "tok1", resumed: false,
    heartbeat: { interval: 20, timeout: 10 },
    limits: { max_frame_bytes: 1 << 20, max_in_flight: 1000, history_size: 1000, history_seconds: 300, session_ttl: 300, poll_max_frames: 100, poll_timeout: 25 },
    inbox: { stream: `inbox:${over.session ?? "s1"}`, epoch: "ie", offset: 0, ns: null, room: null },
    server: "rtchat", ...over,
  };
}

/** A logger that keeps what it was told. */
export function recordingLogger() {
  const lines = [];
  const log = (level) => (...args) => lines.push([level, args.map(String).join(" ")]);
  return { lines, warn: log("warn"), error: log("error"), debug: log("debug"), info: log("info") };
}

/**
 * A client wired to fakes. Returns {client, clock, WS, logger, states, gaps, received}.
 * `random` defaults to 0.5 so backoff and ping spread are predictable.
 */
export function makeClient(options = {}, url = "ws://example.test/rt") {
  const clock = new FakeClock();
  const WS = fakeWebSocketClass();
  const logger = recordingLogger();
  const client = new Client(url, {
    WebSocket: WS, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout, clock: clock.clock,
    random: () => 0.5, logger, fetch: () => Promise.reject(new TypeError("no fetch in this test")), ...options,
  });
  const states = [];
  const gaps = [];
  const received = [];
  client.onStateChange((state) => states.push([state, client.transport]));
  client.onGap((gap) => gaps.push(gap));
  client.on("m", (data, meta) => received.push({ data, ...meta }));
  return { client, clock, WS, logger, states, gaps, received };
}

/** Connect a fresh client over a fake WebSocket and welcome it; returns the setup and the socket. */
export async function connected(options = {}, welcomeOver = {}) {
  const setup = makeClient(options);
  const connecting = setup.client.connect();
  await settle();
  const ws = setup.WS.last;
  ws.accept();
  await settle();
  ws.deliver(welcome(welcomeOver));
  await connecting;
  return { ...setup, ws };
}

/** A promise's outcome without awaiting it yet: {done, value, error}. */
export function track(promise) {
  const t = { done: false, value: undefined, error: undefined };
  promise.then((v) => Object.assign(t, { done: true, value: v }), (e) => Object.assign(t, { done: true, error: e }));
  return t;
}

/**
 * A long-polling server behind a fake `fetch` (PROTOCOL §1.1), as the test drives it:
 * `push(frames)` queues a batch, held polls are answered at once when one is queued;
 * `loseNextPoll()` loses the next batch's answer on the way (a network error).
 */
export class FakePollServer {
  constructor() {
    this.requests = []; // {method, url, body}
    this.posts = []; // bodies of POSTs after the opening one, parsed
    this.batches = []; // batches not yet acknowledged: {cursor, frames, close}
    this.cursor = 0;
    this.held = null;
    this.lose = 0;
    this.holdPosts = false;
    this.heldPosts = [];
    this.statuses = []; // [status, json] answers for the next GETs (502, 404...)
    this.fetch = (url, init = {}) => this._fetch(new URL(url), init);
  }

  push(frames, close = undefined) {
    this.cursor += 1;
    this.batches.push({ cursor: this.cursor, frames, close });
    this._answerHeld();
  }

  loseNextPoll() {
    this.lose += 1;
  }

  gets() {
    return this.requests.filter((r) => r.method === "GET");
  }

  _answerHeld() {
    if (!this.held) return;
    const { ack, resolve, reject } = this.held;
    this._heldReject = reject;
    const batch = this.batches.find((b) => b.cursor === ack + 1);
    if (batch) {
      this.held = null;
      if (this.lose > 0) {
        this.lose -= 1; // the answer is lost on the way: the batch stays unacknowledged
        return this._heldReject(new TypeError("fetch failed: connection reset"));
      }
      resolve(respond(200, { cursor: batch.cursor, frames: batch.frames, ...(batch.close ? { close: batch.close } : {}) }));
    }
  }

  _fetch(url, init) {
    const method = init.method ?? "GET";
    const body = init.body === undefined ? undefined : JSON.parse(init.body);
    this.requests.push({ method, url, body });
    if (method === "POST" && !url.searchParams.has("sid")) return Promise.resolve(respond(200, { sid: "sid-1" }));
    if (method === "POST") {
      this.posts.push(body);
      if (this.holdPosts) return new Promise((resolve) => this.heldPosts.push(() => resolve(respond(200, { ok: true }))));
      return Promise.resolve(respond(200, { ok: true }));
    }
    if (method === "DELETE") return Promise.resolve(respond(200, { ok: true }));
    const ack = Number(url.searchParams.get("ack"));
    this.batches = this.batches.filter((b) => b.cursor > ack);
    if (this.statuses.length) {
      const [status, json] = this.statuses.shift();
      return Promise.resolve(respond(status, json));
    }
    if (this.held) this.held.resolve(respond(200, { cursor: this.held.ack, frames: [] })); // one poll at a time
    return new Promise((resolve, reject) => {
      this.held = { ack, resolve, reject };
      init.signal?.addEventListener("abort", () => {
        if (this.held?.resolve === resolve) this.held = null;
        reject(Object.assign(new Error("aborted"), { name: "AbortError" }));
      });
      this._answerHeld();
    });
  }
}

function respond(status, json) {
  const text = JSON.stringify(json);
  return { status, text: () => Promise.resolve(text), json: () => Promise.resolve(json) };
}
