// Unit tests of the token option (PROTOCOL §3.3): a callable is called before every
// dial; after a 4001 it is asked once more and a different token tried once; a
// 4008 (TOKEN_EXPIRED) reconnects at once, with a fresh token, and resumes.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Unauthorized } from "../../rtchat_sdk/web/rtchat.js";
import { makeClient, settle, track, welcome } from "./helpers.mjs";

const T = { timeout: 5000 };
const UNAUTHORIZED = { type: "error", id: null, code: "unauthorized", message: "credentials were refused", details: null, retry_after: null };
const helloOf = (ws) => ws.frames().find((f) => f.type === "hello");

/** A client whose token callable hands out "t1", "t2"... (or what `tokens` lists). */
function withTokens(tokens = null, options = {}) {
  const given = [];
  const token = async () => {
    const next = tokens ? tokens[Math.min(given.length, tokens.length - 1)] : `t${given.length + 1}`;
    given.push(next);
    return next;
  };
  return { ...makeClient({ token, ...options }), given };
}

async function accept(s, over = {}) {
  await settle();
  s.WS.last.accept();
  await settle();
  s.WS.last.deliver(welcome(over));
  await settle();
}

test("a token callable is called before every dial, and its token goes in that hello", T, async () => {
  const s = withTokens();
  const connecting = s.client.connect();
  await accept(s);
  await connecting;
  assert.deepEqual(helloOf(s.WS.last).auth, { token: "t1" });
  s.WS.last.serverClose(1011, "bug");
  await s.clock.advance(1); // the backoff wait (random 0.5 of 0.5 s)
  await accept(s, { resumed: true });
  assert.equal(s.WS.instances.length, 2);
  assert.deepEqual(helloOf(s.WS.last).auth, { token: "t2" });
  assert.equal(helloOf(s.WS.last).resume.token, "tok1"); // and it resumes
});

test("after a 4001 a token callable is asked again, and a different token is tried at once", T, async () => {
  const s = withTokens();
  const connecting = track(s.client.connect());
  await settle();
  s.WS.last.accept();
  await settle();
  s.WS.last.deliver(UNAUTHORIZED);
  s.WS.last.serverClose(4001, "token expired");
  await settle();
  assert.equal(s.WS.instances.length, 2, "retried at once, with no backoff wait");
  await accept(s);
  assert.deepEqual(helloOf(s.WS.last).auth, { token: "t2" });
  assert.equal(connecting.done, true);
  assert.equal(connecting.error, undefined);
  assert.deepEqual(s.given, ["t1", "t2"]);
});

test("after a 4001, the same token again is Unauthorized at once: no reconnect loop", T, async () => {
  const s = withTokens(["same"], { retryFirstConnect: true });
  const connecting = track(s.client.connect());
  await settle();
  s.WS.last.accept();
  await settle();
  s.WS.last.deliver(UNAUTHORIZED);
  s.WS.last.serverClose(4001, "forged");
  await s.clock.advance(60);
  assert.ok(connecting.error instanceof Unauthorized, String(connecting.error));
  assert.equal(s.WS.instances.length, 1);
  assert.deepEqual(s.given, ["same", "same"]);
  assert.equal(s.client.state, "closed");
});

test("a 4008 (credentials expired) reconnects at once with a fresh token and resumes", T, async () => {
  const s = withTokens();
  const connecting = s.client.connect();
  await accept(s);
  await connecting;
  s.WS.last.serverClose(4008, "token expired");
  await settle();
  assert.equal(s.WS.instances.length, 2, "no backoff wait before the new dial");
  await accept(s, { resumed: true });
  const hello = helloOf(s.WS.last);
  assert.deepEqual(hello.auth, { token: "t2" });
  assert.equal(hello.resume.token, "tok1");
  assert.equal(s.client.state, "connected");
});

test("a token that is neither a string nor a function is refused at once", T, async () => {
  assert.throws(() => makeClient({ token: 42 }), TypeError);
  assert.throws(() => makeClient({ token: "a", auth: { token: "b" } }), TypeError);
});
