// Unit tests of the browser client over a fake WebSocket and a fake clock.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  AckTimeout, Client, ClientClosed, Forbidden, HandlerError, InvalidFrame, MessageTooLarge, RemoteError,
  RTChatError, SessionReplaced, Unauthorized, UnknownEvent, ValidationFailed, backoffDelays,
  pollingUrl, resolveUrl,
} from "../../rtchat_sdk/web/rtchat.js";
import { connected, makeClient, settle, track, welcome } from "./helpers.mjs";

const T = { timeout: 5000 };
const ROOM = { stream: "room:/:lobby", epoch: "e1" };
const msg = (offset, over = {}) => ({ type: "message", ...ROOM, offset, ns: "/", room: "lobby", event: "m", data: `m${offset}`, sender: "other", ...over });

/** Send a join and answer it at `offset`. */
async function joined(ws, offset = 0) {
  const join = ws.client.join("lobby");
  await settle();
  const frame = ws.frames().at(-1);
  ws.deliver({ type: "reply", id: frame.id, data: { ...ROOM, offset } });
  return join;
}

/** Drop the link (no close frame), let the backoff pass, and open the next socket. */
async function reconnect(setup, over = {}) {
  const before = setup.WS.instances.length;
  setup.ws.serverClose(1006);
  for (let i = 0; i < 400 && setup.WS.instances.length === before; i++) await setup.clock.advance(0.1);
  assert.equal(setup.WS.instances.length, before + 1, "a new WebSocket was opened");
  const ws = setup.WS.last;
  ws.client = setup.client;
  ws.accept();
  await settle();
  const hello = ws.frames()[0];
  ws.deliver(welcome({ resumed: true, ...over }));
  await settle();
  return { ws, hello };
}

test("handshake: hello, welcome, connected over websocket", T, async () => {
  const setup = makeClient({ token: "secret", name: "page/1" });
  const connecting = track(setup.client.connect());
  await settle();
  const ws = setup.WS.last;
  assert.equal(ws.url, "ws://example.test/rt");
  ws.accept();
  await settle();
  assert.deepEqual(ws.frames(), [{ type: "hello", protocol: 1, auth: { token: "secret" }, resume: null, client: "page/1", batch: true }]);
  assert.equal(connecting.done, false);
  // welcome may come as the first frame of a batch
  ws.deliver([welcome(), { type: "ping", ts: 7 }]);
  await settle();
  assert.equal(connecting.done, true);
  assert.equal(connecting.error, undefined);
  assert.equal(setup.client.sessionId, "s1");
  assert.equal(setup.client.transport, "websocket");
  assert.deepEqual(setup.states, [["connecting", null], ["connected", "websocket"]]);
  assert.deepEqual(ws.frames().at(-1), { type: "pong", ts: 7 });
});

test("publish and join are acknowledged: join gives the position, publish the offset", T, async () => {
  const s = await connected();
  s.ws.client = s.client;
  assert.deepEqual(await joined(s.ws, 4), { ...ROOM, offset: 4 });
  const p1 = track(s.client.publish("lobby", "m", { text: "hi" }));
  const p2 = track(s.client.publish("lobby", "m", [1, 2], { echo: true }));
  await settle();
  const [f1, f2] = s.ws.frames().slice(-2);
  assert.deepEqual(f1, { type: "publish", id: 2, ns: "/", room: "lobby", event: "m", data: { text: "hi" }, echo: false });
  assert.equal(f2.id, 3);
  assert.equal(f2.echo, true);
  assert.equal(p1.done, false); // not before the server acknowledged it
  s.ws.deliver([{ type: "reply", id: 3, data: { ...ROOM, offset: 6 } }, { type: "reply", id: 2, data: { ...ROOM, offset: 5 } }]);
  await settle();
  assert.equal(p1.value, 5);
  assert.equal(p2.value, 6);
  assert.equal(s.client.outboxSize, 0);
});

test("request: reply data, timeout, and server errors mapped to typed errors", T, async () => {
  const s = await connected();
  const ok = track(s.client.request("echo", { n: 1 }));
  await settle();
  const frame = s.ws.frames().at(-1);
  assert.deepEqual(frame, { type: "request", id: 1, ns: "/", event: "echo", data: { n: 1 } });
  s.ws.deliver({ type: "reply", id: 1, data: { n: 1 } });
  await settle();
  assert.deepEqual(ok.value, { n: 1 });

  const codes = { unknown_event: UnknownEvent, handler_error: HandlerError, invalid_payload: HandlerError, too_large: InvalidFrame, forbidden: Forbidden, my_code: RemoteError };
  for (const [code, Cls] of Object.entries(codes)) {
    const call = track(s.client.request("x"));
    await settle();
    const { id } = s.ws.frames().at(-1);
    s.ws.deliver({ type: "error", id, code, message: `about ${code}`, details: { why: code }, retry_after: null });
    await settle();
    assert.ok(call.error instanceof Cls, `${code} -> ${Cls.name}, got ${call.error}`);
    assert.ok(call.error instanceof RTChatError);
    assert.equal(call.error.code, code);
    assert.equal(call.error.message, `about ${code}`);
    assert.deepEqual(call.error.details, { why: code });
  }

  const slow = track(s.client.request("slow", null, { timeout: 2 }));
  await s.clock.advance(1.9);
  assert.equal(slow.done, false);
  await s.clock.advance(0.2);
  assert.ok(slow.error instanceof AckTimeout);
  assert.equal(s.client.outboxSize, 0);
  assert.equal(s.client.counters.timedOut, 1);
});

test("a request timed out while offline is never sent", T, async () => {
  const s = await connected();
  s.ws.serverClose(1006);
  await settle();
  const call = track(s.client.request("later", null, { timeout: 0.1 }));
  await s.clock.advance(0.2);
  assert.ok(call.error instanceof AckTimeout);
  await s.clock.advance(31);
  const ws = s.WS.last;
  ws.accept();
  await settle();
  ws.deliver(welcome({ resumed: true }));
  await settle();
  assert.deepEqual(ws.frames().map((f) => f.type), ["hello"]);
});

test("the outbox is resent in order after a reconnect, with the same ids", T, async () => {
  const s = await connected();
  s.ws.client = s.client;
  const calls = [0, 1, 2].map((i) => track(s.client.publish("lobby", "m", i)));
  await settle();
  assert.deepEqual(s.ws.frames().slice(1).map((f) => f.id), [1, 2, 3]);
  s.ws.deliver({ type: "reply", id: 1, data: { ...ROOM, offset: 1 } });
  await settle();
  s.ws.serverClose(1006); // ids 2 and 3 unanswered
  await settle();
  assert.equal(s.client.state, "reconnecting"); // at once, not after the backoff wait
  assert.equal(s.client.transport, null);
  calls.push(track(s.client.publish("lobby", "m", 3))); // queued while offline
  const { ws, hello } = await reconnect(s);
  assert.equal(hello.resume.last_reply, 1);
  assert.deepEqual(ws.frames().slice(1).map((f) => [f.id, f.data]), [[2, 1], [3, 2], [4, 3]]);
  ws.deliver([2, 3, 4].map((id) => ({ type: "reply", id, data: { ...ROOM, offset: id } })));
  await settle();
  assert.deepEqual(calls.map((c) => c.value), [1, 2, 3, 4]);
  assert.equal(s.client.counters.resent, 2);
  assert.equal(s.client.counters.reconnects, 1);
});

test("resume: token, session, last_reply and every stream position", T, async () => {
  const s = await connected();
  s.ws.client = s.client;
  await joined(s.ws, 2);
  s.ws.deliver([msg(3), msg(4), { type: "message", stream: "inbox:s1", epoch: "ie", offset: 1, ns: "/", room: null, event: "m", data: "dm", sender: null }]);
  await settle();
  const { hello } = await reconnect(s);
  assert.equal(hello.type, "hello");
  assert.deepEqual(hello.resume.token, "tok1");
  assert.deepEqual(hello.resume.session, "s1");
  assert.equal(hello.resume.last_reply, 1);
  assert.deepEqual(hello.resume.streams, [
    { stream: "room:/:lobby", epoch: "e1", offset: 4, ns: "/", room: "lobby" },
    { stream: "inbox:s1", epoch: "ie", offset: 1, ns: null, room: null },
  ]);
});

test("duplicate deliveries are dropped; handlers get data and meta once each", T, async () => {
  const s = await connected();
  s.ws.client = s.client;
  await joined(s.ws, 0);
  s.ws.deliver([msg(1), msg(2)]);
  await settle();
  const { ws } = await reconnect(s);
  ws.deliver([msg(1), msg(2), msg(3)]); // the replay overlaps what came live
  await settle();
  assert.deepEqual(s.received.map((r) => r.data), ["m1", "m2", "m3"]);
  assert.deepEqual(s.received[2], { data: "m3", event: "m", ns: "/", room: "lobby", sender: "other", stream: "room:/:lobby", epoch: "e1", offset: 3 });
  assert.equal(s.client.counters.duplicatesDropped, 2);
});

test("gaps: a server gap frame, an epoch change, and a lost session are reported", T, async () => {
  const s = await connected();
  s.ws.client = s.client;
  await joined(s.ws, 0);
  s.ws.deliver(msg(1));
  s.ws.deliver({ type: "gap", stream: "room:/:lobby", ns: "/", room: "lobby", epoch: "e1", offset: 5, reason: "trimmed" });
  s.ws.deliver([msg(4), msg(6)]); // 4 is at or below the gap: a duplicate
  await settle();
  assert.deepEqual(s.gaps, [{ stream: "room:/:lobby", ns: "/", room: "lobby", epoch: "e1", offset: 5, reason: "trimmed" }]);
  assert.deepEqual(s.received.map((r) => r.offset), [1, 6]);

  s.ws.deliver(msg(3, { epoch: "e2", data: "new" })); // a new epoch, no gap frame
  await settle();
  assert.deepEqual(s.gaps[1], { stream: "room:/:lobby", ns: "/", room: "lobby", epoch: "e2", offset: 2, reason: "epoch_changed" });
  assert.equal(s.received.at(-1).data, "new");

  // The server lost the session: the old inbox is reported, the room kept.
  const { ws, hello } = await reconnect(s, { resumed: false, session: "s2", token: "tok2" });
  assert.deepEqual(hello.resume.streams.map((x) => x.stream), ["room:/:lobby", "inbox:s1"]);
  assert.deepEqual(s.gaps[2], { stream: "inbox:s1", ns: "/", room: null, epoch: "ie", offset: 0, reason: "session_unknown" });
  assert.equal(s.client.sessionId, "s2");
  ws.deliver({ type: "gap", stream: "room:/:lobby", ns: "/", room: "lobby", epoch: "e2", offset: 3, reason: "not_rejoined" });
  await settle();
  assert.equal(s.gaps[3].reason, "not_rejoined");
  assert.equal(s.client.counters.gaps, 4);
  const next = await reconnect({ ...s, ws });
  assert.deepEqual(next.hello.resume.streams.map((x) => x.stream), ["inbox:s2"]); // the room is forgotten
});

test("heartbeats: pings in the last tenth of the interval, rtt, and silence drops the link", T, async () => {
  const s = await connected({ random: () => 0.5 }, { heartbeat: { interval: 10, timeout: 5 } });
  const pings = () => s.ws.frames().filter((f) => f.type === "ping");
  await s.clock.advance(9.4);
  assert.equal(pings().length, 0);
  await s.clock.advance(0.2); // 10 * (1 - 0.1 * 0.5) = 9.5 after the hello
  assert.equal(pings().length, 1);
  const ts = pings()[0].ts;
  await s.clock.advance(0.25);
  s.ws.deliver({ type: "pong", ts });
  await settle();
  assert.ok(Math.abs(s.client.rtt - (s.clock.now - ts)) < 1e-9, `rtt ${s.client.rtt}`);
  assert.ok(s.client.rtt > 0.25 && s.client.rtt < 0.5);

  // Silence from here: dead after interval + timeout (15 s) since the pong.
  await s.clock.advance(14.9);
  assert.equal(s.client.state, "connected");
  await s.clock.advance(0.2);
  assert.equal(s.client.state, "reconnecting");
  assert.ok(s.logger.lines.some(([level, text]) => level === "warn" && text.includes("dead")));
  await s.clock.advance(1); // first backoff bound 0.5 s
  assert.equal(s.WS.instances.length, 2);
});

test("backoff: full jitter within min(maxDelay, initial * 2^(n-1)), and the client waits it", T, async () => {
  const bounds = [0.5, 1, 2, 4, 8, 16, 30, 30];
  const top = [...take(backoffDelays({}, () => 0.999999), 8)];
  const bottom = [...take(backoffDelays({}, () => 0), 8)];
  top.forEach((d, i) => assert.ok(d <= bounds[i] && d > bounds[i] * 0.99, `attempt ${i + 1}: ${d}`));
  assert.deepEqual(bottom, Array(8).fill(0));
  let draws = 0;
  const varied = [...take(backoffDelays({ initialDelay: 1, maxDelay: 4 }, () => [0.25, 0.5, 0.75][draws++ % 3]), 4)];
  assert.deepEqual(varied, [0.25, 1, 3, 1]);

  const s = await connected({ random: () => 0.5, reconnect: { initialDelay: 1, maxDelay: 10 } });
  s.ws.serverClose(1011);
  await s.clock.advance(0.49);
  assert.equal(s.WS.instances.length, 1);
  await s.clock.advance(0.02); // 0.5 * min(10, 1) = 0.5 s
  assert.equal(s.WS.instances.length, 2);
  s.WS.last.fail(); // polling is tried, its fetch fails too: the second wait is 0.5 * 2
  await s.clock.advance(0.99);
  assert.equal(s.WS.instances.length, 2);
  await s.clock.advance(0.02);
  assert.equal(s.WS.instances.length, 3);
  assert.equal(s.client.counters.failedAttempts, 1);
});

function* take(iterator, n) {
  for (let i = 0; i < n; i++) yield iterator.next().value;
}

test("fatal: a 4001 refusal ends connect() with Unauthorized and never reconnects", T, async () => {
  const s = makeClient({ retryFirstConnect: true });
  const connecting = track(s.client.connect());
  await settle();
  s.WS.last.accept();
  await settle();
  s.WS.last.deliver({ type: "error", id: null, code: "unauthorized", message: "credentials were refused", details: null, retry_after: null });
  s.WS.last.serverClose(4001, "unauthorized");
  await s.clock.advance(60);
  assert.ok(connecting.error instanceof Unauthorized, String(connecting.error));
  assert.equal(s.WS.instances.length, 1);
  assert.equal(s.client.state, "closed");
});

test("fatal: a 4006 close while connected stops the client and fails waiting calls", T, async () => {
  const s = await connected();
  const call = track(s.client.request("x"));
  await settle();
  s.ws.serverClose(4006, "session replaced");
  await s.clock.advance(60);
  assert.ok(call.error instanceof SessionReplaced);
  assert.equal(s.WS.instances.length, 1);
  assert.equal(s.client.state, "closed");
  await assert.rejects(s.client.publish("lobby", "m", 1), SessionReplaced);
});

test("a retryable close (1013 overloaded) waits retry_after plus jitter", T, async () => {
  const s = await connected();
  s.ws.deliver({ type: "error", id: null, code: "shutting_down", message: "bye", details: null, retry_after: 2 });
  s.ws.serverClose(1001);
  await s.clock.advance(2.2); // 2 + 0.5 * 0.5
  assert.equal(s.WS.instances.length, 1);
  await s.clock.advance(0.1);
  assert.equal(s.WS.instances.length, 2);
});

test("close(): goodbye 1000, waiting calls get ClientClosed, state closed", T, async () => {
  const s = await connected();
  const call = track(s.client.request("x"));
  await settle();
  await s.client.close();
  await settle();
  assert.deepEqual(s.ws.closedWith, { code: 1000, reason: "client closed" });
  assert.ok(call.error instanceof ClientClosed);
  assert.equal(s.client.state, "closed");
  assert.equal(s.client.transport, null);
  await s.clock.advance(60);
  assert.equal(s.WS.instances.length, 1);
  await assert.rejects(s.client.connect(), ClientClosed);
});

test("payloads JSON cannot carry are refused before they get an id", T, async () => {
  const s = await connected({}, { limits: { ...welcome().limits, max_frame_bytes: 200 } });
  await assert.rejects(s.client.publish("lobby", "m", { x: [1, NaN] }), (e) => e instanceof ValidationFailed && e.message.includes("data.x[1] is NaN"));
  await assert.rejects(s.client.request("m", "é".repeat(100)), MessageTooLarge); // 200 bytes of UTF-8 + envelope
  assert.throws(() => new Client("ws://h/", { auth: { n: Infinity } }), ValidationFailed);
  const ok = track(s.client.request("m", "x"));
  await settle();
  assert.equal(s.ws.frames().at(-1).id, 1); // no id was used by the refused ones
  assert.equal(ok.done, false);
});

test("an `unavailable` answer keeps the message and writes it again after retry_after", T, async () => {
  const s = await connected();
  const call = track(s.client.request("x"));
  await settle();
  s.ws.deliver({ type: "error", id: 1, code: "unavailable", message: "broker down", details: null, retry_after: 0.5 });
  await s.clock.advance(0.4);
  assert.equal(s.ws.frames().filter((f) => f.type === "request").length, 1);
  await s.clock.advance(0.2);
  assert.equal(s.ws.frames().filter((f) => f.type === "request").length, 2);
  s.ws.deliver({ type: "reply", id: 1, data: "done" });
  await settle();
  assert.equal(call.value, "done");
});

test("a `rate_limited` answer takes the same path: kept, written again after retry_after", T, async () => {
  const s = await connected();
  const call = track(s.client.request("x"));
  await settle();
  s.ws.deliver({ type: "error", id: 1, code: "rate_limited", message: "slow down", details: null, retry_after: 0.5 });
  await s.clock.advance(0.4);
  assert.equal(s.ws.frames().filter((f) => f.type === "request").length, 1);
  await s.clock.advance(0.2);
  assert.equal(s.ws.frames().filter((f) => f.type === "request").length, 2);
  assert.equal(s.client.counters.retried, 1);
  s.ws.deliver({ type: "reply", id: 1, data: "done" });
  await settle();
  assert.equal(call.value, "done");
});

test("handlers run in order; an async handler holds the next delivery; a throwing one is reported", T, async () => {
  const s = await connected();
  s.ws.client = s.client;
  await joined(s.ws, 0);
  const order = [];
  const errors = [];
  s.client.onError((e) => errors.push(e));
  let release;
  s.client.on("slow", async (data) => {
    order.push(`start ${data}`);
    await new Promise((r) => (release = r));
    order.push(`end ${data}`);
  });
  s.client.on("*", (data, meta) => {
    order.push(`any ${meta.event} ${data}`);
    if (data === "boom") throw new Error("handler failed");
  });
  s.ws.deliver([msg(1, { event: "slow", data: "a" }), msg(2, { event: "x", data: "boom" })]);
  await settle();
  assert.deepEqual(order, ["start a"]);
  release();
  await settle();
  assert.deepEqual(order, ["start a", "end a", "any slow a", "any x boom"]);
  assert.equal(errors.length, 1);
  assert.equal(errors[0].message, "handler failed");
});

test("URLs: relative ones resolve against the page, http(s) becomes ws(s), polling sits below the path", T, () => {
  assert.equal(resolveUrl("/", "https://chat.example/app/index.html"), "wss://chat.example/");
  assert.equal(resolveUrl("../", "http://h:8080/rt/demo/"), "ws://h:8080/rt/");
  assert.equal(resolveUrl("http://h/x?y=1#z"), "ws://h/x?y=1");
  assert.equal(resolveUrl("wss://h"), "wss://h/");
  assert.throws(() => resolveUrl("/relative"), TypeError); // no page here
  assert.throws(() => resolveUrl("ftp://h/"), TypeError);
  assert.throws(() => new Client("ws://h/", { transports: ["carrier-pigeon"] }), TypeError);
  assert.equal(pollingUrl("ws://h:1/"), "http://h:1/poll");
  assert.equal(pollingUrl("wss://h/rt/"), "https://h/rt/poll");
  assert.equal(pollingUrl("ws://h/rt"), "http://h/rt/poll");
  const c = new Client("/rt/", { base: "https://h/demo/", WebSocket: class {} });
  assert.deepEqual(c.urls, ["wss://h/rt/"]);
});
