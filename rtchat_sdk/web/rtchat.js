/**
 * rtchat for browsers (and Node >= 20): one ES module, no dependencies, no build step.
 *
 * The guarantees of the Python client (rtchat_sdk) over the protocol of PROTOCOL.md:
 * message ids and an outbox resent after every reconnect, resume with the session
 * token and per-stream positions, duplicates dropped, gaps reported, application
 * heartbeats, reconnection with full-jitter backoff, and HTTP long polling when a
 * WebSocket cannot be opened. Guide: docs/browser.md. Types: rtchat.d.ts.
 *
 * Layout:
 *   1. Errors, mirroring rtchat_sdk/errors.py.
 *   2. Pure helpers: URLs, JSON checks, backoff, what is fatal.
 *   3. Session: the sans-I/O core. It takes frames and the time and hands back frames
 *      to write and events for the app; no sockets, no timers (tests drive it alone).
 *   4. Transports: WebSocketTransport and PollingTransport move text; they know
 *      nothing of ids, rooms or offsets.
 *   5. Client: the public API, and the loop that dials, serves and backs off.
 *
 * Times are seconds everywhere, as in the protocol and the Python client.
 * @module rtchat
 */

export const PROTOCOL_VERSION = 1;
const MAX_RESUME_STREAMS = 10_000;
const POLL_HOLD = 25; // s the server holds a poll (welcome.limits.poll_timeout), and then...
const POLL_MARGIN = 10; // ...s more before the poll counts as lost
/** Waits (s) before asking again after an HTTP answer lost on the way (a reset, 502/503/504). */
const POLL_RETRIES = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6];
const RETRY_STATUSES = new Set([502, 503, 504]);
const encoder = new TextEncoder();
const decoder = new TextDecoder();

// ---------------------------------------------------------------------------
// 1. Errors

/** Base class of every error rtchat raises or rejects with. */
export class RTChatError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}
/** The server broke the wire protocol (unparsable or unexpected frame). */
export class ProtocolError extends RTChatError {}
/** A call the object cannot take in its state. */
export class InvalidState extends RTChatError {}
/** A connection attempt failed (refused, unreachable, bad handshake). */
export class ConnectionFailed extends RTChatError {}
/** The server refused the client in a way no retry can fix; `code` says how. */
export class FatalConnectionError extends ConnectionFailed {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}
/** The server rejected the credentials (4001 / `unauthorized`). */
export class Unauthorized extends FatalConnectionError {}
/** Client and server share no protocol version (4002 / `unsupported_protocol`). */
export class IncompatibleProtocol extends FatalConnectionError {}
/** Another client resumed this session (4006: two clients sharing one token). */
export class SessionReplaced extends FatalConnectionError {}
/** Reconnection stopped after its attempt or time limit. */
export class GaveUp extends ConnectionFailed {}
/** The operation needs a connection and there is none (`ping()`). */
export class ConnectionLost extends RTChatError {}
/** The client is closed; nothing more can be sent or awaited. */
export class ClientClosed extends RTChatError {}
/** No reply in time. (Python's is also a TimeoutError; JS has no such class.) */
export class AckTimeout extends RTChatError {}
/** The outbox is full and its overflow policy is "raise". */
export class BufferFull extends RTChatError {}
/** Evicted from a full outbox (overflow policy "drop_oldest"). */
export class MessageDropped extends RTChatError {}
/** A message passed its expiry before it was answered. */
export class MessageExpired extends RTChatError {}
/** Larger than the server accepts (in UTF-8 bytes); not queued. */
export class MessageTooLarge extends RTChatError {}
/** A payload JSON cannot carry as it is (NaN, Infinity, a cycle, a BigInt...); not queued. */
export class ValidationFailed extends RTChatError {}
/** The server answered an operation with an error frame: `code`, `message`, `details`. */
export class RemoteError extends RTChatError {
  constructor(code, message, details = null) {
    super(message);
    this.code = code;
    this.details = details;
  }
}
/** No handler for the event on the server. */
export class UnknownEvent extends RemoteError {}
/** The server has no such namespace. */
export class UnknownNamespace extends RemoteError {}
/** The server's handler raised, or rejected the payload. */
export class HandlerError extends RemoteError {}
/** The server could not accept a frame we sent, or it was too large. */
export class InvalidFrame extends RemoteError {}
/** The server's authorization refused this join, publish, emit or request (`forbidden`). */
export class Forbidden extends RemoteError {}
/** The namespace does not keep what was asked (`not_enabled`: presence is off there). */
export class NotEnabled extends RemoteError {}

const BY_CODE = {
  unknown_event: UnknownEvent, unknown_namespace: UnknownNamespace, handler_error: HandlerError,
  invalid_payload: HandlerError, bad_json: InvalidFrame, bad_frame: InvalidFrame, unknown_type: InvalidFrame,
  invalid_frame: InvalidFrame, too_large: InvalidFrame, forbidden: Forbidden, not_enabled: NotEnabled,
};
/** The most specific RemoteError for an error code. */
export function remoteError(code, message, details = null) {
  return new (Object.hasOwn(BY_CODE, code) ? BY_CODE[code] : RemoteError)(code, message, details);
}

// ---------------------------------------------------------------------------
// 2. Pure helpers

const WS_SCHEMES = { "ws:": "ws:", "wss:": "wss:", "http:": "ws:", "https:": "wss:" };

/**
 * The WebSocket URL for what the app gave: `ws(s)://` as is, `http(s)://` as `ws(s)://`,
 * and a relative URL (`"/"`, `"../"`) resolved against `base` (in a page: its address).
 * Throws a TypeError for anything else.
 */
export function resolveUrl(url, base = globalThis.location?.href) {
  let parsed;
  try {
    parsed = new URL(String(url), base);
  } catch {
    throw new TypeError(`not a URL the client can use: ${url} (a relative URL needs a page or the "base" option)`);
  }
  const scheme = WS_SCHEMES[parsed.protocol];
  if (!scheme || !parsed.host) throw new TypeError(`the URL must be ws(s):// or http(s):// with a host: ${url}`);
  parsed.protocol = scheme;
  parsed.hash = "";
  return parsed.href;
}

/** The long-polling endpoint of a WebSocket URL (PROTOCOL §1.1): http(s), `poll` below its path. */
export function pollingUrl(wsUrl) {
  const url = new URL(wsUrl);
  url.protocol = url.protocol === "wss:" ? "https:" : "http:";
  url.pathname = url.pathname.replace(/\/+$/, "") + "/poll";
  return url.href;
}

/** The name of a room's stream (PROTOCOL §7.1): `room:<ns>:<room>`. */
export function roomStream(ns, room) {
  return `room:${ns}:${room}`;
}

/** Bytes of `text` in UTF-8: every size in the protocol counts those. */
export function utf8Length(text) {
  return encoder.encode(text).length;
}

/** Where a value holds NaN or an infinity (`data.x[1] is NaN`), or null. */
function nonFinite(value, path) {
  if (typeof value === "number") return Number.isFinite(value) ? null : `${path} is ${value}`;
  if (value === null || typeof value !== "object" || typeof value.toJSON === "function") return null;
  const items = Array.isArray(value) ? value.map((v, i) => [`${path}[${i}]`, v]) : Object.entries(value).map(([k, v]) => [`${path}.${k}`, v]);
  for (const [where, item] of items) {
    const bad = nonFinite(item, where);
    if (bad) return bad;
  }
  return null;
}

/** JSON text of `frame`, refusing what JSON would carry wrongly (JSON.stringify writes NaN as null). */
function encodeChecked(frame, value, field, what) {
  let text;
  try {
    text = JSON.stringify(frame); // first: it also refuses cycles, which the walk below would not end
  } catch (error) {
    throw new ValidationFailed(`cannot encode ${what}: ${error.message}`);
  }
  const bad = nonFinite(value, field);
  if (bad) throw new ValidationFailed(`cannot encode ${what}: ${bad}: JSON has no NaN or Infinity`);
  return text;
}

/**
 * Reconnect waits: exponential backoff with full jitter, as the Python client's (tenacity's
 * wait_random_exponential): attempt n waits uniformly in `[0, min(maxDelay, initialDelay *
 * multiplier ** (n - 1))]` seconds, so clients cut off together do not come back together.
 */
export function* backoffDelays({ initialDelay = 0.5, maxDelay = 30, multiplier = 2 } = {}, random = Math.random) {
  for (let n = 1; ; n++) yield random() * Math.min(maxDelay, initialDelay * multiplier ** Math.min(n - 1, 1000));
}

const FATAL_REFUSALS = { unauthorized: Unauthorized, unsupported_protocol: IncompatibleProtocol };
const FATAL_CLOSES = { 4001: Unauthorized, 4002: IncompatibleProtocol, 4006: SessionReplaced };

/** The error for a close code no retry can fix (4001, 4002, 4006), or null. */
export function closeError(code, reason) {
  const Cls = FATAL_CLOSES[code];
  return Cls ? new Cls("refused", reason || `closed with code ${code}`) : null;
}

// ---------------------------------------------------------------------------
// 3. Session: the sans-I/O core

const roomKey = (ns, room) => `${ns}\u0000${room}`;
const HANDSHAKING = new Set(["connecting", "reconnecting"]);
const isPosition = (p) => p !== null && typeof p === "object" && typeof p.stream === "string" && typeof p.epoch === "string" && Number.isInteger(p.offset);
/** The reads (PROTOCOL §6): answered like requests, not remembered by the server's dedupe. */
const READS = new Set(["presence", "presence_stats", "history"]);
const MAX_HISTORY_LIMIT = 10_000;

/** `{epoch, offset}` of a position the app hands over (a history answer's `position`, a join's reply). */
function sinceOf(since) {
  if (since == null) return null;
  const { epoch, offset } = since;
  if (typeof epoch !== "string" || !epoch || !Number.isInteger(offset) || offset < 0) throw new TypeError(`since is {epoch, offset}: ${JSON.stringify(since)}`);
  return { epoch, offset };
}

/** The frame of one outbox message (PROTOCOL §4.2), from the fields its kind needs. */
function frameOf(kind, id, ns, { room = null, event, data = null, echo = false, since = null, limit = 100, reverse = false }) {
  switch (kind) {
    case "join": return since == null ? { type: kind, id, ns, room } : { type: kind, id, ns, room, since: sinceOf(since) };
    case "leave": case "presence": case "presence_stats": return { type: kind, id, ns, room };
    case "history":
      if (!Number.isInteger(limit) || limit < 1 || limit > MAX_HISTORY_LIMIT) throw new TypeError(`limit is an integer from 1 to ${MAX_HISTORY_LIMIT}: ${limit}`);
      return { type: kind, id, ns, room, since: sinceOf(since), limit, reverse: !!reverse };
    case "publish": return { type: kind, id, ns, room, event, data: data ?? null, echo: !!echo };
    default: return { type: kind, id, ns, event, data: data ?? null };
  }
}

/**
 * Client protocol state for one session, across many connections. No I/O, no clock:
 * each call gets `now` (seconds). The driver writes `dataToSend()`, acts on
 * `takeEvents()`, and calls `handleTimer(now)` at `timer()`.
 *
 * Rules (PROTOCOL §5, §7, §9, §10):
 * 1. Every message gets the next id and enters the outbox before anything is written;
 *    it leaves only with an event: reply, error, timeout, drop.
 * 2. Nothing but hello goes out before welcome; then the outbox goes out in id order
 *    through the in-flight window, and after a reconnect every unanswered entry again.
 * 3. A delivery at or below its stream's position is a duplicate; a new epoch, a gap
 *    frame or a lost session is reported as a gap.
 * 4. A ping at most `interval` after the last (the first timed from the hello);
 *    silence for `interval + timeout` is a dead link.
 */
export class Session {
  constructor({ auth = null, name = "rtchat-js", maxInFlight = 1000, handshakeTimeout = 10, maxOutbox = 10_000,
    maxOutboxBytes = 16 << 20, overflow = "raise", random = Math.random } = {}) {
    if (overflow !== "raise" && overflow !== "drop_oldest") throw new TypeError(`overflow is "raise" or "drop_oldest": ${overflow}`);
    Object.assign(this, { auth, name, maxInFlight, handshakeTimeout, maxOutbox, maxOutboxBytes, overflow });
    this._random = random;
    /** "idle" | "connecting" | "reconnecting" | "connected" | "closed" */
    this.state = "idle";
    this.sessionId = this.token = this.rtt = null;
    this.streams = new Map(); // stream -> {epoch, offset, ns, room}: the last entry handled
    this.rooms = new Map(); // roomKey(ns, room) -> stream
    this.counters = { sent: 0, resent: 0, retried: 0, duplicatesDropped: 0, gaps: 0, timedOut: 0, dropped: 0, connections: 0 };
    this.maxFrameBytes = 1 << 20; // the server's, from its last welcome
    this.pollMaxFrames = 100;
    this.pollTimeout = POLL_HOLD; // s the server holds a poll, from its last welcome
    this._outbox = new Map(); // id -> entry; a Map keeps insertion order, which is id order
    this._outboxBytes = 0;
    this._unsent = []; // ids to write on this connection, ascending
    this._inFlight = new Set(); // written on this connection, unanswered
    this._later = []; // {at, id}: answered `unavailable` or `rate_limited`, to write again at `at`
    this._expiring = new Set(); // ids with an expiry
    this._everSent = new Set();
    this._limit = maxInFlight;
    this._nextId = 1;
    this._unlisted = [];
    this._out = [];
    this._events = [];
    this._now = -Infinity;
    this._hb = { open: false, helloAt: 0, lastHeard: 0, nextPing: null, deadAt: null, interval: 0, timeout: 0 };
  }

  /** Frames to write, in order (handed over and cleared). */
  dataToSend() { const out = this._out; this._out = []; return out; }
  /** Events for the app, in order (handed over and cleared). */
  takeEvents() { const events = this._events; this._events = []; return events; }
  /** Messages in the outbox: queued or written, not answered. */
  get outboxSize() { return this._outbox.size; }
  /** Every id up to this one is settled: the lowest unanswered − 1 (PROTOCOL §10.3). */
  get lastReply() { return this._lowestUnanswered() - 1; }

  /** A transport is up: say hello, with resume info when we hold a session. */
  connectionMade(now) {
    if (this.state === "closed") throw new InvalidState("session is closed");
    this._now = now;
    this.state = this.counters.connections > 0 ? "reconnecting" : "connecting";
    this._hb = { open: false, helloAt: now, lastHeard: now, nextPing: null, deadAt: now + this.handshakeTimeout, interval: 0, timeout: 0 };
    let resume = null;
    this._unlisted = [];
    if (this.token !== null) {
      // Rooms first: past the cap a stream cannot be resumed (its room is reported as not rejoined).
      const ordered = [...this.streams].sort((a, b) => (a[1].room === null) - (b[1].room === null));
      this._unlisted = ordered.slice(MAX_RESUME_STREAMS).filter(([, s]) => s.room !== null).map(([name]) => name);
      const streams = ordered.slice(0, MAX_RESUME_STREAMS).map(([stream, s]) =>
        ({ stream, epoch: s.epoch, offset: s.offset, ns: s.room === null ? null : s.ns, room: s.room }));
      resume = { token: this.token, session: this.sessionId, last_reply: this.lastReply, streams };
    }
    this._out.push(JSON.stringify({ type: "hello", protocol: PROTOCOL_VERSION, auth: this.auth, resume, client: this.name, batch: true }));
  }

  /** The transport is gone: every unanswered message will be written again on the next one. */
  connectionLost(now) {
    if (this.state === "closed") return;
    this.state = "idle";
    this._out = [];
    this._inFlight.clear();
    this._later = [];
    this._unsent = [...this._outbox.keys()];
    this._stopHeartbeat();
    this.handleTimer(now); // expiries still run while offline
  }

  /** No more connections. */
  close() {
    this.state = "closed";
    this._out = [];
    this._stopHeartbeat();
  }

  /** Send a heartbeat now; its pong gives an `rtt` event. */
  ping(now) {
    if (this.state === "connected") this._out.push(JSON.stringify({ type: "ping", ts: now }));
  }

  /**
   * Queue one message and return its id. `fields`: room, event, data, echo, since, limit,
   * reverse as the kind needs. Throws MessageTooLarge, ValidationFailed, BufferFull or a
   * TypeError (a bad `since` or `limit`) before it gets an id.
   */
  queue(kind, ns, fields, now, expiresIn = null) {
    if (this.state === "closed") throw new InvalidState("session is closed");
    this._now = Math.max(this._now, now);
    const id = this._nextId, frame = frameOf(kind, id, ns, fields), room = frame.room ?? null;
    const text = encodeChecked(frame, frame.data, "data", kind);
    const size = utf8Length(text);
    if (size > this.maxFrameBytes) throw new MessageTooLarge(`${kind} is ${size} bytes encoded; the server accepts at most ${this.maxFrameBytes}`);
    while (this._outbox.size >= this.maxOutbox || (this._outbox.size && this._outboxBytes + size > this.maxOutboxBytes)) {
      if (this.overflow === "raise") throw new BufferFull(`the outbox holds ${this._outbox.size} messages (${this._outboxBytes} bytes)`);
      const oldest = this._outbox.values().next().value;
      this._remove(oldest);
      this._unfollow(oldest);
      this.counters.dropped++;
      this._events.push({ type: "dropped", id: oldest.id, kind: oldest.kind });
    }
    const entry = { id, kind, text, size, ns, room, expiresAt: expiresIn == null ? null : now + expiresIn, follows: false };
    this._nextId = id + 1;
    this._outbox.set(id, entry);
    this._outboxBytes += size;
    this._unsent.push(id);
    if (entry.expiresAt !== null) this._expiring.add(id);
    if (kind === "join" && frame.since) entry.follows = this._follow(ns, room, frame.since);
    this._pump();
    return id;
  }

  /**
   * A join with `since` follows the room stream from there at once, before its reply (PROTOCOL
   * §7.6): what the server replays after `since` is delivered, anything at or before it is a
   * duplicate. A stream followed already keeps its position, as on a join reply (the Python
   * client's rule too). True when this started following the stream.
   */
  _follow(ns, room, since) {
    const stream = roomStream(ns, room);
    if (this.streams.has(stream)) return false;
    this.streams.set(stream, { epoch: since.epoch, offset: since.offset, ns, room });
    return true;
  }

  /** A join that started following its stream failed: follow it no more, unless a member anyway. */
  _unfollow(entry) {
    if (entry.follows && !this.rooms.has(roomKey(entry.ns, entry.room))) this.streams.delete(roomStream(entry.ns, entry.room));
  }

  _lowestUnanswered() {
    for (const id of this._outbox.keys()) return id;
    return this._nextId;
  }

  /** Write queued messages in id order while the in-flight window allows (PROTOCOL §10.2). */
  _pump() {
    if (this.state !== "connected") return;
    while (this._unsent.length && this._inFlight.size < this._limit) {
      const id = this._unsent[0];
      // None `limit` or more past the oldest unanswered: the server's dedupe must still hold its reply.
      if (id >= this._lowestUnanswered() + this._limit) return;
      this._unsent.shift();
      const entry = this._outbox.get(id);
      if (!entry) continue; // left the outbox meanwhile
      if (entry.expiresAt !== null && entry.expiresAt <= this._now) {
        this._expire(entry); // overdue though the timer has not fired yet: never written
        continue;
      }
      this._inFlight.add(id);
      this._out.push(entry.text);
      if (this._everSent.has(id)) this.counters.resent++;
      else this._everSent.add(id), this.counters.sent++;
    }
  }

  /** Out of the outbox (answered, expired, dropped). One written already keeps its in-flight
   * slot until answered, unless settled: the server will still run it, and the window counts it. */
  _remove(entry) {
    this._outbox.delete(entry.id);
    this._outboxBytes -= entry.size;
    this._expiring.delete(entry.id);
    this._everSent.delete(entry.id);
  }

  _expire(entry) {
    this._remove(entry);
    this._unfollow(entry);
    this.counters.timedOut++;
    this._events.push({ type: "timeout", id: entry.id, kind: entry.kind });
  }

  _settle(id) {
    this._inFlight.delete(id);
    const entry = this._outbox.get(id);
    if (entry) this._remove(entry);
    return entry ?? null;
  }

  /** One message from the server: JSON text (a frame or a batch), or frames already parsed. */
  receive(data, now) {
    this._now = now;
    const hb = this._hb;
    hb.lastHeard = now; // any frame counts as life
    if (hb.open) hb.deadAt = now + hb.interval + hb.timeout;
    let frames = data;
    if (typeof data === "string") {
      try {
        frames = JSON.parse(data);
      } catch (error) {
        return this._violation(`undecodable server frame: ${error.message}`);
      }
    }
    for (const frame of Array.isArray(frames) ? frames : [frames]) this._onFrame(frame, now);
  }

  _violation(message) {
    this._events.push({ type: "violation", message });
  }

  _onFrame(f, now) {
    if (f === null || typeof f !== "object" || typeof f.type !== "string") return this._violation(`not a frame: ${JSON.stringify(f)}`);
    switch (f.type) {
      case "message": return isPosition(f) ? this._onMessage(f) : this._violation("bad message frame");
      case "reply": return Number.isInteger(f.id) ? this._onReply(f) : this._violation("reply without an id");
      case "error": return this._onError(f);
      case "gap": return isPosition(f) ? this._onGap(f) : this._violation("bad gap frame");
      case "welcome": return this._onWelcome(f, now);
      case "ping":
        if (typeof f.ts === "number") this._out.push(JSON.stringify({ type: "pong", ts: f.ts }));
        return;
      case "pong":
        if (typeof f.ts !== "number") return;
        this.rtt = Math.max(0, now - f.ts);
        return this._events.push({ type: "rtt", seconds: this.rtt });
      default: return this._violation(`unknown server frame type ${JSON.stringify(f.type)}`);
    }
  }

  _onWelcome(f, now) {
    const { heartbeat: hb, limits } = f;
    if (!HANDSHAKING.has(this.state)) return this._violation("unexpected welcome");
    if (typeof f.session !== "string" || typeof f.token !== "string" || !(hb?.interval > 0) || !(hb?.timeout > 0) || typeof limits !== "object" || !limits) {
      return this._violation("bad welcome frame");
    }
    this.counters.connections++;
    if (!f.resumed && this.sessionId !== null) {
      // The old session is gone: the server restored its rooms from our hello, but its inbox is lost.
      const oldInbox = `inbox:${this.sessionId}`, lost = this.streams.get(oldInbox);
      if (lost) this.streams.delete(oldInbox), this._gap(oldInbox, lost.ns, null, lost.epoch, lost.offset, "session_unknown");
      for (const stream of this._unlisted) this._dropRoom(stream, "not_rejoined");
    }
    if (Number.isInteger(limits.max_frame_bytes)) this.maxFrameBytes = limits.max_frame_bytes;
    this.pollMaxFrames = limits.poll_max_frames > 0 ? Math.floor(limits.poll_max_frames) : 100;
    this.pollTimeout = limits.poll_timeout > 0 ? limits.poll_timeout : POLL_HOLD;
    for (const entry of [...this._outbox.values()]) {
      if (entry.size <= this.maxFrameBytes) continue;
      this._settle(entry.id); // it would be refused (1009) at every reconnect: fail it now
      this._unfollow(entry);
      this._events.push({ type: "failed", id: entry.id, kind: entry.kind, code: "too_large", message: `${entry.size} bytes; the server accepts at most ${this.maxFrameBytes}`, details: null });
    }
    this.state = "connected";
    this.sessionId = f.session;
    this.token = f.token;
    if (isPosition(f.inbox) && !this.streams.has(f.inbox.stream)) this.streams.set(f.inbox.stream, { epoch: f.inbox.epoch, offset: f.inbox.offset, ns: "/", room: null });
    this._limit = Math.min(this.maxInFlight, limits.max_in_flight > 0 ? limits.max_in_flight : Infinity);
    // Pings timed from our hello, as the server's silence clock is (PROTOCOL §9).
    Object.assign(this._hb, { open: true, interval: hb.interval, timeout: hb.timeout, deadAt: now + hb.interval + hb.timeout });
    this._hb.nextPing = this._hb.helloAt + this._pingDelay();
    this._events.push({ type: "welcome", session: f.session, resumed: !!f.resumed });
    this._pump();
  }

  _onReply(f) {
    const entry = this._settle(f.id);
    if (entry) { // else: the answer to a resend of something settled or given up on; its slot is free
      if (entry.kind === "join") this._onJoined(entry, f.data);
      if (entry.kind === "leave") this._forgetRoom(entry.ns, entry.room);
      this._events.push({ type: "reply", id: f.id, kind: entry.kind, data: f.data ?? null });
    }
    this._pump();
  }

  _onJoined(entry, data) {
    if (!isPosition(data)) return this._violation(`bad join reply: ${JSON.stringify(data)}`);
    const { stream, epoch, offset } = data, known = this.streams.get(stream);
    this.rooms.set(roomKey(entry.ns, entry.room), stream);
    if (known && known.epoch === epoch) return; // already following it: keep our own offset
    if (known) this._gap(stream, entry.ns, entry.room, epoch, offset, "epoch_changed"); // joined again, new epoch
    this.streams.set(stream, { epoch, offset, ns: entry.ns, room: entry.room });
  }

  _forgetRoom(ns, room) {
    const key = roomKey(ns, room), stream = this.rooms.get(key);
    this.rooms.delete(key);
    if (stream !== undefined) this.streams.delete(stream);
  }

  _onError(f) {
    const code = String(f.code), message = String(f.message ?? ""), retryAfter = typeof f.retry_after === "number" ? f.retry_after : null;
    if (f.id === null || f.id === undefined) { // about the connection: a refused hello, or a notice
      const type = HANDSHAKING.has(this.state) ? "refused" : "notice";
      return this._events.push({ type, code, message, retryAfter, fatal: Object.hasOwn(FATAL_REFUSALS, code) });
    }
    if ((code === "unavailable" || code === "rate_limited") && this._outbox.has(f.id)) { // not processed: keep it, write it again later
      this._inFlight.delete(f.id);
      this._later.push({ at: this._now + (retryAfter ?? 1), id: f.id });
      return this.counters.retried++;
    }
    const entry = this._settle(f.id);
    if (entry) this._unfollow(entry), this._events.push({ type: "failed", id: f.id, kind: entry.kind, code, message, details: f.details ?? null });
    this._pump();
  }

  _onMessage(f) {
    const known = this.streams.get(f.stream), ns = f.ns ?? "/", room = f.room ?? null;
    if (known && known.epoch === f.epoch) {
      if (f.offset <= known.offset) return this.counters.duplicatesDropped++;
      known.offset = f.offset;
    } else {
      // A new epoch without a gap frame: the server lost history. Be loud.
      if (known) this._gap(f.stream, ns, room, f.epoch, f.offset - 1, "epoch_changed");
      this.streams.set(f.stream, { epoch: f.epoch, offset: f.offset, ns, room });
    }
    this._events.push({ type: "delivery", frame: f });
  }

  _onGap(f) {
    if (f.reason === "not_rejoined") return this._dropRoom(f.stream, f.reason, f.epoch, f.offset);
    const ns = f.ns ?? "/", room = f.room ?? null, known = this.streams.get(f.stream);
    // Never back within an epoch: what was handled stays a duplicate.
    const offset = known && known.epoch === f.epoch ? Math.max(known.offset, f.offset) : f.offset;
    this.streams.set(f.stream, { epoch: f.epoch, offset, ns, room });
    this._gap(f.stream, ns, room, f.epoch, offset, String(f.reason));
  }

  /** The server did not put the session back in a room: forget it, loudly. */
  _dropRoom(stream, reason, epoch = null, offset = 0) {
    const position = this.streams.get(stream);
    let ns = position?.ns ?? "/", room = position?.room ?? null;
    for (const [key, name] of [...this.rooms]) if (name === stream) this.rooms.delete(key), ([ns, room] = key.split("\u0000"));
    this.streams.delete(stream);
    if (position && epoch === null) ({ epoch, offset } = position);
    this._gap(stream, ns, room, epoch ?? "", offset, reason);
  }

  _gap(stream, ns, room, epoch, offset, reason) {
    this.counters.gaps++;
    this._events.push({ type: "gap", gap: { stream, ns, room, epoch, offset, reason } });
  }

  /** A random point of the interval's last tenth, so that connections do not ping in step. */
  _pingDelay() { return this._hb.interval * (1 - 0.1 * this._random()); }
  _stopHeartbeat() { Object.assign(this._hb, { open: false, nextPing: null, deadAt: null }); }

  /** The next moment `handleTimer` has work to do, or null. */
  timer() {
    const times = [...this._expiring].map((id) => this._outbox.get(id).expiresAt);
    for (const t of [...this._later.map((l) => l.at), this._hb.nextPing, this._hb.deadAt]) if (t !== null) times.push(t);
    return times.length ? Math.min(...times) : null;
  }

  /** Expire messages, write again what `unavailable` held back, ping, or declare the link dead. */
  handleTimer(now) {
    this._now = now;
    for (const id of [...this._expiring]) if (this._outbox.get(id).expiresAt <= now) this._expire(this._outbox.get(id));
    for (const { id } of this._later.filter((l) => l.at <= now)) {
      if (this._outbox.has(id) && !this._unsent.includes(id)) this._unsent.push(id), this._unsent.sort((a, b) => a - b);
    }
    this._later = this._later.filter((l) => l.at > now);
    const hb = this._hb;
    if (hb.deadAt !== null && now >= hb.deadAt) {
      this._stopHeartbeat();
      return this._events.push({ type: "dead", reason: `no frame from the server for ${(now - hb.lastHeard).toFixed(1)}s` });
    }
    if (hb.nextPing !== null && now >= hb.nextPing) {
      this._out.push(JSON.stringify({ type: "ping", ts: now }));
      hb.nextPing = now + this._pingDelay();
    }
    this._pump();
  }
}

// ---------------------------------------------------------------------------
// 4. Transports. Each has `kind`, `onData` (set by the client), `send(texts)`,
//    `close(code, reason)` (a goodbye), `abort(why)`, and `ended`: a promise of
//    `{code, reason, why}` that resolves once, when the connection is over.

class Transport {
  constructor(kind, url, env, connectTimeout) {
    Object.assign(this, { kind, url, onData: null, _env: env, _connectTimeout: connectTimeout, _done: false });
    this.ended = new Promise((resolve) => (this._resolveEnd = resolve));
  }

  _finish(code, reason, why) {
    if (this._done) return false;
    this._done = true;
    this._resolveEnd({ code, reason, why });
    return true;
  }
}

/** One WebSocket connection; `open()` resolves once it is open, rejects if it cannot be. */
class WebSocketTransport extends Transport {
  constructor(url, env, connectTimeout) {
    super("websocket", url, env, connectTimeout);
    this._opened = false;
  }

  open() {
    return new Promise((resolve, reject) => {
      const env = this._env;
      try {
        this._ws = new env.WebSocket(this.url);
      } catch (error) {
        return this._finish(1006, "", String(error)), reject(error);
      }
      const ws = this._ws;
      ws.binaryType = "arraybuffer";
      const timer = env.setTimeout(() => this._failOpen(`no WebSocket opening within connectTimeout=${this._connectTimeout}s`), this._connectTimeout * 1000);
      this._failOpen = (why) => {
        if (this._opened || !this._finish(1006, "", why)) return;
        env.clearTimeout(timer);
        ws.onopen = ws.onmessage = null;
        try { ws.close(); } catch { /* closing already */ } // a late opening must not linger
        reject(new Error(why));
      };
      ws.onopen = () => {
        if (this._done) return;
        env.clearTimeout(timer);
        this._opened = true;
        resolve();
      };
      ws.onerror = () => {}; // a close event follows, with the code
      ws.onclose = ({ code, reason = "" }) => {
        if (!this._opened) this._failOpen(`the WebSocket closed before it opened (code ${code})`);
        else this._finish(code, reason, `connection closed (code ${code}: ${reason})`);
      };
      ws.onmessage = ({ data }) => {
        if (!this._done) this.onData?.(typeof data === "string" ? data : decoder.decode(data));
      };
    });
  }

  send(texts) {
    if (!this._done) for (const text of texts) this._ws.send(text);
  }

  /** The goodbye: a close frame with `code`, then the peer's (or 5 s). */
  close(code, reason) {
    if (!this._opened) return this._failOpen?.("closed by the client"), Promise.resolve();
    try { this._ws.close(code, reason); } catch { /* closing already */ }
    const timer = this._env.setTimeout(() => this._finish(1006, "", "the close was not answered"), 5000);
    return this.ended.then(() => this._env.clearTimeout(timer));
  }

  /** Drop the link now (declared dead). A page cannot drop a socket without a close frame:
   * this one has no code (the server sees 1005, and the session stays resumable). */
  abort(why) {
    if (!this._opened) return this._failOpen?.(why);
    if (!this._finish(1006, "", why)) return;
    this._ws.onmessage = null;
    try { this._ws.close(); } catch { /* closing already */ }
  }
}

/** Why a polling request failed for good (not worth asking again). */
class PollFailed extends Error {}

/**
 * One HTTP long-polling connection (PROTOCOL §1.1): `open(frames)` posts the hello and
 * gets the `sid`; `start()` polls, each GET acknowledging the batch before, so a lost
 * answer comes again; `send` queues frames that one writer posts in order, a POST at a
 * time, each within `poll_max_frames` frames and `max_frame_bytes`.
 */
class PollingTransport extends Transport {
  constructor(url, env, connectTimeout, limits) {
    super("polling", url, env, connectTimeout);
    Object.assign(this, { sid: null, ack: 0, _limits: limits, _queue: [], _writing: null, _controllers: new Set() });
  }

  async open(frames) {
    // Not retried: a second opening POST would open a second connection.
    const answer = await this._request("POST", frames, { timeout: this._connectTimeout, retry: false });
    if (typeof answer.sid !== "string") throw new PollFailed(`the opening POST's answer has no sid: ${JSON.stringify(answer)}`);
    this.sid = answer.sid;
  }

  /** Poll until the connection ends; each answer's frames go to `onData` as one batch. */
  async start() {
    try {
      while (!this._done) {
        const hold = this._limits()[2];
        const answer = await this._request("GET", null, { timeout: hold + POLL_MARGIN, params: { ack: String(this.ack) } });
        if (this._done) return;
        if (!Number.isInteger(answer.cursor) || !Array.isArray(answer.frames)) throw new PollFailed(`not a poll answer: ${JSON.stringify(answer)}`);
        this.ack = answer.cursor;
        this.onData?.(answer.frames); // an empty batch too: any answer counts as life
        const close = answer.close;
        if (close && typeof close === "object") return this._finish(close.code, String(close.reason ?? ""), `closed by the server (code ${close.code}: ${close.reason ?? ""})`);
      }
    } catch (error) {
      this.abort(`polling connection to ${this.url} lost: ${error.message}`);
    }
  }

  send(texts) {
    if (this._done || !texts.length) return;
    for (const text of texts) this._queue.push(text);
    this._writing ??= this._write();
  }

  async _write() {
    try {
      while (this._queue.length && !this._done) await this._request("POST", this._take(), { timeout: this._connectTimeout });
    } catch (error) {
      this.abort(`a POST to ${this.url} failed: ${error.message}`);
    } finally {
      this._writing = null;
    }
  }

  /** The next POST's frames, in order, within the server's limits (at least one). */
  _take() {
    const [maxFrames, maxBytes] = this._limits(), taken = [];
    let size = 2; // the brackets
    while (this._queue.length && taken.length < maxFrames) {
      const bytes = utf8Length(this._queue[0]) + 1; // and a comma
      if (taken.length && size + bytes > maxBytes) break;
      taken.push(this._queue.shift());
      size += bytes;
    }
    return taken;
  }

  /** The goodbye: what is queued is posted first, then DELETE (close code 1000). */
  async close(code) {
    if (this._done) return;
    if (code === 1000 && this.sid !== null) {
      await this._writing;
      // Failing is fine: the server drops the connection after poll_idle_timeout anyway.
      await this._request("DELETE", null, { timeout: this._connectTimeout, retry: false }).catch(() => {});
    }
    this._finish(code, "client closed", "closed by the client");
    this._controllers.forEach((c) => c.abort());
  }

  abort(why) {
    if (this._finish(1006, "", why)) this._controllers.forEach((c) => c.abort());
  }

  /** One request's JSON answer. A lost answer (network error, timeout, 502/503/504) is asked
   * for again: a poll with the same `ack` gets the same batch; a POST's frames are deduped by id. */
  async _request(method, frames, { timeout, params = {}, retry = true }) {
    const env = this._env, url = new URL(this.url), waits = retry ? [...POLL_RETRIES] : [];
    for (const [key, value] of Object.entries({ ...(this.sid === null ? {} : { sid: this.sid }), ...params })) url.searchParams.set(key, value);
    for (;;) {
      const controller = new AbortController();
      this._controllers.add(controller);
      const timer = env.setTimeout(() => controller.abort(), timeout * 1000);
      let why;
      try {
        const init = { method, signal: controller.signal };
        if (frames) Object.assign(init, { headers: { "content-type": "application/json" }, body: `[${frames.join(",")}]` });
        const response = await env.fetch(url.href, init);
        const text = await response.text();
        if (!RETRY_STATUSES.has(response.status)) {
          if (response.status !== 200) throw new PollFailed(`${method} ${url.pathname}: HTTP ${response.status} ${text}`);
          let answer;
          try {
            answer = JSON.parse(text);
          } catch {
            throw new PollFailed(`${method} ${url.pathname}: the answer is not JSON`);
          }
          if (answer === null || typeof answer !== "object") throw new PollFailed(`${method} ${url.pathname}: the answer is not a JSON object`);
          return answer;
        }
        why = `HTTP ${response.status} ${text}`;
      } catch (error) {
        if (error instanceof PollFailed) throw error;
        why = error?.name === "AbortError" ? `no answer within ${timeout}s` : String(error?.message ?? error);
      } finally {
        env.clearTimeout(timer);
        this._controllers.delete(controller);
      }
      if (this._done) throw new PollFailed("the connection is closed");
      const wait = waits.shift();
      if (wait === undefined) throw new PollFailed(`${method} ${url.pathname}: ${why}`);
      await new Promise((resolve) => env.setTimeout(resolve, wait * 1000));
    }
  }
}

// ---------------------------------------------------------------------------
// 5. Client: the public API, and the loop that dials, serves and backs off

/** A read's answer as the app gets it (docs/browser.md), or a ProtocolError if the server's is not one. */
function readAnswer(kind, d) {
  const ok = d !== null && typeof d === "object" && typeof d.stream === "string";
  if (kind === "presence" && ok && Array.isArray(d.members)) return d.members;
  if (kind === "presence_stats" && ok && Number.isInteger(d.sessions) && Number.isInteger(d.users)) return { stream: d.stream, sessions: d.sessions, users: d.users };
  if (kind === "history" && ok && typeof d.epoch === "string" && Number.isInteger(d.offset) && Array.isArray(d.entries)) {
    const { stream, epoch, offset, entries } = d;
    return { stream, epoch, offset, gap: d.gap ?? null, more: !!d.more, entries, position: { epoch, offset } };
  }
  throw new ProtocolError(`bad ${kind} reply: ${JSON.stringify(d)}`);
}

/** The messaging API bound to one namespace of a client's connection. */
export class Namespace {
  constructor(client, path) {
    if (typeof path !== "string" || !path.startsWith("/")) throw new TypeError(`a namespace starts with "/": ${path}`);
    this._client = client ?? this;
    /** The namespace's path, e.g. "/" or "/admin". */
    this.path = path;
  }

  /** Join `room`; resolves with the room stream's position `{stream, epoch, offset}`. `since`
   * (`{epoch, offset}`: a history answer's `position`): the entries after it are delivered first. */
  join(room, { since = null } = {}) { return this._client._send("join", this.path, { room, since }); }
  /** Leave `room`. */
  leave(room) { return this._client._send("leave", this.path, { room }).then(() => undefined); }

  /** Publish to a room the client joined; resolves with the entry's offset once acknowledged.
   * `echo`: deliver it to this client too. */
  publish(room, event, data = null, { echo = false, expiresIn = null } = {}) {
    return this._client._send("publish", this.path, { room, event, data, echo }, expiresIn).then((r) => r?.offset ?? 0);
  }

  /** Send to a server handler; resolves once the server has run it. */
  emit(event, data = null, { expiresIn = null } = {}) {
    return this._client._send("emit", this.path, { event, data }, expiresIn).then(() => undefined);
  }

  /** Call a server handler; resolves with its reply. Past `timeout` s (default: the client's
   * `requestTimeout`) rejects with AckTimeout, and the request is never sent later. */
  request(event, data = null, { timeout = null } = {}) {
    return this._client._send("request", this.path, { event, data }, timeout ?? this._client.requestTimeout);
  }

  /** Who is in `room`: `[{session, user, client, joined_at}]`, oldest first (NotEnabled where the
   * namespace keeps no presence). */
  presence(room, { timeout = null } = {}) { return this._read("presence", { room }, timeout); }
  /** How many are in `room`: `{stream, sessions, users}`. */
  presenceStats(room, { timeout = null } = {}) { return this._read("presence_stats", { room }, timeout); }

  /** A page of `room`'s kept entries: `{stream, epoch, offset, gap, more, entries, position}`.
   * `since`: after it (before it, with `reverse`: newest first); `position` is where to join. */
  history(room, { since = null, limit = 100, reverse = false, timeout = null } = {}) {
    return this._read("history", { room, since, limit, reverse }, timeout);
  }

  /** A read is answered like a request: AckTimeout after `timeout` s (default `requestTimeout`). */
  _read(kind, fields, timeout) {
    return this._client._send(kind, this.path, fields, timeout ?? this._client.requestTimeout).then((d) => readAnswer(kind, d));
  }

  /** `handler(data, meta)` for each session that joins a room of this namespace (its `$join`
   * delivery, where the server sends presence events): `data` is `{session, user, client, joined_at}`. */
  onJoin(handler) { return this.on("$join", handler); }
  /** The same for each that leaves (`$leave`); `data.reason` says how. */
  onLeave(handler) { return this.on("$leave", handler); }

  /** Call `handler(data, meta)` for each delivery of `event` ("*": every event) in this
   * namespace; returns a function that removes it. */
  on(event, handler) {
    const key = roomKey(this.path, event), handlers = this._client._handlers;
    if (!handlers.has(key)) handlers.set(key, []);
    handlers.get(key).push(handler);
    return () => this.off(event, handler);
  }

  /** Remove a handler added with `on`. */
  off(event, handler) {
    const list = this._client._handlers.get(roomKey(this.path, event)) ?? [], at = list.indexOf(handler);
    if (at >= 0) list.splice(at, 1);
  }
}

/** An rtchat client: `const c = new Client(url, options); await c.connect();` (docs/browser.md). */
export class Client extends Namespace {
  constructor(url, options = {}) {
    super(null, "/");
    const o = options, transports = [...(o.transports ?? ["websocket", "polling"])];
    if (!transports.length || transports.some((t) => t !== "websocket" && t !== "polling")) {
      throw new TypeError(`transports are "websocket" and/or "polling", in the order to try: ${transports}`);
    }
    /** The WebSocket URLs, tried in turn. */
    this.urls = (Array.isArray(url) ? url : [url]).map((u) => resolveUrl(u, o.base ?? globalThis.location?.href));
    if (!this.urls.length) throw new TypeError("at least one URL is needed");
    this.transports = transports;
    this.requestTimeout = o.requestTimeout ?? 30;
    this.connectTimeout = o.connectTimeout ?? 10;
    this.retryFirstConnect = !!o.retryFirstConnect;
    this.reconnect = { initialDelay: 0.5, maxDelay: 30, multiplier: 2, maxAttempts: null, maxElapsed: null, stableAfter: 10, enabled: true, ...o.reconnect };
    this._env = {
      WebSocket: o.WebSocket ?? globalThis.WebSocket,
      fetch: o.fetch ?? ((...args) => globalThis.fetch(...args)),
      setTimeout: o.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms)),
      clearTimeout: o.clearTimeout ?? ((id) => globalThis.clearTimeout(id)),
      clock: o.clock ?? (() => performance.now() / 1000),
      random: o.random ?? Math.random,
      logger: o.logger ?? console,
    };
    if (!this._env.WebSocket && !transports.includes("polling")) throw new TypeError('no WebSocket here: pass options.WebSocket, or allow "polling"');
    if (o.token != null && typeof o.token !== "string" && typeof o.token !== "function") {
      throw new TypeError("token is a string, or a function returning one (or a promise of one)");
    }
    if (o.token != null && o.auth?.token !== undefined) throw new TypeError("give the token as token or as auth.token, not both");
    /** A function: called before every dial, so an expired token is refreshed (PROTOCOL §3.3). */
    this._token = typeof o.token === "function" ? o.token : null;
    this._authBase = o.auth ?? null;
    const auth = typeof o.token === "string" ? { ...this._authBase, token: o.token } : this._authBase;
    if (auth !== null) encodeChecked(auth, auth, "auth", "auth"); // it goes in every hello
    const { maxMessages: maxOutbox, maxBytes: maxOutboxBytes, overflow } = o.outbox ?? {};
    this._session = new Session({ auth, name: o.name ?? "rtchat-js", maxInFlight: o.maxInFlight ?? 1000, handshakeTimeout: this.connectTimeout,
      maxOutbox, maxOutboxBytes, overflow, random: this._env.random });
    this._handlers = new Map();
    this._callbacks = { state: [], gap: [], error: [], attempt: [] };
    this._pending = new Map(); // id -> {resolve, reject}
    this._rttWaiters = [];
    this._flushWaiters = [];
    this._jobs = [];
    this._state = "idle";
    this._transport = this._live = null; // the one dialled or served; the one served
    this._timer = this._timerWhen = this._runner = this._fatal = this._retryAfter = this._wake = null;
    this._dispatching = this._closing = this._finished = this._welcomedHere = false;
    this._expired = this._triedFresh = false;
    this._freshToken = undefined;
    this._failedAttempts = 0;
    /** Why the client stopped, once it has. */
    this.closedReason = null;
  }

  /** "idle" | "connecting" | "connected" | "reconnecting" | "closed": the value last passed to onStateChange. */
  get state() { return this._state; }
  /** What carries the connection now: "websocket", "polling", or null between connections. */
  get transport() { return this._live?.kind ?? null; }
  /** The server's id for this session (others see it as `meta.sender`). */
  get sessionId() { return this._session.sessionId; }
  /** The last measured heartbeat round trip, in seconds (null before the first). */
  get rtt() { return this._session.rtt; }
  /** Messages queued or written, not answered yet. */
  get outboxSize() { return this._session.outboxSize; }

  /** What reliability work happened: the Python client's counters, in camelCase. */
  get counters() {
    const c = this._session.counters;
    return { ...c, reconnects: Math.max(0, c.connections - 1), failedAttempts: this._failedAttempts, outboxSize: this.outboxSize };
  }

  /** `fn(state)` on each state change; returns a function that removes it. */
  onStateChange(fn) { return this._subscribe("state", fn); }
  /** `fn(gap)` for each stream position that could not be caught up: `{stream, ns, room, epoch, offset, reason}`. */
  onGap(fn) { return this._subscribe("gap", fn); }
  /** `fn(error)` for what cannot be rejected to a caller: handler failures, server notices, protocol violations. */
  onError(fn) { return this._subscribe("error", fn); }
  /** `fn(attempt, url)` as each connection attempt starts (attempt counts from 1 again after each connection). */
  onAttempt(fn) { return this._subscribe("attempt", fn); }
  /** The same API on another namespace, over the same connection. */
  namespace(path) { return new Namespace(this, path); }

  _subscribe(kind, fn) {
    this._callbacks[kind].push(fn);
    return () => {
      const list = this._callbacks[kind], at = list.indexOf(fn);
      if (at >= 0) list.splice(at, 1);
    };
  }

  /** Connect and wait for the server's welcome; rejects (and closes the client) if it cannot. */
  async connect() {
    if (this._finished) throw new ClientClosed("this client was closed; make a new one");
    if (!this._runner) {
      this._welcome = new Promise((resolve, reject) => (this._welcomeSettle = { resolve, reject }));
      this._runner = this._run();
    }
    try {
      await this._welcome;
    } catch (error) {
      await this.close();
      throw error;
    }
  }

  /** Close for good (close code 1000: the server ends the session). Waiting calls reject with ClientClosed. */
  close() {
    this._closeP ??= (async () => {
      this._closing = true;
      this._wake?.(); // cut a backoff wait short
      await this._transport?.close(1000, "client closed");
      await this._runner;
      this._finish(this._fatal ?? new ClientClosed("the client was closed"));
    })();
    return this._closeP;
  }

  /** Measure one round trip to the server now, in seconds. */
  ping() {
    if (this._session.state !== "connected") return Promise.reject(new ConnectionLost("not connected"));
    const rtt = new Promise((resolve, reject) => this._rttWaiters.push({ resolve, reject }));
    this._session.ping(this._env.clock());
    this._afterIo();
    return rtt;
  }

  /** Wait until the outbox is empty (everything sent was answered); AckTimeout after `timeout` s. */
  flush(timeout = null) {
    if (!this.outboxSize || this._closing) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = timeout === null ? null : this._env.setTimeout(() => reject(new AckTimeout(`outbox not empty after ${timeout}s`)), timeout * 1000);
      this._flushWaiters.push(() => (this._env.clearTimeout(timer), resolve()));
    });
  }

  async _send(kind, ns, fields, expiresIn = null) {
    if (this._closing) throw this.closedReason ?? new ClientClosed("the client is closed");
    if (!this._runner) throw new ClientClosed("the client is not connected: call connect() first");
    const id = this._session.queue(kind, ns, fields, this._env.clock(), expiresIn);
    const answer = new Promise((resolve, reject) => this._pending.set(id, { resolve, reject }));
    this._afterIo();
    return answer;
  }

  /** The driver step, after every input: act on the core's events, write its frames, re-arm its one timer. */
  _afterIo() {
    const s = this._session;
    for (const event of s.takeEvents()) this._onEvent(event);
    const out = s.dataToSend();
    if (out.length) this._live?.send(out);
    if (!this.outboxSize || this._closing) for (const done of this._flushWaiters.splice(0)) done();
    const when = this._finished ? null : s.timer();
    if (when === this._timerWhen) return;
    this._env.clearTimeout(this._timer);
    [this._timer, this._timerWhen] = [null, when];
    if (when === null) return;
    this._timer = this._env.setTimeout(() => {
      this._timer = this._timerWhen = null;
      s.handleTimer(Math.max(this._env.clock(), when)); // a timer may fire a hair early (ms rounding)
      this._afterIo();
    }, Math.ceil(Math.max(0, when - this._env.clock()) * 1000));
  }

  _onEvent(ev) {
    switch (ev.type) {
      case "reply": return this._settle(ev.id, null, ev.data);
      case "failed": return this._settle(ev.id, remoteError(ev.code, ev.message, ev.details));
      case "dropped": return this._settle(ev.id, new MessageDropped(`${ev.kind} ${ev.id} evicted from the full outbox`));
      case "timeout":
        return this._settle(ev.id, ev.kind === "request" || READS.has(ev.kind) ? new AckTimeout(`no reply to ${ev.kind} ${ev.id} in time`)
          : new MessageExpired(`${ev.kind} ${ev.id} expired before the server acknowledged it (if it was sent, it may have been processed)`));
      case "delivery": return this._deliver(ev.frame);
      case "gap":
        this._env.logger.warn?.(`rtchat: gap in ${ev.gap.stream} (${ev.gap.reason}): carrying on after ${ev.gap.epoch}:${ev.gap.offset}`);
        for (const fn of this._callbacks.gap) this._dispatch(() => fn(ev.gap));
        return;
      case "welcome":
        this._welcomedHere = true;
        this._triedFresh = false; // a later refusal may try a fresh token again
        this._setState("connected");
        return this._welcomeSettle.resolve();
      case "refused":
        if (ev.fatal) this._fatal ??= new FATAL_REFUSALS[ev.code](ev.code, ev.message);
        else this._retryAfter = ev.retryAfter; // e.g. overloaded: come back later
        return;
      case "notice":
        if (ev.retryAfter !== null) this._retryAfter = ev.retryAfter; // e.g. shutting_down
        return this._report(remoteError(ev.code, ev.message));
      case "rtt": return this._rttWaiters.splice(0).forEach((w) => w.resolve(ev.seconds));
      case "violation": return this._report(new ProtocolError(ev.message));
      case "dead":
        this._env.logger.warn?.(`rtchat: connection declared dead: ${ev.reason}`);
        return this._live?.abort(ev.reason);
    }
  }

  _settle(id, error, data) {
    const waiter = this._pending.get(id);
    if (!waiter) return;
    this._pending.delete(id);
    if (error) waiter.reject(error);
    else waiter.resolve(data);
  }

  _deliver(f) {
    const ns = f.ns ?? "/", handlers = [...(this._handlers.get(roomKey(ns, f.event)) ?? []), ...(this._handlers.get(roomKey(ns, "*")) ?? [])];
    const meta = { event: f.event, ns, room: f.room ?? null, sender: f.sender ?? null, stream: f.stream, epoch: f.epoch, offset: f.offset };
    for (const fn of handlers) this._dispatch(() => fn(f.data ?? null, meta));
  }

  /** App callbacks run one after another, in order; one that returns a promise holds those after
   * it until it settles, as the Python client's dispatcher does. Nothing waiting: they run at once. */
  _dispatch(job) {
    this._jobs.push(job);
    if (!this._dispatching) this._runJobs();
  }

  async _runJobs() {
    this._dispatching = true;
    while (this._jobs.length) {
      try {
        const result = this._jobs.shift()();
        if (typeof result?.then === "function") await result;
      } catch (error) {
        this._report(error, "a handler raised");
      }
    }
    this._dispatching = false;
  }

  _report(error, what = "rtchat") {
    if (!this._callbacks.error.length) return this._env.logger.warn?.(`rtchat: ${what}: ${error}`);
    this._each("error", error);
  }

  _each(kind, ...args) {
    for (const fn of [...this._callbacks[kind]]) {
      try { fn(...args); } catch (e) { this._env.logger.error?.(`rtchat: a ${kind} callback raised`, e); }
    }
  }

  _setState(state) {
    if (state !== this._state) this._state = state, this._each("state", state);
  }

  /** Fail everything still waiting, once, and settle into "closed". */
  _finish(reason) {
    if (this._finished) return;
    this._finished = this._closing = true;
    this.closedReason = reason;
    this._session.close();
    this._env.clearTimeout(this._timer);
    for (const waiter of [...this._pending.values(), ...this._rttWaiters.splice(0)]) waiter.reject(reason);
    this._pending.clear();
    this._welcomeSettle?.reject(reason);
    for (const done of this._flushWaiters.splice(0)) done();
    this._setState("closed");
  }

  async _run() {
    try {
      await this._loop();
    } catch (error) { // a bug of ours: say it, and stop rather than spin
      this._finish(error instanceof RTChatError ? error : new ConnectionFailed(String(error), { cause: error }));
    }
  }

  /** Dial, serve, back off, dial again: until closed, refused for good, or out of attempts. */
  async _loop() {
    const policy = this.reconnect, env = this._env;
    let delays = backoffDelays(policy, env.random), failures = 0, failingSince = null, index = 0, attempt = 0, everWelcomed = false;
    while (!this._closing) {
      const url = this.urls[index % this.urls.length];
      this._setState(everWelcomed ? "reconnecting" : "connecting");
      this._each("attempt", ++attempt, url);
      const started = env.clock();
      const error = (await this._takeToken()) ?? (await this._connectOnce(url));
      if (this._closing) return;
      if (this._welcomedHere) {
        everWelcomed = true;
        attempt = 0;
        if (env.clock() - started >= policy.stableAfter) [delays, failures, failingSince] = [backoffDelays(policy, env.random), 0, null];
      } else this._failedAttempts++;
      if (this._fatal instanceof Unauthorized && (await this._freshTokenAfterRefusal())) continue;
      if (this._fatal) return this._finish(this._fatal);
      if ((!everWelcomed && !this.retryFirstConnect) || !policy.enabled) return this._finish(error);
      failures++;
      failingSince ??= started;
      const elapsed = env.clock() - failingSince;
      if ((policy.maxAttempts != null && failures >= policy.maxAttempts) || (policy.maxElapsed != null && elapsed >= policy.maxElapsed)) {
        return this._finish(new GaveUp(`gave up after ${failures} attempt(s) over ${elapsed.toFixed(1)}s: ${error.message}`));
      }
      if (!this._welcomedHere) index++; // this URL failed: the next one
      // A server's retry_after is waited out and our jitter added, so that everyone it
      // sent away does not come back in the same instant.
      // Credentials that expired (4008) are renewed at once: nothing is wrong with the server.
      const delay = this._expired ? 0 : delays.next().value + (this._retryAfter ?? 0);
      this._expired = false;
      this._retryAfter = null;
      env.logger.warn?.(`rtchat: ${this._welcomedHere ? "connection lost" : "connection attempt failed"}: ${error.message}; retrying in ${delay.toFixed(2)}s`);
      if (delay > 0) {
        await new Promise((resolve) => {
          const timer = env.setTimeout(resolve, delay * 1000);
          this._wake = () => (env.clearTimeout(timer), resolve());
        });
        this._wake = null;
      }
    }
  }

  /** Before a dial: the token callable's token into the hello (null), or why it failed. */
  async _takeToken() {
    if (!this._token) return null;
    let token = this._freshToken;
    this._freshToken = undefined;
    if (token === undefined) {
      try {
        token = await this._token();
      } catch (error) {
        return new ConnectionFailed(`the token callable failed: ${error?.message ?? error}`, { cause: error });
      }
    }
    if (typeof token !== "string") return new ConnectionFailed(`the token callable returned ${typeof token}, not a string`);
    this._session.auth = { ...this._authBase, token };
    return null;
  }

  /** After a 4001: a token callable is asked once more; a different token is tried once, at once. */
  async _freshTokenAfterRefusal() {
    if (!this._token || this._triedFresh) return false;
    this._triedFresh = true;
    let token;
    try {
      token = await this._token();
    } catch {
      return false;
    }
    if (typeof token !== "string" || token === this._session.auth?.token) return false;
    this._freshToken = token;
    this._fatal = null;
    return true;
  }

  /** One connection, from its dial to its end; resolves with why it ended. A WebSocket first
   * (when allowed); if it cannot be opened, HTTP long polling to the same URL at once. */
  async _connectOnce(url) {
    this._welcomedHere = false;
    const env = this._env, s = this._session;
    let wsWhy = null;
    if (this.transports.includes("websocket") && env.WebSocket) {
      const ws = (this._transport = new WebSocketTransport(url, env, this.connectTimeout));
      try {
        await ws.open();
        return this._serve(ws, false);
      } catch (error) {
        wsWhy = error?.message ?? String(error);
      }
      this._transport = null;
      if (!this.transports.includes("polling") || this._closing) return new ConnectionFailed(`cannot connect to ${url}: ${wsWhy}`);
      // A page cannot tell a refused upgrade from a refused connection: HTTP is tried either way.
      env.logger.warn?.(`rtchat: no WebSocket to ${url} (${wsWhy}): trying HTTP long polling`);
    }
    const target = pollingUrl(url);
    const poll = (this._transport = new PollingTransport(target, env, this.connectTimeout, () => [s.pollMaxFrames, s.maxFrameBytes, s.pollTimeout]));
    s.connectionMade(env.clock());
    try {
      await poll.open(s.dataToSend());
    } catch (error) {
      poll.abort("open failed");
      this._transport = null;
      if (!this._closing) s.connectionLost(env.clock()), this._afterIo();
      const why = `cannot open a polling connection to ${target}: ${error.message}`;
      return new ConnectionFailed(wsWhy ? `cannot connect to ${url}: ${wsWhy}; ${why}` : why);
    }
    return this._serve(poll, true);
  }

  /** Feed one open transport to the session until it ends; resolves with why it ended. */
  async _serve(transport, helloSent) {
    const env = this._env, s = this._session;
    this._live = transport;
    transport.onData = (data) => {
      if (this._live !== transport || this._finished) return;
      s.receive(data, env.clock());
      this._afterIo();
    };
    if (!helloSent) s.connectionMade(env.clock());
    this._afterIo();
    if (transport.kind === "polling") transport.start();
    const end = await transport.ended;
    this._live = this._transport = null;
    this._fatal ??= closeError(end.code, end.reason);
    this._expired = end.code === 4008; // TOKEN_EXPIRED: reconnect at once with a fresh token
    if (!this._closing) {
      s.connectionLost(env.clock());
      this._afterIo();
      // Said at once, not after the backoff wait: a page should not show "connected" while offline.
      if (this._welcomedHere && !this._fatal && this.reconnect.enabled) this._setState("reconnecting");
    }
    return new ConnectionFailed(end.why);
  }
}
