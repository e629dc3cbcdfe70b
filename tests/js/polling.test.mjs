// Unit tests of HTTP long polling (PROTOCOL §1.1): the fallback from WebSocket, the
// cursor and its acknowledgement, lost answers asked again, POSTs split within the
// server's limits. A fake fetch stands for the server, a fake clock for time.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Unauthorized } from "../../rtchat_sdk/web/rtchat.js";
import { FakePollServer, makeClient, settle, track, welcome } from "./helpers.mjs";

const T = { timeout: 5000 };

/** A client whose WebSocket is refused, connected over polling to a fake server. */
async function overPolling(options = {}, welcomeOver = {}) {
  const server = new FakePollServer();
  const setup = makeClient({ fetch: server.fetch, ...options });
  const connecting = track(setup.client.connect());
  await settle();
  if (setup.client.transports.includes("websocket")) setup.WS.last.fail();
  await settle();
  server.push([welcome(welcomeOver)]);
  await settle();
  assert.equal(connecting.done, true, "connected");
  assert.equal(connecting.error, undefined);
  return { ...setup, server };
}

const posted = (server) => server.posts.flat();

test("a WebSocket that cannot be opened falls back to polling, and says so", T, async () => {
  const s = await overPolling({ token: "t" });
  const [open, firstPoll] = s.server.requests;
  assert.equal(open.method, "POST");
  assert.equal(open.url.href, "http://example.test/rt/poll");
  assert.deepEqual(open.body, [{ type: "hello", protocol: 1, auth: { token: "t" }, resume: null, client: "rtchat-js", batch: true }]);
  assert.equal(firstPoll.method, "GET");
  assert.equal(firstPoll.url.searchParams.get("sid"), "sid-1");
  assert.equal(firstPoll.url.searchParams.get("ack"), "0");
  assert.equal(s.client.transport, "polling");
  assert.deepEqual(s.states, [["connecting", null], ["connected", "polling"]]);
  assert.ok(s.logger.lines.some(([level, text]) => level === "warn" && /polling/i.test(text)), JSON.stringify(s.logger.lines));
});

test("polls acknowledge the cursor; a lost poll answer is asked for again, with the same ack", T, async () => {
  const s = await overPolling();
  const acks = () => s.server.gets().map((g) => Number(g.url.searchParams.get("ack")));
  const dm = (offset) => ({ type: "message", stream: "inbox:s1", epoch: "ie", offset, ns: "/", room: null, event: "m", data: `dm${offset}`, sender: null });
  const call = track(s.client.request("echo", 1));
  await settle();
  assert.deepEqual(posted(s.server).map((f) => f.type), ["request"]);
  assert.deepEqual(acks(), [0, 1]); // the welcome came as batch 1, and is acknowledged
  s.server.loseNextPoll(); // batch 2 (the reply) is lost on the way...
  s.server.push([{ type: "reply", id: 1, data: "one" }, dm(1)]);
  await settle();
  assert.equal(call.done, false);
  await s.clock.advance(0.06); // ...and asked for again, with the same ack: the server sends it again
  assert.deepEqual(acks(), [0, 1, 1, 2]);
  assert.equal(call.value, "one");

  // 502/504 from a balancer or another node: asked again too, same ack, nothing twice.
  s.server.statuses.push([502, { error: "node_failed" }], [504, { error: "node_timeout" }]);
  s.server.push([dm(2)]);
  await s.clock.advance(0.2);
  assert.deepEqual(acks(), [0, 1, 1, 2, 3, 3, 3]);
  s.server.push([dm(3)]);
  await settle();
  assert.deepEqual(s.received.map((r) => r.data), ["dm1", "dm2", "dm3"]);
  assert.equal(s.client.counters.reconnects, 0); // the same polling connection throughout
  assert.equal(s.client.transport, "polling");
});

test("POSTs carry at most poll_max_frames frames, one POST at a time, in order", T, async () => {
  const s = await overPolling({}, { limits: { ...welcome().limits, poll_max_frames: 3 } });
  s.server.holdPosts = true;
  const calls = [track(s.client.emit("first"))]; // written at once, alone
  await settle();
  calls.push(...Array.from({ length: 7 }, (_, i) => track(s.client.emit("e", i)))); // queued behind it
  await settle();
  assert.equal(s.server.posts.length, 1, "one POST in flight at a time");
  for (let i = 0; i < 5 && s.server.heldPosts.length; i++) {
    s.server.heldPosts.shift()();
    await settle();
  }
  assert.deepEqual(s.server.posts.map((b) => b.map((f) => f.id)), [[1], [2, 3, 4], [5, 6, 7], [8]]);
  assert.ok(calls.every((c) => !c.done)); // a POST's {ok} is not the answer: replies come by poll
  s.server.push(calls.map((_, i) => ({ type: "reply", id: i + 1, data: null })));
  await settle();
  assert.ok(calls.every((c) => c.done && c.error === undefined));
});

test("POSTs also stay within max_frame_bytes", T, async () => {
  const s = await overPolling({}, { limits: { ...welcome().limits, max_frame_bytes: 250 } });
  s.server.holdPosts = true;
  for (let i = 0; i < 5; i++) s.client.emit("e", "é".repeat(30)); // ~100 bytes each in UTF-8
  for (let i = 0; i < 5 && (await settle(), s.server.heldPosts.length); i++) s.server.heldPosts.shift()();
  const sizes = s.server.posts.map((b) => new TextEncoder().encode(JSON.stringify(b)).length);
  assert.deepEqual(s.server.posts.map((b) => b.length), [1, 2, 2]); // the first went alone, at once
  assert.ok(sizes.every((n) => n <= 250), String(sizes));
  assert.deepEqual(posted(s.server).map((f) => f.id), [1, 2, 3, 4, 5]);
});

test("a polling connection the server forgot (404) reconnects, trying WebSocket first again", T, async () => {
  const s = await overPolling();
  const call = track(s.client.request("x"));
  await settle();
  s.server.statuses.push([404, { error: "unknown_session" }]);
  s.server.held.resolve({ status: 200, text: async () => JSON.stringify({ cursor: 1, frames: [] }) });
  s.server.held = null;
  await settle();
  assert.equal(s.client.state, "reconnecting");
  for (let i = 0; i < 20 && s.WS.instances.length === 1; i++) await s.clock.advance(0.1);
  assert.equal(s.WS.instances.length, 2, "WebSocket is tried again");
  const ws = s.WS.last;
  ws.accept();
  await settle();
  const hello = ws.frames()[0];
  assert.equal(hello.resume.token, "tok1");
  ws.deliver(welcome({ resumed: true }));
  await settle();
  assert.equal(s.client.transport, "websocket");
  assert.deepEqual(ws.frames()[1], { type: "request", id: 1, ns: "/", event: "x", data: null }); // resent
  ws.deliver({ type: "reply", id: 1, data: 42 });
  await settle();
  assert.equal(call.value, 42);
  assert.deepEqual(s.states.map(([state, transport]) => `${state}/${transport}`), ["connecting/null", "connected/polling", "reconnecting/null", "connected/websocket"]);
});

test("polling only: no WebSocket is tried; a server close 4001 in a batch is fatal", T, async () => {
  const s = await overPolling({ transports: ["polling"] });
  assert.equal(s.WS.instances.length, 0);
  s.server.push([{ type: "error", id: null, code: "unauthorized", message: "token revoked", details: null, retry_after: null }], { code: 4001, reason: "unauthorized" });
  await s.clock.advance(60);
  assert.equal(s.client.state, "closed");
  assert.ok(s.client.closedReason instanceof Unauthorized, String(s.client.closedReason));
  assert.equal(s.server.requests.filter((r) => r.method === "POST" && !r.url.searchParams.has("sid")).length, 1);
});

test("close() over polling posts what is queued, then DELETE", T, async () => {
  const s = await overPolling();
  s.client.emit("last", 1).catch(() => {});
  await s.client.close();
  const methods = s.server.requests.map((r) => r.method);
  assert.equal(methods.at(-1), "DELETE");
  assert.equal(s.server.requests.at(-1).url.searchParams.get("sid"), "sid-1");
  assert.deepEqual(posted(s.server).map((f) => f.event), ["last"]);
  assert.equal(s.client.state, "closed");
});

test("a poll is waited for as long as the welcome's poll_timeout says, plus a margin", T, async () => {
  const quiet = { heartbeat: { interval: 1000, timeout: 1000 } }; // no pings in the way
  const limits = { ...welcome().limits, poll_timeout: 60 };
  const s = await overPolling({}, { ...quiet, limits });
  const gets = () => s.server.gets().length;
  const before = gets();
  await s.clock.advance(36); // past the default 25 s + 10: still held, as the server said
  assert.equal(gets(), before);
  await s.clock.advance(35); // past 60 + 10: counted as lost, and asked for again
  assert.equal(gets(), before + 1);
  assert.equal(s.server.gets().at(-1).url.searchParams.get("ack"), "1");
  assert.equal(s.client.transport, "polling");
});
