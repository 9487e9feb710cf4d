"""The embedded user-state store: one SQLite file shared by the worker processes of one node.

TorchServe runs each worker as its own process, so the file is the only shared memory: WAL mode lets
readers run beside the one writer, every write is a ``BEGIN IMMEDIATE`` transaction (it takes the
write lock before reading, so read-modify-write cannot interleave) and a busy timeout makes a
contending process wait instead of failing. A serving batch's appends (``append_many``) and state
writes (``put_states``) each take one transaction, so a batch pays for one lock and one commit.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from metarec.state.store import (
    DEFAULT_WINDOW,
    Rating,
    StoredUser,
    StoreUnavailableError,
    UserStateStore,
    check_ratings,
    latest_per_item,
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
    blob_version INTEGER NOT NULL DEFAULT -1
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
    """

    def __init__(self, path: str | Path, window: int = DEFAULT_WINDOW):
        super().__init__(window)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connection().executescript(_SCHEMA)

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
            return [self._append(connection, user_id, ratings) for user_id, ratings in entries]

    def _append(self, connection: sqlite3.Connection, user_id: str, ratings: list[Rating]) -> StoredUser:
        latest = latest_per_item(ratings)
        connection.execute("INSERT OR IGNORE INTO users (user_id) VALUES (?)", (user_id,))
        # The user's earlier ratings of these items go first: the window keeps one rating per item.
        connection.executemany(
            "DELETE FROM ratings WHERE user_id = ? AND item_id = ?", [(user_id, r.item_id) for r in latest]
        )
        connection.executemany(
            "INSERT INTO ratings (user_id, item_id, rating, timestamp) VALUES (?, ?, ?, ?)",
            [(user_id, r.item_id, float(r.rating), r.timestamp) for r in latest],
        )
        connection.execute("UPDATE users SET version = version + 1 WHERE user_id = ?", (user_id,))
        connection.execute(
            "DELETE FROM ratings WHERE user_id = ? AND seq NOT IN "
            "(SELECT seq FROM ratings WHERE user_id = ? ORDER BY seq DESC LIMIT ?)",
            (user_id, user_id, self.window),
        )
        return self._read(connection, user_id)

    @_reachable
    def get(self, user_id: str) -> StoredUser | None:
        connection = self._connection()
        # One read transaction, so the window and the version belong together.
        with _deferred(connection):
            return self._read(connection, user_id)

    def put_state(self, user_id: str, blob: bytes, version: int) -> bool:
        return self.put_states([(user_id, blob, version)])[0]

    @_reachable
    def put_states(self, entries: Sequence[tuple[str, bytes, int]]) -> list[bool]:
        if not entries:
            return []
        connection = self._connection()
        stored = []
        with _immediate(connection):
            for user_id, blob, version in entries:
                connection.execute("INSERT OR IGNORE INTO users (user_id) VALUES (?)", (user_id,))
                cursor = connection.execute(
                    "UPDATE users SET blob = ?, blob_version = ? WHERE user_id = ? AND blob_version <= ?",
                    (sqlite3.Binary(blob), int(version), user_id, int(version)),
                )
                stored.append(cursor.rowcount == 1)
        return stored

    @_reachable
    def delete(self, user_id: str) -> None:
        connection = self._connection()
        with _immediate(connection):
            connection.execute("DELETE FROM ratings WHERE user_id = ?", (user_id,))
            connection.execute("DELETE FROM users WHERE user_id = ?", (user_id,))

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None and self._local.pid == os.getpid():
            connection.close()
        self._local = threading.local()

    def _read(self, connection: sqlite3.Connection, user_id: str) -> StoredUser | None:
        row = connection.execute(
            "SELECT version, blob, blob_version FROM users WHERE user_id = ?", (user_id,)
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
        )


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
