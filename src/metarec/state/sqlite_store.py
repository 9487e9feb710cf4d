"""The embedded user-state store: one SQLite file shared by the worker processes of one node.

TorchServe runs each worker as its own process, so the file is the only shared memory: WAL mode lets
readers run beside the one writer, every write is a ``BEGIN IMMEDIATE`` transaction (it takes the
write lock before reading, so read-modify-write cannot interleave) and a busy timeout makes a
contending process wait instead of failing. A serving batch's appends (``append_many``) and state
writes (``put_states``) each take one transaction, so a batch pays for one lock and one commit.

Retention: each user row keeps the time of the user's last write (``updated_at``). With ``ttl_s``, a
user whose last write is ``ttl_s`` old or older reads as absent at once, a write to them starts afresh
(as after Redis expired their keys), and the expired rows are deleted by the writes themselves (at
most :data:`PRUNE_BATCH` users per :data:`PRUNE_INTERVAL_S` per process, in the write's transaction)
and by :meth:`SqliteStateStore.prune` (``metarec state prune``). A file written before ``updated_at``
existed gets the column when first opened, its users stamped with that time (a full retention from
the upgrade, not deleted at once), and an ``incarnation`` column, NULL for the users it holds (records
written before incarnations, read as ``PREDATES_INCARNATIONS``: a state write to them is not checked
against a token until their next append gives them one).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from metarec.state.store import (
    DEFAULT_WINDOW,
    PREDATES_INCARNATIONS,
    Rating,
    StateEntry,
    StoredUser,
    StoreUnavailableError,
    UserStateStore,
    check_ratings,
    latest_per_item,
    new_incarnation,
    state_entry,
)

_BUSY_TIMEOUT_MS = 30_000
# Result codes of a passing condition (the extended codes share these prefixes, e.g. SQLITE_IOERR_WRITE):
# locked beyond the busy timeout, out of disk or memory, an unreadable or unwritable file.
_PASSING = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_NOMEM", "SQLITE_IOERR", "SQLITE_CANTOPEN",
            "SQLITE_READONLY", "SQLITE_PROTOCOL")  # fmt: skip
_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL DEFAULT 0,
    blob BLOB,
    blob_version INTEGER NOT NULL DEFAULT -1,
    updated_at REAL,
    incarnation TEXT
);
CREATE TABLE IF NOT EXISTS ratings (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    rating REAL NOT NULL,
    timestamp REAL
);
CREATE INDEX IF NOT EXISTS ratings_by_user ON ratings (user_id, seq);
"""
# Expired users deleted by one write at most (bounds the time a write holds the lock), and how often a
# process's writes look for them; a full batch looks again at the next write.
PRUNE_BATCH = 100
PRUNE_INTERVAL_S = 60.0
# A user is live when never stamped (a row written by a version without retention) or written after the
# cutoff (now - ttl_s); with no retention the cutoff is NULL and every user is live.
_LIVE = "(? IS NULL OR updated_at IS NULL OR updated_at > ?)"


def _reachable(method):
    """Runs a store method, turning SQLite's errors of a passing condition into
    :class:`StoreUnavailableError` (the transaction was rolled back: nothing was written)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as error:
            if (getattr(error, "sqlite_errorname", None) or "").startswith(_PASSING):
                raise StoreUnavailableError(str(self.path), error) from error
            raise

    return wrapper


class SqliteStateStore(UserStateStore):
    """:class:`UserStateStore` on one SQLite file (created if missing).

    Each thread and each process gets its own connection (SQLite connections must not cross a fork).

    Args:
        path: The database file.
        window: Most items whose (latest) ratings are kept per user.
        ttl_s: Retention: seconds a user is kept after their last write (None: forever).
        clock: Seconds since the epoch, now (tests pass a controllable one).
    """

    def __init__(
        self,
        path: str | Path,
        window: int = DEFAULT_WINDOW,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ):
        super().__init__(window, ttl_s)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._next_prune = 0.0  # clock time of this process's next amortised prune
        self._local = threading.local()
        connection = self._connection()
        connection.executescript(_SCHEMA)
        _add_write_times(connection, clock())

    def _connection(self) -> sqlite3.Connection:
        owner = getattr(self._local, "pid", None)
        if owner != os.getpid():
            connection = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            _use_wal(connection)
            connection.execute("PRAGMA synchronous = NORMAL")  # durable across process crashes in WAL mode
            self._local.connection, self._local.pid = connection, os.getpid()
        return self._local.connection

    def append(self, user_id: str, ratings: list[Rating]) -> StoredUser:
        return self.append_many([(user_id, ratings)])[0]

    @_reachable
    def append_many(self, entries: Sequence[tuple[str, list[Rating]]]) -> list[StoredUser]:
        # One write transaction for the whole batch: each append is as atomic as on its own, and
        # the batch pays for one lock and one commit.
        for _, ratings in entries:
            check_ratings(ratings)
        if not entries:
            return []
        connection = self._connection()
        with _immediate(connection):
            now = self.clock()
            appended = [self._append(connection, user_id, ratings, now) for user_id, ratings in entries]
            self._prune_some(connection, now)
            return appended

    def _append(
        self, connection: sqlite3.Connection, user_id: str, ratings: list[Rating], now: float
    ) -> StoredUser:
        latest = latest_per_item(ratings)
        self._drop_if_expired(connection, user_id, now)
        fresh = new_incarnation()  # kept only when this append creates the user (as Redis's HSETNX)
        connection.execute(
            "INSERT OR IGNORE INTO users (user_id, incarnation) VALUES (?, ?)", (user_id, fresh)
        )
        # The user's earlier ratings of these items go first: the window keeps one rating per item.
        connection.executemany(
            "DELETE FROM ratings WHERE user_id = ? AND item_id = ?", [(user_id, r.item_id) for r in latest]
        )
        connection.executemany(
            "INSERT INTO ratings (user_id, item_id, rating, timestamp) VALUES (?, ?, ?, ?)",
            [(user_id, r.item_id, float(r.rating), r.timestamp) for r in latest],
        )
        connection.execute(
            "UPDATE users SET version = version + 1, updated_at = ?, "
            "incarnation = COALESCE(incarnation, ?) WHERE user_id = ?",
            (now, fresh, user_id),
        )
        connection.execute(
            "DELETE FROM ratings WHERE user_id = ? AND seq NOT IN "
            "(SELECT seq FROM ratings WHERE user_id = ? ORDER BY seq DESC LIMIT ?)",
            (user_id, user_id, self.window),
        )
        return self._read(connection, user_id, now)

    @_reachable
    def get(self, user_id: str) -> StoredUser | None:
        connection = self._connection()
        # One read transaction, so the window and the version belong together.
        with _deferred(connection):
            return self._read(connection, user_id, self.clock())

    def put_state(self, user_id: str, blob: bytes, version: int, incarnation: str | None = None) -> bool:
        return self.put_states([(user_id, blob, version, incarnation)])[0]

    @_reachable
    def put_states(self, entries: Sequence[StateEntry]) -> list[bool]:
        if not entries:
            return []
        connection = self._connection()
        stored = []
        with _immediate(connection):
            now = self.clock()
            for entry in entries:
                user_id, blob, version, incarnation = state_entry(entry)
                self._drop_if_expired(connection, user_id, now)
                # A state of no feedback (history, or none) creates the user, unless it was read from a
                # record of them (an incarnation): that record is gone, deleted or expired.
                if int(version) <= 0 and incarnation is None:
                    connection.execute(
                        "INSERT OR IGNORE INTO users (user_id, incarnation) VALUES (?, ?)",
                        (user_id, new_incarnation()),
                    )
                # Only over an older state, only from ratings still held (version <= the user's), and
                # only into the record it was read from (or one written before incarnations).
                cursor = connection.execute(
                    "UPDATE users SET blob = ?, blob_version = ?, updated_at = ? "
                    "WHERE user_id = ? AND blob_version <= ? AND version >= ? "
                    "AND (? IS NULL OR incarnation IS NULL OR incarnation = ?)",
                    (sqlite3.Binary(blob), int(version), now, user_id, int(version), int(version),
                     incarnation, incarnation),
                )  # fmt: skip
                stored.append(cursor.rowcount == 1)
            self._prune_some(connection, now)
        return stored

    @_reachable
    def delete(self, user_id: str) -> bool:
        connection = self._connection()
        with _immediate(connection):
            cutoff = self._cutoff(self.clock())
            held = connection.execute(
                f"SELECT 1 FROM users WHERE user_id = ? AND {_LIVE}", (user_id, cutoff, cutoff)
            ).fetchone()
            connection.execute("DELETE FROM ratings WHERE user_id = ?", (user_id,))
            connection.execute("DELETE FROM users WHERE user_id = ?", (user_id,))
        return held is not None

    @_reachable
    def prune(self) -> int:
        if self.ttl_s is None:
            return 0
        connection = self._connection()
        deleted = 0
        while True:  # in batches, each its own transaction, so serving writes get the lock in between
            with _immediate(connection):
                count = self._prune_batch(connection, self.clock(), 1000)
            deleted += count
            if count < 1000:
                break
        with _immediate(connection):
            # Rows written without a time (by a version without retention): retention runs from now.
            connection.execute("UPDATE users SET updated_at = ? WHERE updated_at IS NULL", (self.clock(),))
        return deleted

    def _cutoff(self, now: float) -> float | None:
        """Users last written at or before this time are expired (None: no retention)."""
        return None if self.ttl_s is None else now - self.ttl_s

    def _drop_if_expired(self, connection: sqlite3.Connection, user_id: str, now: float) -> None:
        """Deletes the user's rows when they are expired, so a write starts afresh (as on Redis)."""
        if self.ttl_s is None:
            return
        cutoff = now - self.ttl_s
        cursor = connection.execute(
            "DELETE FROM users WHERE user_id = ? AND updated_at <= ?", (user_id, cutoff)
        )
        if cursor.rowcount:
            connection.execute("DELETE FROM ratings WHERE user_id = ?", (user_id,))

    def _prune_some(self, connection: sqlite3.Connection, now: float) -> None:
        """The writes' amortised prune: a bounded batch of expired users, at most once per interval."""
        if self.ttl_s is None or now < self._next_prune:
            return
        full = self._prune_batch(connection, now, PRUNE_BATCH) == PRUNE_BATCH
        self._next_prune = now if full else now + min(PRUNE_INTERVAL_S, self.ttl_s)

    def _prune_batch(self, connection: sqlite3.Connection, now: float, limit: int) -> int:
        """Deletes up to ``limit`` expired users (in the caller's transaction); returns how many."""
        cutoff = now - self.ttl_s
        users = [
            (row[0],)
            for row in connection.execute(
                "SELECT user_id FROM users WHERE updated_at <= ? LIMIT ?", (cutoff, limit)
            )
        ]
        connection.executemany("DELETE FROM ratings WHERE user_id = ?", users)
        connection.executemany("DELETE FROM users WHERE user_id = ?", users)
        return len(users)

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None and self._local.pid == os.getpid():
            connection.close()
        self._local = threading.local()

    def _read(self, connection: sqlite3.Connection, user_id: str, now: float) -> StoredUser | None:
        cutoff = self._cutoff(now)
        row = connection.execute(
            f"SELECT version, blob, blob_version, incarnation FROM users WHERE user_id = ? AND {_LIVE}",
            (user_id, cutoff, cutoff),
        ).fetchone()
        if row is None:
            return None
        rows = connection.execute(
            "SELECT item_id, rating, timestamp FROM ratings WHERE user_id = ? ORDER BY seq", (user_id,)
        ).fetchall()
        return StoredUser(
            ratings=[Rating(item_id, rating, timestamp) for item_id, rating, timestamp in rows],
            version=int(row[0]),
            blob=None if row[1] is None else bytes(row[1]),
            blob_version=int(row[2]),
            incarnation=PREDATES_INCARNATIONS if row[3] is None else row[3],
        )


def _add_write_times(connection: sqlite3.Connection, now: float) -> None:
    """Gives a file written before retention existed its ``updated_at`` column (once, under the write
    lock, so workers opening it together add it once), stamping its users with ``now``; then the index
    the prunes look expired users up by. Also adds the ``incarnation`` column to a file written before
    it existed (NULL for its users: records that predate incarnations)."""
    if not _has_column(connection, "users", "updated_at"):
        with _immediate(connection):
            if not _has_column(connection, "users", "updated_at"):  # another process may have added it
                connection.execute("ALTER TABLE users ADD COLUMN updated_at REAL")
                connection.execute("UPDATE users SET updated_at = ?", (now,))
    if not _has_column(connection, "users", "incarnation"):
        with _immediate(connection):
            if not _has_column(connection, "users", "incarnation"):  # likewise
                connection.execute("ALTER TABLE users ADD COLUMN incarnation TEXT")
    connection.execute("CREATE INDEX IF NOT EXISTS users_by_write ON users (updated_at)")


def _has_column(connection: sqlite3.Connection, table: str, column: str) -> bool:
    return any(row[1] == column for row in connection.execute(f"PRAGMA table_info({table})"))


def _use_wal(connection: sqlite3.Connection) -> None:
    """Switches the file to WAL (a no-op once it is). The switch takes a lock that SQLite does not wait
    for, even with a busy timeout: when TorchServe's workers open a new file together, all but one got
    "database is locked" and died at start up. So wait here, up to the busy timeout."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if getattr(error, "sqlite_errorname", None) != "SQLITE_BUSY" or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class _Transaction:
    """``with`` block around one SQLite transaction: commit on success, roll back on error."""

    def __init__(self, connection: sqlite3.Connection, begin: str):
        self.connection, self.begin = connection, begin

    def __enter__(self) -> sqlite3.Connection:
        self.connection.execute(self.begin)
        return self.connection

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            try:
                self.connection.execute("COMMIT")
                return
            except sqlite3.Error:
                self._rollback()  # after a failed COMMIT (e.g. SQLITE_BUSY) SQLite keeps the transaction open
                raise
        self._rollback()

    def _rollback(self) -> None:
        if self.connection.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # the error being raised says more than this one
                self.connection.execute("ROLLBACK")


def _immediate(connection: sqlite3.Connection) -> _Transaction:
    return _Transaction(connection, "BEGIN IMMEDIATE")


def _deferred(connection: sqlite3.Connection) -> _Transaction:
    return _Transaction(connection, "BEGIN")
