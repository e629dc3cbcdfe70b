"""A persistent outbox on SQLite: what a client queued survives a process kill.

``SqliteOutbox(path)`` is an ``Outbox`` whose changes are written through to
one SQLite file, so a client process killed (even with SIGKILL) and started
again on the same file resends, under its old session, everything that was
still unacknowledged; the server's dedupe turns the resends into exactly one
effect each. Reads (``len``, iteration, ``ids``, ``get``, ``bytes``,
``fits``) are served from an in-memory mirror; only changes touch the file.

What the file holds, and why:

* every unacknowledged entry (id, kind, encoded frame, expiry), committed
  before ``add`` returns, so nothing reaches the wire that is not on disk;
* ``next_id``, the next message id, committed in the same transaction as the
  entry that uses the previous one: after a restart ids are never reused,
  even when the outbox is empty (a reused id would be taken by the server's
  dedupe for the already processed message it once named: silent loss);
* the session id and resume token, the rooms joined, and each stream's last
  position, so the new process resumes the old session instead of starting
  a new one.

Durability: the file is in WAL mode with ``synchronous=NORMAL``. A commit is
in the operating system's hands when it returns, so it survives the crash or
kill of the process; it is fsynced only at checkpoints, so a power loss or an
operating-system crash may lose the last transactions (the file stays
consistent, it rolls back to an earlier commit) -- and with them ids already
sent, which new messages would then reuse. It guards against process
crashes, not against power loss.

One file per client: the connection holds an exclusive lock on the file
(``PRAGMA locking_mode=EXCLUSIVE``) from opening to ``close()``, so a second
``SqliteOutbox`` on the same file, in this process or another one, raises
``OutboxInUse`` instead of corrupting the first one's state. The lock is an
advisory POSIX lock: it is released by the kernel when a process dies, and it
is not reliable on network file systems, so keep the file on a local disk.

The exactly-once effect of a resend needs the server to still hold the
session (``session_ttl`` after the connection dropped): a client restarted
later gets a new session without dedupe records, and a message the old one
had processed runs again. docs/reliability-outbox.md says more.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from .errors import BufferFull, RTChatError
from .outbox import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_MESSAGES,
    HandledPosition,
    Outbox,
    OutboxEntry,
    OverflowPolicy,
    SavedState,
)

__all__ = [
    "SCHEMA_VERSION",
    "OutboxFileError",
    "OutboxInUse",
    "OutboxStorageError",
    "SqliteOutbox",
]

log = logging.getLogger("rtchat_sdk")

SCHEMA_VERSION = 1
"""Stored in ``PRAGMA user_version``; a file with a higher one is refused."""

APPLICATION_ID = int.from_bytes(b"rtob", "big")
"""Stored in ``PRAGMA application_id``: marks the file as an rtchat outbox."""

_SCHEMA = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
CREATE TABLE entries (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    expires_wall REAL
);
CREATE TABLE streams (
    name TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    ns TEXT NOT NULL,
    room TEXT
) WITHOUT ROWID;
CREATE TABLE rooms (
    ns TEXT NOT NULL,
    room TEXT NOT NULL,
    stream TEXT NOT NULL,
    PRIMARY KEY (ns, room)
) WITHOUT ROWID;
"""


class OutboxStorageError(RTChatError):
    """The outbox file cannot be read or written (I/O error, disk full, closed)."""


class OutboxFileError(OutboxStorageError, ValueError):
    """The file is not an rtchat outbox, is damaged, or has a newer schema.

    A ``ValueError`` too: the path given does not name a usable outbox. Nothing
    in the file is changed; move it aside or point the client at another path.
    """


class OutboxInUse(OutboxStorageError):
    """Another live ``SqliteOutbox`` (in this process or another) holds the file.

    Two clients sharing one outbox would send each other's messages under
    each other's session; the exclusive lock refuses the second one instead.
    """


class SqliteOutbox(Outbox):
    """An ``Outbox`` written through to a SQLite file; see the module docstring.

    ``max_messages``, ``max_bytes`` and ``policy`` behave as in ``Outbox``.
    Entries restored from the file are all kept even if they exceed lower
    limits given now (nothing persisted is dropped silently); new messages
    then meet the policy until acknowledgements free room.

    ``clock`` must be the clock the client passes to its session as ``now``
    (``Client``'s ``clock``, ``time.monotonic`` by default): expiries are on
    that clock in memory and stored as wall-clock time, so an expiry keeps its
    wall-clock deadline across a restart (an entry whose deadline passed
    while no process ran expires as soon as the new session looks at it).

    Use from one thread at a time (the client's event loop thread); it may be
    created and closed in another. Call ``close()`` (or use ``with``) when the
    client is done: ``Client.close()`` does not close its outbox.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        policy: OverflowPolicy | str = OverflowPolicy.RAISE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(max_messages=max_messages, max_bytes=max_bytes, policy=policy)
        self.path = os.fspath(path)
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        db = sqlite3.connect(
            self.path,
            timeout=0,  # a held lock means another owner: fail at once, don't wait
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # SyncClient creates it in one thread, uses it in another
        )
        try:
            self._open(db)
        except BaseException:
            db.close()
            raise
        self._db = db

    # ------------------------------------------------------------------
    # Opening

    def _open(self, db: sqlite3.Connection) -> None:
        try:
            # Before the first read, so the lock taken by that read is kept.
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            app_id, version = _header(db)
        except sqlite3.OperationalError as exc:
            if _busy(exc):
                raise OutboxInUse(
                    f"{self.path} is in use by another SqliteOutbox (one file per client)"
                ) from exc
            raise OutboxFileError(f"cannot open {self.path} as an rtchat outbox: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise OutboxFileError(f"{self.path} is not an rtchat outbox: {exc}") from exc
        fresh = app_id == 0 and version == 0 and _table_count(db) == 0
        if not fresh:
            if app_id != APPLICATION_ID:
                raise OutboxFileError(
                    f"{self.path} is a SQLite file but not an rtchat outbox "
                    f"(application_id {app_id:#x})"
                )
            if version > SCHEMA_VERSION:
                raise OutboxFileError(
                    f"{self.path} has outbox schema version {version}, newer than this "
                    f"rtchat supports ({SCHEMA_VERSION}); upgrade rtchat to read it"
                )
            if version < 1:
                raise OutboxFileError(f"{self.path}: damaged outbox (schema version {version})")
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            with _transaction(db):  # the write also takes the exclusive lock for good
                if fresh:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('opened_at', ?)",
                    (time.time(),),
                )
            rows = db.execute(
                "SELECT id, kind, text, expires_wall FROM entries ORDER BY id"
            ).fetchall()
        except sqlite3.OperationalError as exc:
            if _busy(exc):
                raise OutboxInUse(
                    f"{self.path} is in use by another SqliteOutbox (one file per client)"
                ) from exc
            raise OutboxFileError(f"damaged rtchat outbox {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise OutboxFileError(f"damaged rtchat outbox {self.path}: {exc}") from exc
        offset = self._wall_offset()
        for message_id, kind, text, expires_wall in rows:
            expires_at = None if expires_wall is None else expires_wall - offset
            entry = OutboxEntry(message_id, kind, text, expires_at)
            self._entries[message_id] = entry
            self._bytes += entry.size

    def _wall_offset(self) -> float:
        """wall-clock time minus the session clock, now."""
        return time.time() - self._clock()

    # ------------------------------------------------------------------
    # Entries

    def add(self, entry: OutboxEntry) -> list[OutboxEntry]:
        """Queue ``entry``, committed to the file before returning; see ``Outbox.add``.

        The entry, the evictions made for it (drop_oldest) and the new
        ``next_id`` are one transaction: after a crash either all are in the
        file or none is (and then the message was never sent either).
        """
        self.check_size(entry.size)
        evicted = self._to_evict(entry.size)
        expires_wall = None if entry.expires_at is None else entry.expires_at + self._wall_offset()
        db = self._conn()
        try:
            with _transaction(db):
                if evicted:
                    db.executemany("DELETE FROM entries WHERE id = ?", [(e.id,) for e in evicted])
                db.execute(
                    "INSERT INTO entries(id, kind, text, expires_wall) VALUES (?, ?, ?, ?)",
                    (entry.id, entry.kind, entry.text, expires_wall),
                )
                db.execute(
                    "INSERT INTO meta(key, value) VALUES ('next_id', ?) ON CONFLICT(key) "
                    "DO UPDATE SET value = max(value, excluded.value)",
                    (entry.id + 1,),
                )
        except sqlite3.Error as exc:
            raise OutboxStorageError(f"cannot queue message {entry.id}: {exc}") from exc
        for e in evicted:
            del self._entries[e.id]
            self._bytes -= e.size
        self._entries[entry.id] = entry
        self._bytes += entry.size
        return evicted

    def _to_evict(self, size: int) -> list[OutboxEntry]:
        """The oldest entries to drop so ``size`` fits, or BufferFull (as Outbox)."""
        if self.fits(size):
            return []
        if self.policy is not OverflowPolicy.DROP_OLDEST:
            raise BufferFull(
                f"outbox full ({len(self._entries)}/{self.max_messages} messages, "
                f"{self._bytes}/{self.max_bytes} bytes)"
            )
        evicted: list[OutboxEntry] = []
        count, used = len(self._entries), self._bytes
        for oldest in self._entries.values():
            if count < self.max_messages and used + size <= self.max_bytes:
                break
            evicted.append(oldest)
            count -= 1
            used -= oldest.size
        return evicted

    def remove(self, message_id: int) -> OutboxEntry | None:
        """Forget an entry, in memory and in the file.

        If the file cannot be written, the entry is still forgotten here and
        the failure is logged: the stale row only means one resend after a
        restart, which the server's dedupe answers with the stored reply.
        """
        entry = super().remove(message_id)
        if entry is not None:
            try:
                self._conn().execute("DELETE FROM entries WHERE id = ?", (message_id,))
            except (sqlite3.Error, OutboxStorageError) as exc:
                log.warning("outbox %s: cannot delete message %d: %s", self.path, message_id, exc)
        return entry

    # ------------------------------------------------------------------
    # Resume state

    def load_state(self) -> SavedState | None:
        """The session, next id, streams and rooms saved in the file (None: fresh file)."""
        db = self._conn()
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            streams = {
                name: HandledPosition(epoch, offset, ns, room)
                for name, epoch, offset, ns, room in db.execute(
                    'SELECT name, epoch, "offset", ns, room FROM streams'
                )
            }
            rooms = {
                (ns, room): stream
                for ns, room, stream in db.execute("SELECT ns, room, stream FROM rooms")
            }
        except sqlite3.Error as exc:
            raise OutboxStorageError(f"cannot read outbox {self.path}: {exc}") from exc
        next_id = meta.get("next_id")
        session_id, token = meta.get("session_id"), meta.get("token")
        if next_id is None and session_id is None and token is None and not streams and not rooms:
            return None
        highest = max(self._entries, default=0)
        return SavedState(
            session_id=session_id,
            token=token,
            next_id=max(int(next_id or 1), highest + 1),
            streams=streams,
            rooms=rooms,
        )

    def save_session(
        self, session_id: str | None, token: str | None, rooms: dict[tuple[str, str], str]
    ) -> None:
        """Store the session to resume and its rooms, in one transaction."""
        db = self._conn()
        try:
            with _transaction(db):
                db.executemany(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                    [("session_id", session_id), ("token", token)],
                )
                db.execute("DELETE FROM rooms")
                db.executemany(
                    "INSERT INTO rooms(ns, room, stream) VALUES (?, ?, ?)",
                    [(ns, room, stream) for (ns, room), stream in rooms.items()],
                )
        except sqlite3.Error as exc:
            raise OutboxStorageError(f"cannot save the session in {self.path}: {exc}") from exc

    def save_stream(self, stream: str, position: HandledPosition | None) -> None:
        """Store (or forget) one stream's position."""
        db = self._conn()
        try:
            if position is None:
                db.execute("DELETE FROM streams WHERE name = ?", (stream,))
            else:
                db.execute(
                    'INSERT OR REPLACE INTO streams(name, epoch, "offset", ns, room) '
                    "VALUES (?, ?, ?, ?, ?)",
                    (stream, position.epoch, position.offset, position.ns, position.room),
                )
        except sqlite3.Error as exc:
            raise OutboxStorageError(f"cannot save stream {stream} in {self.path}: {exc}") from exc

    # ------------------------------------------------------------------
    # Life cycle

    @property
    def closed(self) -> bool:
        return self._db is None

    def close(self) -> None:
        """Checkpoint and close the file, releasing its lock (idempotent).

        Entries stay in the file for the next ``SqliteOutbox`` on it; reads of
        this object keep working, changes raise ``OutboxStorageError``.
        """
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def __enter__(self) -> SqliteOutbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxStorageError(f"outbox {self.path} is closed")
        return self._db


def _header(db: sqlite3.Connection) -> tuple[int, int]:
    app_id = db.execute("PRAGMA application_id").fetchone()[0]
    version = db.execute("PRAGMA user_version").fetchone()[0]
    return int(app_id), int(version)


def _table_count(db: sqlite3.Connection) -> int:
    row: Any = db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    return int(row[0])


def _busy(exc: sqlite3.OperationalError) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith("SQLITE_BUSY") or name.startswith("SQLITE_LOCKED")


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with suppress(sqlite3.Error):  # keep the original error
                db.execute("ROLLBACK")
        raise
