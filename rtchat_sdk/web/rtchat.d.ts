// Types for rtchat.js, the rtchat browser client (docs/browser.md). Times are seconds.

export declare const PROTOCOL_VERSION: 1;

/** "idle" before connect(), "connecting" until the first welcome, "reconnecting" once a connection was lost. */
export type ConnectionState = "idle" | "connecting" | "connected" | "reconnecting" | "closed";
export type TransportName = "websocket" | "polling";

/** A position in a stream: the last entry handled. */
export interface StreamPosition {
  stream: string;
  epoch: string;
  offset: number;
}

/** A position in a stream the call names otherwise: where a history read or a join starts. */
export interface Since {
  epoch: string;
  offset: number;
}

/** One session in a room (PROTOCOL §7.5). */
export interface PresenceMember {
  session: string;
  /** The user the server's authenticator named, or null. */
  user: string | null;
  /** The hello.client of its connection, or null. */
  client: string | null;
  /** When it joined the room: Unix time, seconds. */
  joined_at: number;
}

/** The data of a `$join` / `$leave` delivery (onJoin, onLeave). */
export interface PresenceChange extends PresenceMember {
  /** `$leave` only: how it left. */
  reason?: "left" | "closed" | "disconnected" | "expired" | (string & {}) | null;
}

export interface PresenceStats {
  stream: string;
  /** Sessions in the room. */
  sessions: number;
  /** Distinct users among them (sessions without a user not counted). */
  users: number;
}

/** A delivery as the server sends it: the entries of a history page. */
export interface MessageFrame {
  type: "message";
  stream: string;
  epoch: string;
  offset: number;
  ns: string;
  room: string | null;
  event: string;
  data: any;
  sender: string | null;
}

/** A page of a room stream's kept entries (PROTOCOL §7.6). */
export interface History {
  stream: string;
  /** The stream's epoch and newest offset when read. */
  epoch: string;
  offset: number;
  /** Why the page does not start where asked: the entries are gone, or `since` was of another epoch. */
  gap: "trimmed" | "epoch_changed" | (string & {}) | null;
  /** More kept entries lie beyond the page in its direction. */
  more: boolean;
  /** Oldest first; newest first with `reverse`. */
  entries: MessageFrame[];
  /** `{epoch, offset}`: pass it as join's `since` to go on live, missing nothing. */
  position: Since;
}

export interface HistoryOptions {
  /** Forward: the entries after it; reverse: those before it. Default: from the oldest (newest) kept. */
  since?: Since | null;
  /** 1 to 10 000 (default 100). */
  limit?: number;
  /** Newest first (default false). */
  reverse?: boolean;
  /** Seconds until AckTimeout (default: the client's requestTimeout). */
  timeout?: number | null;
}

/** Where a delivery came from: the second argument of every handler. */
export interface Delivery {
  event: string;
  ns: string;
  /** The room, or null for a direct message to this session's inbox. */
  room: string | null;
  /** The publisher's session id, or null when the server itself published. */
  sender: string | null;
  stream: string;
  epoch: string;
  offset: number;
}

/** Entries of a stream up to (epoch, offset) will never be delivered to this client. */
export interface Gap {
  stream: string;
  ns: string;
  room: string | null;
  epoch: string;
  offset: number;
  reason: "trimmed" | "epoch_changed" | "not_rejoined" | "session_unknown" | (string & {});
}

export interface ReconnectPolicy {
  /** Upper bound of the first wait (default 0.5). */
  initialDelay?: number;
  /** Cap on any wait's upper bound (default 30). */
  maxDelay?: number;
  /** Growth of the bound per failed attempt (default 2). */
  multiplier?: number;
  /** Give up after this many failed attempts in a row (default: never). */
  maxAttempts?: number | null;
  /** Give up after failing for this long (default: never). */
  maxElapsed?: number | null;
  /** A connection up this long resets the backoff (default 10). */
  stableAfter?: number;
  /** false: a lost connection closes the client (default true). */
  enabled?: boolean;
}

export interface OutboxOptions {
  /** Default 10 000. */
  maxMessages?: number;
  /** Default 16 MiB (UTF-8 bytes of the encoded frames). */
  maxBytes?: number;
  /** At the bound: refuse the new message (BufferFull) or evict the oldest (MessageDropped). */
  overflow?: "raise" | "drop_oldest";
}

export interface Logger {
  warn?(...args: unknown[]): void;
  error?(...args: unknown[]): void;
}

/** Anything `new WebSocket(url)` works with (the browser's, Node's, a fake). */
export interface WebSocketLike {
  binaryType: string;
  readyState: number;
  onopen: ((event: unknown) => void) | null;
  onclose: ((event: { code: number; reason?: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  onmessage: ((event: { data: string | ArrayBuffer }) => void) | null;
  send(text: string): void;
  close(code?: number, reason?: string): void;
}

export interface FetchResponseLike {
  status: number;
  text(): Promise<string>;
}

export interface ClientOptions {
  /** What to dial, in order (default ["websocket", "polling"]). */
  transports?: TransportName[];
  /** Sent as hello.auth, checked by the server's authenticator. */
  auth?: Record<string, unknown> | null;
  /** Goes in the hello as auth.token. A function is called before every dial (a fresh
   * token each time); after a 4001 it is asked once more, and a different token tried once. */
  token?: string | (() => string | Promise<string>);
  /** Sent as hello.client (default "rtchat-js"). */
  name?: string;
  /** What relative URLs resolve against (default: the page's location.href). */
  base?: string;
  /** Default timeout of request() (default 30). */
  requestTimeout?: number;
  /** Limit for opening a WebSocket, an opening POST, and the welcome (default 10). */
  connectTimeout?: number;
  /** Messages written but not answered (default 1000; the server's, if lower, wins). */
  maxInFlight?: number;
  /** false (default): the first connect() rejects if it fails; true: retries with the policy. */
  retryFirstConnect?: boolean;
  reconnect?: ReconnectPolicy;
  outbox?: OutboxOptions;
  /** Injected for tests or other runtimes. */
  WebSocket?: new (url: string) => WebSocketLike;
  fetch?: (url: string, init: { method: string; headers?: Record<string, string>; body?: string; signal: AbortSignal }) => Promise<FetchResponseLike>;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (id: unknown) => void;
  /** Seconds on any monotonic origin (default performance.now() / 1000). */
  clock?: () => number;
  /** Uniform in [0, 1) (default Math.random): backoff jitter and ping spread. */
  random?: () => number;
  /** Default console. */
  logger?: Logger;
}

export interface Counters {
  sent: number;
  resent: number;
  retried: number;
  duplicatesDropped: number;
  gaps: number;
  timedOut: number;
  dropped: number;
  connections: number;
  reconnects: number;
  failedAttempts: number;
  outboxSize: number;
}

export type Handler = (data: any, meta: Delivery) => unknown;
export type PresenceHandler = (data: PresenceChange, meta: Delivery) => unknown;
export type Unsubscribe = () => void;

/** The messaging API bound to one namespace. */
export declare class Namespace {
  readonly path: string;
  /** `since`: follow the room stream from there (the entries after it are delivered first). */
  join(room: string, options?: { since?: Since | null }): Promise<StreamPosition>;
  leave(room: string): Promise<void>;
  /** Resolves with the entry's offset in the room stream, once acknowledged. */
  publish(room: string, event: string, data?: unknown, options?: { echo?: boolean; expiresIn?: number | null }): Promise<number>;
  emit(event: string, data?: unknown, options?: { expiresIn?: number | null }): Promise<void>;
  request<T = any>(event: string, data?: unknown, options?: { timeout?: number | null }): Promise<T>;
  /** Rejects with NotEnabled where the namespace keeps no presence. */
  presence(room: string, options?: { timeout?: number | null }): Promise<PresenceMember[]>;
  presenceStats(room: string, options?: { timeout?: number | null }): Promise<PresenceStats>;
  history(room: string, options?: HistoryOptions): Promise<History>;
  /** "*" matches every event of the namespace. */
  on(event: string, handler: Handler): Unsubscribe;
  off(event: string, handler: Handler): void;
  /** The `$join` deliveries (a namespace with presence events on); same as on("$join", handler). */
  onJoin(handler: PresenceHandler): Unsubscribe;
  /** The `$leave` deliveries; same as on("$leave", handler). */
  onLeave(handler: PresenceHandler): Unsubscribe;
}

export declare class Client extends Namespace {
  /** `url`: ws(s)://, http(s)://, or relative to the page; or several, tried in turn. */
  constructor(url: string | URL | Array<string | URL>, options?: ClientOptions);
  readonly urls: string[];
  readonly transports: TransportName[];
  requestTimeout: number;
  readonly connectTimeout: number;
  readonly reconnect: Required<ReconnectPolicy>;
  readonly state: ConnectionState;
  readonly transport: TransportName | null;
  readonly sessionId: string | null;
  readonly rtt: number | null;
  readonly outboxSize: number;
  readonly counters: Counters;
  readonly closedReason: RTChatError | null;
  connect(): Promise<void>;
  close(): Promise<void>;
  ping(): Promise<number>;
  flush(timeout?: number | null): Promise<void>;
  namespace(path: string): Namespace;
  onStateChange(fn: (state: ConnectionState) => unknown): Unsubscribe;
  onGap(fn: (gap: Gap) => unknown): Unsubscribe;
  onError(fn: (error: unknown) => unknown): Unsubscribe;
  onAttempt(fn: (attempt: number, url: string) => unknown): Unsubscribe;
}

export declare class RTChatError extends Error {}
export declare class ProtocolError extends RTChatError {}
export declare class InvalidState extends RTChatError {}
export declare class ConnectionFailed extends RTChatError {}
export declare class FatalConnectionError extends ConnectionFailed {
  constructor(code: string, message: string);
  readonly code: string;
}
export declare class Unauthorized extends FatalConnectionError {}
export declare class IncompatibleProtocol extends FatalConnectionError {}
export declare class SessionReplaced extends FatalConnectionError {}
export declare class GaveUp extends ConnectionFailed {}
export declare class ConnectionLost extends RTChatError {}
export declare class ClientClosed extends RTChatError {}
export declare class AckTimeout extends RTChatError {}
export declare class BufferFull extends RTChatError {}
export declare class MessageDropped extends RTChatError {}
export declare class MessageExpired extends RTChatError {}
export declare class MessageTooLarge extends RTChatError {}
export declare class ValidationFailed extends RTChatError {}
export declare class RemoteError extends RTChatError {
  constructor(code: string, message: string, details?: unknown);
  readonly code: string;
  readonly details: unknown;
}
export declare class UnknownEvent extends RemoteError {}
export declare class UnknownNamespace extends RemoteError {}
export declare class HandlerError extends RemoteError {}
export declare class InvalidFrame extends RemoteError {}
export declare class Forbidden extends RemoteError {}
export declare class NotEnabled extends RemoteError {}

export declare function remoteError(code: string, message: string, details?: unknown): RemoteError;
export declare function resolveUrl(url: string | URL, base?: string): string;
export declare function pollingUrl(wsUrl: string): string;
export declare function roomStream(ns: string, room: string): string;
export declare function utf8Length(text: string): number;
export declare function backoffDelays(policy?: ReconnectPolicy, random?: () => number): Generator<number, never, unknown>;
export declare function closeError(code: number | null, reason: string): FatalConnectionError | null;

/** The sans-I/O core (for tests and other drivers). */
export declare class Session {
  constructor(options?: {
    auth?: Record<string, unknown> | null; name?: string; maxInFlight?: number; handshakeTimeout?: number;
    maxOutbox?: number; maxOutboxBytes?: number; overflow?: "raise" | "drop_oldest"; random?: () => number;
  });
  state: "idle" | "connecting" | "reconnecting" | "connected" | "closed";
  sessionId: string | null;
  token: string | null;
  rtt: number | null;
  maxFrameBytes: number;
  pollMaxFrames: number;
  /** Seconds the server holds a poll (welcome.limits.poll_timeout); a poll is lost 10 s after. */
  pollTimeout: number;
  readonly streams: Map<string, { epoch: string; offset: number; ns: string; room: string | null }>;
  readonly counters: Omit<Counters, "reconnects" | "failedAttempts" | "outboxSize">;
  readonly outboxSize: number;
  readonly lastReply: number;
  dataToSend(): string[];
  takeEvents(): Array<{ type: string; [key: string]: unknown }>;
  connectionMade(now: number): void;
  connectionLost(now: number): void;
  close(): void;
  ping(now: number): void;
  queue(kind: "emit" | "request" | "join" | "leave" | "publish" | "presence" | "presence_stats" | "history", ns: string,
    fields: { room?: string; event?: string; data?: unknown; echo?: boolean; since?: Since | null; limit?: number; reverse?: boolean },
    now: number, expiresIn?: number | null): number;
  receive(data: string | unknown[] | Record<string, unknown>, now: number): void;
  timer(): number | null;
  handleTimer(now: number): void;
}
