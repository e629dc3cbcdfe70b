// Presence, history and join since (PROTOCOL §7.5, §7.6) over a fake WebSocket and a fake clock.
import assert from "node:assert/strict";
import { test } from "node:test";

import { AckTimeout, Forbidden, InvalidFrame, NotEnabled, ProtocolError, RemoteError, roomStream } from "../../rtchat_sdk/web/rtchat.js";
import { connected, settle, track, welcome } from "./helpers.mjs";

const T = { timeout: 5000 };
const ROOM = { stream: "room:/:lobby", epoch: "e1" };
const msg = (offset, over = {}) => ({ type: "message", ...ROOM, offset, ns: "/", room: "lobby", event: "m", data: `m${offset}`, sender: "other", ...over });
const ada = { session: "sa", user: "ada", client: "page/1", joined_at: 1700000000.5 };

/** The last frame the client wrote. */
const last = (ws) => ws.frames().at(-1);

/** Drop the link, let the backoff pass, open the next socket and welcome it (resumed). */
async function reconnect(s) {
  const before = s.WS.instances.length;
  s.ws.serverClose(1006);
  for (let i = 0; i < 400 && s.WS.instances.length === before; i++) await s.clock.advance(0.1);
  const ws = s.WS.last;
  ws.accept();
  await settle();
  const hello = ws.frames()[0];
  ws.deliver(welcome({ resumed: true }));
  await settle();
  return { ws, hello };
}

test("presence: the request frame, and the members array from its reply", T, async () => {
  const s = await connected();
  const call = track(s.client.presence("lobby"));
  await settle();
  assert.deepEqual(last(s.ws), { type: "presence", id: 1, ns: "/", room: "lobby" });
  s.ws.deliver({ type: "reply", id: 1, data: { stream: "room:/:lobby", members: [ada, { ...ada, session: "sb", user: null, client: null }] } });
  await settle();
  assert.deepEqual(call.value, [ada, { ...ada, session: "sb", user: null, client: null }]);
  assert.equal(s.client.outboxSize, 0);
});

test("presenceStats and a namespace's reads carry the namespace", T, async () => {
  const s = await connected();
  const call = track(s.client.namespace("/chat").presenceStats("general"));
  await settle();
  assert.deepEqual(last(s.ws), { type: "presence_stats", id: 1, ns: "/chat", room: "general" });
  s.ws.deliver({ type: "reply", id: 1, data: { stream: "room:/chat:general", sessions: 3, users: 2 } });
  await settle();
  assert.deepEqual(call.value, { stream: "room:/chat:general", sessions: 3, users: 2 });
});

test("history: since, limit and reverse on the wire; the page and its position back", T, async () => {
  const s = await connected();
  const first = track(s.client.history("lobby"));
  await settle();
  assert.deepEqual(last(s.ws), { type: "history", id: 1, ns: "/", room: "lobby", since: null, limit: 100, reverse: false });
  const page = track(s.client.history("lobby", { since: { stream: "room:/:lobby", epoch: "e1", offset: 9 }, limit: 2, reverse: true }));
  await settle();
  // a join reply (or anything with epoch and offset) is a since: only those two go out
  assert.deepEqual(last(s.ws), { type: "history", id: 2, ns: "/", room: "lobby", since: { epoch: "e1", offset: 9 }, limit: 2, reverse: true });
  s.ws.deliver([
    { type: "reply", id: 1, data: { ...ROOM, offset: 9, gap: "trimmed", more: false, entries: [msg(8), msg(9)] } },
    { type: "reply", id: 2, data: { ...ROOM, offset: 9, gap: null, more: true, entries: [msg(8), msg(7)] } },
  ]);
  await settle();
  assert.deepEqual(first.value, { ...ROOM, offset: 9, gap: "trimmed", more: false, entries: [msg(8), msg(9)], position: { epoch: "e1", offset: 9 } });
  assert.equal(page.value.more, true);
  assert.deepEqual(page.value.entries.map((e) => e.offset), [8, 7]);
  assert.deepEqual(s.received, []); // history entries are answers, not deliveries
});

test("history refuses a bad since or limit before it gets an id", T, async () => {
  const s = await connected();
  await assert.rejects(s.client.history("lobby", { limit: 0 }), TypeError);
  await assert.rejects(s.client.history("lobby", { limit: 10_001 }), TypeError);
  await assert.rejects(s.client.history("lobby", { since: { epoch: "e1", offset: -1 } }), TypeError);
  await assert.rejects(s.client.join("lobby", { since: { offset: 3 } }), TypeError);
  track(s.client.presence("lobby"));
  await settle();
  assert.equal(last(s.ws).id, 1);
  assert.equal(s.client.outboxSize, 1);
});

test("reads: not_enabled is NotEnabled, forbidden and too_large keep their classes", T, async () => {
  const s = await connected();
  const off = track(s.client.presence("lobby"));
  const stats = track(s.client.presenceStats("lobby"));
  const hidden = track(s.client.history("secret"));
  const big = track(s.client.history("lobby"));
  await settle();
  s.ws.deliver([
    { type: "error", id: 1, code: "not_enabled", message: "namespace '/' keeps no presence (PROTOCOL §7.5)", details: null, retry_after: null },
    { type: "error", id: 2, code: "not_enabled", message: "no presence", details: null, retry_after: null },
    { type: "error", id: 3, code: "forbidden", message: "read room 'secret'", details: null, retry_after: null },
    { type: "error", id: 4, code: "too_large", message: "entry 5 does not fit", details: { offset: 5 }, retry_after: null },
  ]);
  await settle();
  assert.ok(off.error instanceof NotEnabled && off.error instanceof RemoteError, String(off.error));
  assert.equal(off.error.code, "not_enabled");
  assert.match(off.error.message, /keeps no presence/);
  assert.ok(stats.error instanceof NotEnabled);
  assert.ok(hidden.error instanceof Forbidden);
  assert.ok(big.error instanceof InvalidFrame);
  assert.deepEqual(big.error.details, { offset: 5 });
  assert.equal(s.client.outboxSize, 0);
});

test("a read's reply that is not one rejects with ProtocolError", T, async () => {
  const s = await connected();
  const call = track(s.client.presence("lobby"));
  await settle();
  s.ws.deliver({ type: "reply", id: 1, data: { stream: "room:/:lobby" } });
  await settle();
  assert.ok(call.error instanceof ProtocolError, String(call.error));
});

test("reads are resent after a reconnect with their ids, and time out like requests", T, async () => {
  const s = await connected();
  const who = track(s.client.presence("lobby"));
  const page = track(s.client.history("lobby", { limit: 5 }));
  await settle();
  const { ws, hello } = await reconnect(s);
  assert.equal(hello.resume.last_reply, 0);
  assert.deepEqual(ws.frames().slice(1).map((f) => [f.type, f.id]), [["presence", 1], ["history", 2]]);
  ws.deliver({ type: "reply", id: 1, data: { stream: "room:/:lobby", members: [ada] } });
  await settle();
  assert.deepEqual(who.value, [ada]);
  assert.equal(page.done, false);
  assert.equal(s.client.counters.resent, 2);

  const slow = track(s.client.presenceStats("lobby", { timeout: 2 }));
  await s.clock.advance(2.1);
  assert.ok(slow.error instanceof AckTimeout, String(slow.error));
  assert.match(slow.error.message, /presence_stats/);
});

test("join since: the frame carries it; replayed entries are delivered, those at or before it dropped", T, async () => {
  const s = await connected();
  const join = track(s.client.join("lobby", { since: { epoch: "e1", offset: 4 } }));
  await settle();
  assert.deepEqual(last(s.ws), { type: "join", id: 1, ns: "/", room: "lobby", since: { epoch: "e1", offset: 4 } });
  // The replay may come before the reply: the stream is followed from `since` already.
  s.ws.deliver([msg(3), msg(4), msg(5)]);
  s.ws.deliver({ type: "reply", id: 1, data: { ...ROOM, offset: 7 } });
  s.ws.deliver([msg(5), msg(6), msg(7), msg(8)]); // ...and after it: the reply does not move the position
  await settle();
  assert.deepEqual(join.value, { ...ROOM, offset: 7 });
  assert.deepEqual(s.received.map((r) => r.offset), [5, 6, 7, 8]);
  assert.equal(s.client.counters.duplicatesDropped, 3);
  assert.deepEqual(s.gaps, []);
  // a plain join writes no since
  track(s.client.join("other"));
  await settle();
  assert.deepEqual(last(s.ws), { type: "join", id: 2, ns: "/", room: "other" });
});

test("join since: from history to live, nothing missed or twice", T, async () => {
  const s = await connected();
  const page = track(s.client.history("lobby", { reverse: true, limit: 2 }));
  await settle();
  s.ws.deliver({ type: "reply", id: 1, data: { ...ROOM, offset: 2, gap: null, more: false, entries: [msg(2), msg(1)] } });
  await settle();
  const join = track(s.client.join("lobby", { since: page.value.position }));
  await settle();
  assert.deepEqual(last(s.ws).since, { epoch: "e1", offset: 2 });
  s.ws.deliver([{ type: "reply", id: 2, data: { ...ROOM, offset: 3 } }, msg(3), msg(4)]);
  await settle();
  assert.equal(join.done, true);
  assert.deepEqual(s.received.map((r) => r.offset), [3, 4]);
});

test("join since keeps the position of a stream followed already; a stale since is one gap", T, async () => {
  const s = await connected();
  const first = track(s.client.join("lobby"));
  await settle();
  s.ws.deliver([{ type: "reply", id: 1, data: { ...ROOM, offset: 6 } }, msg(7)]);
  await settle();
  track(s.client.join("lobby", { since: { epoch: "e1", offset: 2 } }));
  await settle();
  s.ws.deliver([{ type: "reply", id: 2, data: { ...ROOM, offset: 7 } }, msg(3), msg(7), msg(8)]);
  await settle();
  assert.equal(first.done, true);
  assert.deepEqual(s.received.map((r) => r.offset), [7, 8]);

  // `since` of an epoch the stream no longer has: the server's gap frame and catch-up come
  // before the reply (server_ref's order), and the reply in the new epoch is no second gap.
  track(s.client.join("news", { since: { epoch: "old", offset: 10 } }));
  await settle();
  const news = { stream: "room:/:news", epoch: "new", room: "news" };
  s.ws.deliver([
    { type: "gap", ...news, ns: "/", offset: 0, reason: "epoch_changed" },
    msg(1, news), msg(2, news),
    { type: "reply", id: 3, data: { stream: "room:/:news", epoch: "new", offset: 2 } },
    msg(3, news),
  ]);
  await settle();
  assert.deepEqual(s.gaps, [{ stream: "room:/:news", ns: "/", room: "news", epoch: "new", offset: 0, reason: "epoch_changed" }]);
  assert.deepEqual(s.received.filter((r) => r.room === "news").map((r) => r.offset), [1, 2, 3]);
});

test("join since: resumed from its position before the reply; a refused one is followed no more", T, async () => {
  const s = await connected();
  track(s.client.join("lobby", { since: { epoch: "e1", offset: 4 } }));
  await settle();
  s.ws.deliver(msg(5));
  await settle();
  const { ws, hello } = await reconnect(s);
  assert.deepEqual(hello.resume.streams.find((x) => x.stream === roomStream("/", "lobby")), { ...ROOM, offset: 5, ns: "/", room: "lobby" });
  assert.deepEqual(last(ws), { type: "join", id: 1, ns: "/", room: "lobby", since: { epoch: "e1", offset: 4 } });

  const refused = track(s.client.namespace("/a").join("x", { since: { epoch: "e9", offset: 1 } }));
  await settle();
  ws.deliver({ type: "error", id: 2, code: "forbidden", message: "join room 'x'", details: null, retry_after: null });
  await settle();
  assert.ok(refused.error instanceof Forbidden);
  s.ws = ws;
  const next = await reconnect(s);
  assert.deepEqual(next.hello.resume.streams.map((x) => x.stream), ["room:/:lobby", "inbox:s1"]);
});

test("onJoin and onLeave get the $join / $leave deliveries with their meta, per namespace", T, async () => {
  const s = await connected();
  const seen = [];
  s.client.onJoin((data, meta) => seen.push(["join /", data, meta]));
  const off = s.client.onLeave((data, meta) => seen.push(["leave /", data, meta]));
  s.client.namespace("/chat").onJoin((data, meta) => seen.push(["join /chat", data.session, meta.room]));
  const any = [];
  s.client.on("*", (data, meta) => any.push(meta.event));
  s.ws.deliver([
    msg(1, { event: "$join", data: ada, sender: "sa" }),
    msg(2, { event: "$leave", data: { ...ada, reason: "left" }, sender: "sa" }),
    msg(1, { event: "$join", data: { ...ada, session: "sc" }, sender: "sc", ns: "/chat", room: "general", stream: "room:/chat:general" }),
  ]);
  await settle();
  assert.deepEqual(seen, [
    ["join /", ada, { event: "$join", ns: "/", room: "lobby", sender: "sa", stream: "room:/:lobby", epoch: "e1", offset: 1 }],
    ["leave /", { ...ada, reason: "left" }, { event: "$leave", ns: "/", room: "lobby", sender: "sa", stream: "room:/:lobby", epoch: "e1", offset: 2 }],
    ["join /chat", "sc", "general"],
  ]);
  assert.deepEqual(any, ["$join", "$leave"]); // "*" is every event of "/", the server's too
  off();
  s.ws.deliver(msg(3, { event: "$leave", data: { ...ada, reason: "closed" }, sender: "sa" }));
  await settle();
  assert.equal(seen.length, 3);
});
