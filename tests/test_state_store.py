"""Contract tests of the user-state stores: the same tests run on SQLite and on a real Redis server."""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import redis_server

from metarec.state import Rating, StoreUnavailableError
from metarec.state.open import open_store
from metarec.state.store import MAX_TTL_S, PREDATES_INCARNATIONS

redis_url = redis_server.redis_url

WINDOW = 500


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path) -> str:
    """A URL naming an empty store of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.sqlite'}"
    url = request.getfixturevalue("redis_url")
    store = open_store(url)
    store.client.flushdb()
    store.close()
    return url


@pytest.fixture
def store(store_url):
    opened = open_store(store_url, window=WINDOW)
    yield opened
    opened.close()


def ratings(*pairs) -> list[Rating]:
    return [Rating(str(item), float(value), 1000.0 + n) for n, (item, value) in enumerate(pairs)]


def test_unknown_user_has_no_state(store):
    assert store.get("nobody") is None


def test_append_returns_window_and_bumps_version(store):
    first = store.append("u1", ratings((1, 4), (2, 3)))
    assert first.version == 1
    assert [(r.item_id, r.rating) for r in first.ratings] == [("1", 4.0), ("2", 3.0)]
    assert first.ratings[0].timestamp == 1000.0
    second = store.append("u1", [Rating("3", 5.0)])
    assert second.version == 2
    assert [r.item_id for r in second.ratings] == ["1", "2", "3"]
    assert second.ratings[-1].timestamp is None
    assert store.get("u1").ratings == second.ratings


def test_window_keeps_the_newest_ratings(store_url):
    small = open_store(store_url, window=3)
    try:
        for item in range(5):
            state = small.append("u1", [Rating(str(item), 3.0)])
        assert [r.item_id for r in state.ratings] == ["2", "3", "4"]
        assert state.version == 5
    finally:
        small.close()


def test_a_rerating_replaces_the_earlier_rating_of_the_item_and_moves_it_last(store):
    store.append("u1", ratings((1, 4), (2, 3), (3, 5)))
    state = store.append("u1", ratings((1, 2)))
    assert [(r.item_id, r.rating) for r in state.ratings] == [("2", 3.0), ("3", 5.0), ("1", 2.0)]
    assert state.version == 2 and store.get("u1").ratings == state.ratings
    # Within one append, the last rating of an item wins, at the place of that last rating.
    state = store.append("u1", ratings((4, 1), (2, 5), (4, 2)))
    assert [(r.item_id, r.rating) for r in state.ratings] == [("3", 5.0), ("1", 2.0), ("2", 5.0), ("4", 2.0)]
    assert state.version == 3


def test_the_window_holds_distinct_items_so_a_retried_append_pushes_nothing_out(store_url):
    """window 5: [a, b, c], [d, e], then [d, e] again (a client retrying a feedback whose reply was
    lost): all five items stay (a window of raw ratings dropped a and b)."""
    small = open_store(store_url, window=5)
    try:
        small.append("u1", ratings(("a", 4), ("b", 4), ("c", 4)))
        small.append("u1", ratings(("d", 2), ("e", 2)))
        state = small.append("u1", ratings(("d", 2), ("e", 2)))
        assert [r.item_id for r in state.ratings] == ["a", "b", "c", "d", "e"] and state.version == 3
        # Many re-ratings of two items keep the other items' ratings.
        for n in range(20):
            state = small.append("u1", ratings(("d", 1 + n % 5), ("e", 5 - n % 5)))
        assert [r.item_id for r in state.ratings] == ["a", "b", "c", "d", "e"] and state.version == 23
        # A full window drops the item rated longest ago.
        state = small.append("u1", ratings(("f", 3)))
        assert [r.item_id for r in state.ratings] == ["b", "c", "d", "e", "f"]
    finally:
        small.close()


def test_items_are_told_apart_by_their_whole_id(store):
    """Ids that are prefixes of one another, or hold quotes, commas and backslashes, are different items."""
    odd = ["1", "12", "1,", 'a"b', 'a"', "a\\", '"', "é", " 1"]
    state = store.append("u1", [Rating(item, 3.0) for item in odd])
    assert [r.item_id for r in state.ratings] == odd
    for item in odd:
        state = store.append("u1", [Rating(item, 5.0)])
        assert [r.item_id for r in state.ratings][-1] == item and len(state.ratings) == len(odd)
    assert [r.item_id for r in state.ratings] == odd and {r.rating for r in state.ratings} == {5.0}


def test_users_are_independent(store):
    store.append("a", ratings((1, 1)))
    store.append("b", ratings((2, 2), (3, 3)))
    assert [r.item_id for r in store.get("a").ratings] == ["1"]
    assert store.get("b").version == 1


def test_state_is_stored_only_over_one_of_the_same_or_an_older_version(store):
    state = store.append("u1", ratings((1, 4)))
    assert not state.fresh
    assert store.put_state("u1", b"state-v1", state.version)
    assert store.get("u1").fresh and store.get("u1").blob == b"state-v1"
    # A slow writer that computed from older ratings does not overwrite.
    assert not store.put_state("u1", b"stale", state.version - 1)
    assert store.get("u1").blob == b"state-v1"
    # The same version replaces it: a reader that could not use the stored state (another model's)
    # recomputed it from the same ratings.
    assert store.put_state("u1", b"recomputed-v1", state.version)
    assert store.get("u1").blob == b"recomputed-v1" and store.get("u1").fresh
    newer = store.append("u1", ratings((2, 5)))
    assert not newer.fresh and newer.blob == b"recomputed-v1"
    assert store.put_state("u1", b"\x00binary\xff", newer.version)
    got = store.get("u1")
    assert got.fresh and got.blob == b"\x00binary\xff" and got.blob_version == 2


def test_state_without_ratings(store):
    """adapt with a new user_id may store a state before any feedback."""
    assert store.put_state("u9", b"blob", 0)
    got = store.get("u9")
    assert got.ratings == [] and got.version == 0 and got.fresh


def test_non_finite_rating_stores_nothing(store):
    with pytest.raises(ValueError, match=r"ratings\[1\].rating must be finite"):
        store.append("u1", [Rating("1", 3.0), Rating("2", float("nan"))])
    assert store.get("u1") is None


def test_delete_forgets_the_user(store):
    store.append("u1", ratings((1, 4)))
    store.put_state("u1", b"x", 1)
    store.append("u2", ratings((1, 4)))
    store.delete("u1")
    assert store.get("u1") is None
    # Everything of it is gone, not only what get reads first: a user coming back starts afresh.
    again = store.append("u1", ratings((2, 5)))
    assert [r.item_id for r in again.ratings] == ["2"] and again.version == 1
    assert again.blob is None and not again.fresh
    assert [r.item_id for r in store.get("u2").ratings] == ["1"]  # other users are kept


def test_delete_says_whether_the_store_held_the_user(store):
    """``forget`` answers ``deleted``: True only when something was erased."""
    assert store.delete("nobody") is False
    store.append("u1", ratings((1, 4)))
    store.append("u2", ratings((2, 4)))
    assert store.delete("u1") is True
    assert store.get("u1") is None and store.delete("u1") is False
    assert [r.item_id for r in store.get("u2").ratings] == ["2"]  # other users untouched
    # A user known only by a stored state (adapt of a history user) is erased too.
    assert store.put_state("h1", b"blob", 0) and store.delete("h1") is True and store.get("h1") is None


def test_a_state_computed_from_deleted_ratings_is_never_stored(store):
    """A re-adaptation in flight while the user is forgotten lands after the delete: its state holds
    what the deleted ratings taught, so it is refused, and the user stays absent."""
    adapted_from = store.append("u1", ratings((1, 4), (2, 5))).version
    store.delete("u1")
    assert store.put_state("u1", b"from-deleted-ratings", adapted_from) is False
    assert store.put_states([("u1", b"again", adapted_from)]) == [False]
    assert store.get("u1") is None
    # A state of no feedback (a history user's) is still stored for an absent user.
    assert store.put_state("u1", b"history-only", 0) and store.get("u1").fresh
    # Nor is a state of more ratings than the user has stored.
    assert store.append("u2", ratings((1, 4))).version == 1
    assert store.put_state("u2", b"ahead", 2) is False and store.get("u2").blob is None


def test_a_state_of_forgotten_ratings_is_refused_after_the_user_comes_back(store):
    """forget racing feedback: a re-adaptation of the old ratings (version 1) in flight while the user
    is forgotten and sends new feedback (version 1 again) must not be stored over the new user, who
    would then be served what the erased ratings taught (the state reads as fresh: same version)."""
    read = store.append("u1", ratings((1, 5)))
    store.delete("u1")
    again = store.append("u1", ratings((2, 1)))
    # Versions count feedback, so they restart; the record's incarnation tells the two apart.
    assert again.version == read.version == 1
    assert read.incarnation and again.incarnation and again.incarnation != read.incarnation
    assert store.put_state("u1", b"from-forgotten-ratings", read.version, read.incarnation) is False
    assert store.put_states([("u1", b"batched", read.version, read.incarnation)]) == [False]
    assert store.get("u1").blob is None
    # A state of no feedback read from the forgotten record (features it kept) neither.
    history = store.put_state("h1", b"history-v0", 0)
    held = store.get("h1")
    assert history and held.incarnation
    store.delete("h1")
    assert store.put_state("h1", b"kept-features", 0, held.incarnation) is False
    assert store.get("h1") is None  # and the refused write did not bring the user back


def test_a_state_of_the_current_incarnation_is_stored(store):
    """The check refuses only another record's states: the reader's own is stored as before, and a
    user keeps their incarnation across appends and state writes."""
    first = store.append("u1", ratings((1, 5)))
    assert store.put_state("u1", b"state-v1", first.version, first.incarnation)
    second = store.append("u1", ratings((2, 4)))
    assert second.incarnation == first.incarnation and second.version == 2
    assert store.put_states([("u1", b"state-v2", 2, second.incarnation), ("u2", b"new", 0)]) == [True, True]
    got = store.get("u1")
    assert got.fresh and got.blob == b"state-v2" and got.incarnation == first.incarnation
    # A state of no feedback creates the user with an incarnation, which the next append keeps.
    created = store.get("u2")
    assert created.incarnation and store.append("u2", ratings((1, 3))).incarnation == created.incarnation
    # The older rules still apply with the incarnation given.
    assert store.put_state("u1", b"stale", 1, first.incarnation) is False
    assert store.put_state("u1", b"ahead", 3, first.incarnation) is False


def forget_incarnation(store, user_id: str) -> None:
    """Makes the user's record one written before incarnations existed."""
    if hasattr(store, "client"):  # Redis
        store.client.hdel(store._keys(user_id)[1], "incarnation")
    else:
        import sqlite3

        with sqlite3.connect(store.path) as connection:
            connection.execute("UPDATE users SET incarnation = NULL WHERE user_id = ?", (user_id,))


def test_a_record_written_before_incarnations_accepts_states(store):
    """An upgraded store's users have no incarnation: their states are stored under the version rules
    (whatever incarnation the writer names), and their next append gives them one."""
    store.append("u1", ratings((1, 5)))
    forget_incarnation(store, "u1")
    legacy = store.get("u1")
    assert legacy.incarnation == PREDATES_INCARNATIONS and legacy.version == 1
    assert store.put_state("u1", b"unchecked", 1)
    assert store.put_state("u1", b"any-incarnation", 1, "0" * 32)
    assert store.get("u1").blob == b"any-incarnation"
    assert store.put_state("u1", b"ahead", 2, "0" * 32) is False
    given = store.append("u1", ratings((2, 4))).incarnation
    assert given and store.get("u1").incarnation == given
    assert store.put_state("u1", b"other", 2, "0" * 32) is False


def test_a_state_read_from_a_record_before_incarnations_is_refused_after_the_user_comes_back(store):
    """The forget race of a user whose record predates incarnations: the state computed from it names
    no token of its own, yet once the user is forgotten and comes back with as many ratings (a new record,
    same version) it must not be stored over them."""
    store.append("u1", ratings((1, 5)))
    forget_incarnation(store, "u1")
    read = store.get("u1")
    assert read.incarnation == PREDATES_INCARNATIONS
    assert store.delete("u1")
    store.append("u1", ratings((2, 1)))  # version 1 again, a new record
    assert store.put_state("u1", b"from-forgotten-ratings", read.version, read.incarnation) is False
    assert store.get("u1").blob is None
    # While the record still predates incarnations, a state read from it is stored as before.
    store.append("u2", ratings((1, 5)))
    forget_incarnation(store, "u2")
    read = store.get("u2")
    assert store.put_state("u2", b"kept", read.version, read.incarnation)
    assert store.get("u2").blob == b"kept"


class FakeClock:
    """A clock the test moves (the SQLite store reads it; Redis keeps its own time)."""

    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def aging(store_url):
    """``(open_with_ttl(ttl_s), advance(seconds))``: SQLite on a fake clock that ``advance`` moves,
    Redis on its own clock (``advance`` sleeps, so tests keep their times short)."""
    import time

    from metarec.state.sqlite_store import SqliteStateStore

    opened = []
    if store_url.startswith("sqlite"):
        clock = FakeClock()

        def open_with_ttl(ttl_s):
            opened.append(SqliteStateStore(store_url[len("sqlite:///") :], WINDOW, ttl_s, clock=clock))
            return opened[-1]

        def advance(seconds):
            clock.now += seconds

    else:

        def open_with_ttl(ttl_s):
            opened.append(open_store(store_url, WINDOW, ttl_s=ttl_s))
            return opened[-1]

        advance = time.sleep
    yield open_with_ttl, advance
    for store in opened:
        store.close()


def test_users_expire_a_ttl_after_their_last_write(aging):
    """Retention: every write (append or state) restarts the user's clock; an expired user reads as
    absent, cannot be deleted again, gets no late state, and a new append starts them afresh."""
    open_with_ttl, advance = aging
    store = open_with_ttl(0.4)
    assert store.append("u1", ratings((1, 4), (2, 3))).version == 1
    assert store.put_state("u1", b"state", 1)
    store.append("u2", ratings((3, 5)))
    advance(0.25)
    assert store.put_state("u1", b"recomputed", 1)  # a write: u1's clock restarts, u2's does not
    advance(0.25)
    kept = store.get("u1")  # 0.25 s after its last write
    assert kept is not None and kept.fresh and kept.blob == b"recomputed"
    assert [r.item_id for r in kept.ratings] == ["1", "2"]
    assert store.get("u2") is None  # 0.5 s after its last write
    assert store.delete("u2") is False
    advance(0.45)
    assert store.get("u1") is None
    assert store.put_state("u1", b"late", 1) is False and store.get("u1") is None
    again = store.append("u1", ratings((9, 1)))
    assert again.version == 1 and [r.item_id for r in again.ratings] == ["9"] and again.blob is None


def test_retention_must_be_a_non_negative_number(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    for bad in (-1, float("inf"), float("nan"), "90d", True):
        with pytest.raises(ValueError, match="retention"):
            open_store(url, ttl_s=bad)
    assert open_store(url, ttl_s=0).ttl_s is None  # 0: forever
    # The bound is MAX_TTL_S itself, not some larger number a setting could still slip under.
    with pytest.raises(ValueError, match="at most"):
        open_store(url, ttl_s=MAX_TTL_S + 1)


def test_a_retention_redis_cannot_expire_by_is_refused_at_open(redis_url, tmp_path):
    """A retention past what PEXPIRE takes (milliseconds from now within a signed 64-bit time) must be
    refused when the store opens: accepted, it made every Redis write fail ("value is not an integer or
    out of range"), every feedback a 500. The bound is the same for SQLite, so a setting moves between
    stores; the largest accepted retention still writes."""
    for url in (redis_url, f"sqlite:///{tmp_path / 's.db'}"):
        with pytest.raises(ValueError, match="retention"):
            open_store(url, ttl_s=10**16)
    store = open_store(redis_url, WINDOW, ttl_s=10**12)  # metarec.state.store.MAX_TTL_S
    try:
        assert store.append("far", ratings((1, 4))).version == 1
        assert store.put_state("far", b"s", 1) is True
    finally:
        store.delete("far")
        store.close()


def _rows(path) -> tuple[int, int]:
    import sqlite3

    with sqlite3.connect(path) as connection:
        return tuple(
            connection.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("users", "ratings")
        )


def test_sqlite_prune_deletes_expired_rows_and_writes_prune_amortised(tmp_path):
    """Expired users are skipped at once and their rows deleted by ``prune`` and by later writes (at
    most one batch per interval), so the file stops growing with every user who ever wrote."""
    from metarec.state import sqlite_store

    clock, path = FakeClock(), tmp_path / "s.db"
    store = sqlite_store.SqliteStateStore(path, WINDOW, ttl_s=3600, clock=clock)
    for n in range(5):
        store.append(f"old{n}", ratings((1, 4), (2, 5)))
    clock.now += 3600
    assert _rows(path) == (5, 10)
    assert store.prune() == 5 and _rows(path) == (0, 0)
    assert store.prune() == 0
    for n in range(sqlite_store.PRUNE_BATCH + 5):
        store.append(f"old{n}", ratings((1, 4)))
    clock.now += 3600 + sqlite_store.PRUNE_INTERVAL_S
    store.append("new", ratings((1, 4)))  # deletes one batch of expired users...
    assert _rows(path)[0] == 1 + 5
    store.put_state("new", b"x", 1)  # ...and the next write the rest (the batch was full)
    assert _rows(path) == (1, 1)
    store.close()


_OLD_SCHEMA = """
CREATE TABLE users (user_id TEXT PRIMARY KEY, version INTEGER NOT NULL DEFAULT 0, blob BLOB,
                    blob_version INTEGER NOT NULL DEFAULT -1);
CREATE TABLE ratings (seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, item_id TEXT NOT NULL,
                      rating REAL NOT NULL, timestamp REAL);
CREATE INDEX ratings_by_user ON ratings (user_id, seq);
INSERT INTO users VALUES ('u1', 2, X'0102', 2);
INSERT INTO ratings (user_id, item_id, rating, timestamp) VALUES ('u1', '7', 4.0, 10.0), ('u1', '8', 2.0, NULL);
"""


def test_a_sqlite_file_of_the_previous_schema_keeps_working(tmp_path):
    """A state file written before retention (no ``updated_at``): opened as is, its users kept and
    given a full retention from the upgrade, then expiring like any other."""
    import sqlite3

    from metarec.state.sqlite_store import SqliteStateStore

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as connection:
        connection.executescript(_OLD_SCHEMA)
    clock = FakeClock()
    store = SqliteStateStore(path, WINDOW, ttl_s=100, clock=clock)
    kept = store.get("u1")
    assert (kept.version, kept.blob, kept.fresh) == (2, b"\x01\x02", True)
    assert [(r.item_id, r.rating, r.timestamp) for r in kept.ratings] == [("7", 4.0, 10.0), ("8", 2.0, None)]
    assert store.append("u1", ratings((9, 5))).version == 3
    assert SqliteStateStore(path, WINDOW).get("u1").version == 3  # opened again: migrated once
    store.append("u2", ratings((1, 1)))
    clock.now += 100
    assert store.get("u1") is None and store.get("u2") is None
    store.close()
    # A migrated user nobody writes again expires a retention after the upgrade (stamped, not NULL).
    with sqlite3.connect(tmp_path / "idle.sqlite") as connection:
        connection.executescript(_OLD_SCHEMA)
    idle = SqliteStateStore(tmp_path / "idle.sqlite", WINDOW, ttl_s=100, clock=clock)
    assert idle.get("u1") is not None
    clock.now += 100
    assert idle.get("u1") is None and idle.prune() == 1
    idle.close()
    # Without retention the old file opens too, and nothing expires.
    with sqlite3.connect(tmp_path / "old2.sqlite") as connection:
        connection.executescript(_OLD_SCHEMA)
    assert SqliteStateStore(tmp_path / "old2.sqlite", WINDOW).get("u1").version == 2


def test_a_sqlite_file_written_before_incarnations_keeps_working(tmp_path):
    """A state file with retention but no ``incarnation`` column: opened as is (the column added once,
    NULL for its users), its users' states stored as before, and a user created since gets one."""
    import sqlite3

    from metarec.state.sqlite_store import SqliteStateStore

    path = tmp_path / "pre-incarnation.sqlite"
    with sqlite3.connect(path) as connection:
        connection.executescript(
            _OLD_SCHEMA.replace("blob_version INTEGER NOT NULL DEFAULT -1)", "blob_version INTEGER NOT NULL "
                                "DEFAULT -1, updated_at REAL)").replace("X'0102', 2)", "X'0102', 2, NULL)")
        )  # fmt: skip
    store = SqliteStateStore(path, WINDOW)
    kept = store.get("u1")
    assert (kept.version, kept.blob, kept.incarnation) == (2, b"\x01\x02", PREDATES_INCARNATIONS)
    assert store.put_state("u1", b"recomputed", 2, "0" * 32) and store.get("u1").blob == b"recomputed"
    reopened = SqliteStateStore(path, WINDOW)  # opened again: migrated once
    assert reopened.get("u1").incarnation == PREDATES_INCARNATIONS
    assert store.append("u2", ratings((1, 1))).incarnation
    store.close()


def test_redis_prune_gives_keys_without_a_ttl_the_retention(redis_url):
    """Keys written before retention was on never expire by themselves: prune gives them the TTL (both
    keys of a user alike); keys that have one keep it. A write without retention removes a TTL."""
    forever = open_store(redis_url, WINDOW)
    retained = open_store(redis_url, WINDOW, ttl_s=3600)
    try:
        forever.client.flushdb()
        forever.append("old", ratings((1, 4)))
        forever.put_state("old", b"x", 1)
        forever.put_state("state-only", b"y", 0)
        retained.append("new", ratings((1, 4)))
        client = retained.client
        assert client.pttl("metarec:{old}:ratings") == -1 and client.pttl("metarec:{old}:meta") == -1
        # Without retention there is nothing to give: keys without a TTL stay as they are (a PEXPIRE of
        # "no retention", 0 ms, would delete them).
        assert forever.prune() == 0 and forever.get("old").blob == b"x"
        assert client.pttl("metarec:{old}:ratings") == -1 and client.pttl("metarec:{old}:meta") == -1
        assert 3_590_000 < client.pttl("metarec:{new}:meta") <= 3_600_000
        assert retained.prune() == 2 and retained.prune() == 0
        for key in ("metarec:{old}:ratings", "metarec:{old}:meta", "metarec:{state-only}:meta"):
            assert 3_590_000 < client.pttl(key) <= 3_600_000, key
        assert forever.prune() == 0  # no retention: nothing to give
        forever.append("new", ratings((2, 4)))
        assert client.pttl("metarec:{new}:ratings") == -1 and client.pttl("metarec:{new}:meta") == -1
    finally:
        forever.close()
        retained.close()


def test_redis_prune_reaches_users_past_its_first_pipeline(redis_url):
    """prune sends its users in pipelines of 500: the users after the first pipeline get the TTL too."""
    forever = open_store(redis_url, WINDOW)
    retained = open_store(redis_url, WINDOW, ttl_s=3600)
    try:
        forever.client.flushdb()
        forever.append_many([(f"u{n:04d}", ratings((1, 4))) for n in range(501)])
        assert retained.prune() == 501
        assert 0 < retained.client.pttl("metarec:{u0500}:meta") <= 3_600_000  # the last one, sorted
    finally:
        forever.close()
        retained.close()


def test_redis_prune_finds_keys_of_a_prefix_with_glob_characters(redis_url):
    """prune looks keys up by a SCAN pattern made of the prefix: its glob characters are literal, so a
    prefix such as ``team[1]*`` finds its own keys (unescaped, the pattern matched none of them)."""
    from metarec.state.redis_store import RedisStateStore

    forever = RedisStateStore(redis_url, WINDOW, prefix="team[1]*")
    retained = RedisStateStore(redis_url, WINDOW, prefix="team[1]*", ttl_s=3600)
    try:
        forever.client.flushdb()
        forever.append("u1", ratings((1, 4)))
        assert retained.prune() == 1
        assert 0 < retained.client.pttl("team[1]*:{u1}:meta") <= 3_600_000
    finally:
        forever.close()
        retained.close()


def test_sqlite_prune_deletes_more_than_one_batch(tmp_path):
    """``prune`` deletes in transactions of 1000 users (serving writes get the lock in between) until
    none is left, not only the first batch."""
    from metarec.state.sqlite_store import SqliteStateStore

    clock, path = FakeClock(), tmp_path / "s.db"
    store = SqliteStateStore(path, WINDOW, ttl_s=3600, clock=clock)
    store.append_many([(f"u{n}", ratings((1, 4))) for n in range(1001)])
    clock.now += 3600
    assert store.prune() == 1001 and _rows(path) == (0, 0)
    store.close()


def test_sqlite_writes_prune_at_most_once_per_interval(tmp_path):
    """After a write's prune found less than a full batch, writes skip pruning for PRUNE_INTERVAL_S (a
    user expiring meanwhile reads as absent but keeps its row), then the next write deletes it."""
    from metarec.state import sqlite_store

    clock, path = FakeClock(), tmp_path / "s.db"
    store = sqlite_store.SqliteStateStore(path, WINDOW, ttl_s=3600, clock=clock)
    start = clock.now
    store.append("a", ratings((1, 4)))
    clock.now = start + 10
    store.append("c", ratings((1, 4)))  # expires at start + 3610
    clock.now = start + 3600
    store.append("b", ratings((1, 4)))  # prunes "a" (not a full batch): the next prune is 60 s away
    assert _rows(path)[0] == 2
    clock.now = start + 3600 + sqlite_store.PRUNE_INTERVAL_S / 2
    store.put_state("b", b"x", 1)
    assert store.get("c") is None and _rows(path)[0] == 2  # expired, not yet deleted
    clock.now = start + 3600 + sqlite_store.PRUNE_INTERVAL_S
    store.put_state("b", b"y", 1)
    assert _rows(path)[0] == 1
    store.close()


def test_sqlite_prune_gives_rows_without_a_write_time_the_retention(tmp_path):
    """A row with no ``updated_at`` (written by a version without retention) is live; prune stamps it,
    so it expires a retention later instead of never."""
    import sqlite3

    from metarec.state.sqlite_store import SqliteStateStore

    clock, path = FakeClock(), tmp_path / "s.db"
    store = SqliteStateStore(path, WINDOW, ttl_s=100, clock=clock)
    store.append("u1", ratings((1, 4)))
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE users SET updated_at = NULL")
    clock.now += 1000
    assert store.get("u1") is not None and store.prune() == 0
    clock.now += 100
    assert store.get("u1") is None and store.prune() == 1 and _rows(path) == (0, 0)
    store.close()


def test_a_second_connection_reads_what_the_first_wrote(store_url, store):
    store.append("u1", ratings((1, 4)))
    other = open_store(store_url, window=WINDOW)
    try:
        assert [r.item_id for r in other.get("u1").ratings] == ["1"]
    finally:
        other.close()


_CLIENT = textwrap.dedent(
    """
    import sys
    from metarec.state import Rating
    from metarec.state.open import open_store
    url, client, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = open_store(url, window=int(sys.argv[4]))
    for n in range(count):
        store.append("shared", [Rating(f"{client}-{n}", 1.0 + (n % 5), float(n))])
    store.close()
    """
)


def test_concurrent_appends_lose_nothing(store_url, store):
    """8 client processes x 50 single-rating appends to one user: all 400 stored, 400 versions."""
    clients, count = 8, 50
    processes = [
        subprocess.Popen([sys.executable, "-c", _CLIENT, store_url, str(c), str(count), str(WINDOW)])
        for c in range(clients)
    ]
    for process in processes:
        assert process.wait(timeout=120) == 0
    state = store.get("shared")
    assert state.version == clients * count
    assert sorted(r.item_id for r in state.ratings) == sorted(
        f"{c}-{n}" for c in range(clients) for n in range(count)
    )
    # Each client's own ratings keep their order.
    for c in range(clients):
        mine = [r.item_id for r in state.ratings if r.item_id.startswith(f"{c}-")]
        assert mine == [f"{c}-{n}" for n in range(count)]


def test_append_many_is_each_append_in_order(store):
    """A serving batch's appends: one state per entry, as if appended one after the other."""
    store.append("u1", ratings((1, 4)))
    states = store.append_many(
        [("u1", ratings((2, 3))), ("u2", ratings((3, 5))), ("u1", ratings((4, 1), (5, 2)))]
    )
    assert [(s.version, [r.item_id for r in s.ratings]) for s in states] == [
        (2, ["1", "2"]), (1, ["3"]), (3, ["1", "2", "4", "5"])
    ]  # fmt: skip
    assert store.get("u1").ratings == states[2].ratings
    # A later entry of the batch re-rates what an earlier one rated: one rating per item still.
    states = store.append_many([("u1", ratings((6, 4))), ("u1", ratings((2, 1), (6, 5)))])
    assert [(s.version, [r.item_id for r in s.ratings]) for s in states] == [
        (4, ["1", "2", "4", "5", "6"]), (5, ["1", "4", "5", "2", "6"])
    ]  # fmt: skip
    assert [r.rating for r in store.get("u1").ratings] == [4.0, 1.0, 2.0, 1.0, 5.0]
    assert store.append_many([]) == []


def test_append_many_checks_every_entry_before_writing(store):
    with pytest.raises(ValueError, match="must be finite"):
        store.append_many([("u1", ratings((1, 4))), ("u2", [Rating("2", float("inf"))])])
    assert store.get("u1") is None and store.get("u2") is None


def test_put_states_keeps_the_version_rule_per_entry(store):
    store.append_many([("u1", ratings((1, 4))), ("u2", ratings((2, 4)))])
    assert store.put_states([("u1", b"one", 1), ("u2", b"two", 1), ("u1", b"older", 0)]) == [
        True,
        True,
        False,
    ]
    assert store.get("u1").blob == b"one" and store.get("u2").fresh
    assert store.put_states([]) == []


def test_redis_batches_survive_a_server_that_lost_its_scripts(redis_url):
    """After a restart or SCRIPT FLUSH the pipelined calls get NOSCRIPT: each is run again, once."""
    store = open_store(redis_url, window=WINDOW)
    try:
        store.client.flushdb()
        store.append("u1", ratings((1, 4)))
        store.client.script_flush()
        states = store.append_many([("u1", ratings((2, 3))), ("u2", ratings((3, 5)))])
        assert [s.version for s in states] == [2, 1] and len(store.get("u1").ratings) == 2
        store.client.script_flush()
        assert store.put_states([("u1", b"a", 2), ("u2", b"b", 1)]) == [True, True]
        assert store.get("u1").fresh and store.get("u2").blob == b"b"
    finally:
        store.close()


def test_redis_batch_is_one_script_call_and_a_cluster_gets_one_call_per_user(redis_url):
    """A batch's appends and state writes are one script call each; a server that refuses keys of
    several hash slots in one call (a Redis Cluster: CROSSSLOT, before running anything) gets one call
    per user from then on, with the same results."""
    from redis.exceptions import ResponseError

    store = open_store(redis_url, window=WINDOW)
    calls = []

    class ClusterLike:
        """The registered script, refusing keys of several users as a Redis Cluster does."""

        def __init__(self, script):
            self.script, self.sha = script, script.sha

        def __call__(self, keys, args):
            calls.append(len(keys))
            if len({key.split(":")[1] for key in keys}) > 1:
                raise ResponseError("CROSSSLOT Keys in request don't hash to the same slot")
            return self.script(keys=keys, args=args)

    try:
        store.client.flushdb()
        store._append, store._put_state = ClusterLike(store._append), ClusterLike(store._put_state)
        states = store.append_many([("u1", ratings((1, 4))), ("u2", ratings((2, 5), (3, 1)))])
        assert [(s.version, len(s.ratings)) for s in states] == [(1, 1), (1, 2)]
        # Refused once, then one call per user (run again alone here: the server had no script yet).
        multi = [n for n in calls if n > 2]
        assert multi == [4] and store._per_entry
        assert store.put_states([("u1", b"a", 1), ("u2", b"b", 1), ("u1", b"old", 0)]) == [True, True, False]
        assert store.get("u1").blob == b"a" and store.get("u2").fresh
        assert [n for n in calls if n > 2] == multi  # no more calls over several users
        assert store.append_many([("u2", ratings((4, 2)))])[0].version == 2  # one user: one call
    finally:
        store.close()

    single = open_store(redis_url, window=WINDOW)
    try:
        single.client.flushdb()
        counted = []
        script = single._append
        single._append = lambda keys, args: counted.append(len(keys)) or script(keys=keys, args=args)
        single._append.sha = script.sha
        single.append_many([("u1", ratings((1, 4))), ("u2", ratings((2, 5))), ("u1", ratings((3, 2)))])
        assert counted == [6] and not single._per_entry
    finally:
        single.close()


def test_a_real_redis_cluster_gets_one_call_per_user(tmp_path):
    """Against a real cluster-mode redis-server (one node holding every slot), a batch over two users
    is refused with CROSSSLOT, which redis-py raises as ClusterCrossSlotError without the "CROSSSLOT"
    in its message: the fallback matched the text only, so every feedback batch of two users or more
    failed (an exception, not an answer) instead of going one call per user."""
    pytest.importorskip("redis")
    from metarec.state.local_redis import _free_port, stop_redis, wait_for_redis

    # The cluster bus port defaults to port + 10000, which fails above 55535: name a free one.
    port, bus = _free_port(), _free_port()
    process = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--cluster-enabled", "yes",
         "--cluster-port", str(bus),
         "--cluster-config-file", str(tmp_path / "nodes.conf"), "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--logfile", str(tmp_path / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    store = None
    try:
        try:
            wait_for_redis(process, port, tmp_path / "redis.log")
        except RuntimeError as error:
            log = (tmp_path / "redis.log").read_text() if (tmp_path / "redis.log").exists() else ""
            pytest.skip(f"cluster-mode redis-server did not start: {error}: {log[-300:]}")
        store = open_store(f"redis://127.0.0.1:{port}/0", window=WINDOW)
        store.client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        while store.client.execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") < 0:
            time.sleep(0.05)
        states = store.append_many([("u1", ratings((1, 4))), ("u2", ratings((2, 5), (3, 1)))])
        assert [(s.version, len(s.ratings)) for s in states] == [(1, 1), (1, 2)] and store._per_entry
        assert store.put_states([("u1", b"a", 1), ("u2", b"b", 1)]) == [True, True]
        assert store.get("u1").blob == b"a" and store.get("u2").fresh
    finally:
        if store is not None:
            store.close()
        stop_redis(process)


def test_concurrent_batched_appends_from_threads_lose_nothing(store_url, store):
    """8 threads x 50 ratings for one user, sent as batches of 5 appends (a worker's batch): all 400."""
    import concurrent.futures

    clients, count, batch = 8, 50, 5

    def client(c):
        mine = open_store(store_url, window=WINDOW)
        try:
            for start in range(0, count, batch):
                mine.append_many(
                    [("shared", [Rating(f"{c}-{n}", 1.0 + n % 5)]) for n in range(start, start + batch)]
                )
        finally:
            mine.close()

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    state = store.get("shared")
    assert state.version == clients * count
    assert sorted(r.item_id for r in state.ratings) == sorted(
        f"{c}-{n}" for c in range(clients) for n in range(count)
    )
    for c in range(clients):
        assert [r.item_id for r in state.ratings if r.item_id.startswith(f"{c}-")] == [
            f"{c}-{n}" for n in range(count)
        ]


def test_open_store_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown state store URL"):
        open_store("postgres://x")
    with pytest.raises(ValueError, match="positive integer"):
        open_store(f"sqlite:///{tmp_path / 's.db'}", window=0)


def _refuse_writes(store) -> None:
    """Makes the store refuse every write as an outage does: Redis out of memory, SQLite read-only."""
    if hasattr(store, "client"):
        store.client.config_set("maxmemory-policy", "noeviction")
        store.client.config_set("maxmemory", 1)
    else:
        store._connection().execute("PRAGMA query_only = ON")


def _allow_writes(store) -> None:
    if hasattr(store, "client"):
        store.client.config_set("maxmemory", 0)
    else:
        store._connection().execute("PRAGMA query_only = OFF")


def test_a_store_that_cannot_write_says_unavailable_and_keeps_what_it_had(store):
    """Out of memory (Redis) or unwritable (SQLite): every write raises StoreUnavailableError naming the
    store, nothing of it is kept, and writes work again once the store recovers."""
    before = store.append("u1", ratings((1, 4)))
    assert store.put_state("u1", b"state", before.version)
    _refuse_writes(store)
    try:
        for write in (
            lambda: store.append("u1", ratings((2, 5))),
            lambda: store.append_many([("u1", ratings((3, 5))), ("u2", ratings((3, 1)))]),
            lambda: store.put_states([("u1", b"newer", before.version)]),
        ):
            with pytest.raises(StoreUnavailableError, match="user-state store .* is unavailable") as caught:
                write()
            assert caught.value.where in str(caught.value)
    finally:
        _allow_writes(store)
    kept = store.get("u1")
    assert (kept.version, kept.blob, [r.item_id for r in kept.ratings]) == (1, b"state", ["1"])
    assert store.get("u2") is None
    assert store.append("u1", ratings((2, 5))).version == 2


def test_an_unreachable_redis_says_unavailable_without_its_password(tmp_path):
    """A refused connection is a StoreUnavailableError whose message names the server, not its password."""
    pytest.importorskip("redis")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = open_store(f"redis://:s3cret@127.0.0.1:{port}/0")
    for call in (lambda: store.get("u1"), lambda: store.append("u1", ratings((1, 4)))):
        with pytest.raises(StoreUnavailableError) as caught:
            call()
        message = str(caught.value)
        assert f"127.0.0.1:{port}" in message and "s3cret" not in message and "***" in message


def test_redis_timeouts_can_be_set_in_the_url():
    """The 5 s default socket timeouts give way to the URL's (docs/realtime.md: a tighter bound on a hang)."""
    pytest.importorskip("redis")
    options = open_store("redis://127.0.0.1:1/0?socket_timeout=0.5&socket_connect_timeout=0.25").client
    options = options.connection_pool.connection_kwargs
    assert (options["socket_timeout"], options["socket_connect_timeout"]) == (0.5, 0.25)
    default = open_store("redis://127.0.0.1:1/0").client.connection_pool.connection_kwargs
    assert (default["socket_timeout"], default["socket_connect_timeout"]) == (5.0, 5.0)


def _open_at_the_barrier(path, barrier, errors) -> None:
    from metarec.state.sqlite_store import SqliteStateStore

    barrier.wait()
    try:
        SqliteStateStore(path).close()
    except Exception as error:  # reported to the test, which names it
        errors.put(f"{type(error).__name__}: {error}")


def test_workers_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    """TorchServe starts its workers together, each opening the same new file: none may fail (switching
    a new file to WAL takes a lock SQLite does not wait for, which killed a worker at start up)."""
    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    for trial in range(12):
        barrier = context.Barrier(4, timeout=30)  # a process that never starts breaks it, not the test run
        processes = [
            context.Process(target=_open_at_the_barrier, args=(tmp_path / f"s{trial}.db", barrier, errors))
            for _ in range(4)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=60)
            assert process.exitcode == 0
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == []


def test_opening_a_new_sqlite_store_waits_for_a_lock_another_connection_holds(tmp_path):
    """The race above, made certain: another connection holds the new file's write lock for 0.3 s.
    SQLite answers the switch to WAL with SQLITE_BUSY at once (no busy handler there); the store waits.
    The barrier test above failed in only about one run of three with the wait taken out."""
    import sqlite3
    import threading

    from metarec.state.sqlite_store import SqliteStateStore

    path = tmp_path / "new.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # a new file, still in rollback-journal mode, write-locked
    release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        store = SqliteStateStore(path)
        assert store.append("u1", ratings((1, 4))).version == 1
        store.close()
    finally:
        release.join()
        holder.close()


def _tls_redis(folder, password: str):
    """A redis-server speaking only TLS on a loopback port, its certificate signed by a private CA (as
    Memorystore's in-transit encryption is). Returns ``(port, ca_path, process)``."""
    import shutil
    import time

    if not (shutil.which("redis-server") and shutil.which("openssl")):
        pytest.skip("redis-server or openssl is not installed")
    folder.mkdir(parents=True)

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=test-private-ca")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")  # fmt: skip
    (folder / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "ext")  # fmt: skip
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
         "--tls-cert-file", str(folder / "server.pem"), "--tls-key-file", str(folder / "server.key"),
         "--tls-ca-cert-file", str(folder / "ca.pem"), "--tls-auth-clients", "no",
         "--requirepass", password, "--save", "", "--appendonly", "no", "--dir", str(folder),
         "--logfile", str(folder / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return port, folder / "ca.pem", process
        except OSError:
            time.sleep(0.05)
    process.kill()
    log = (folder / "redis.log").read_text() if (folder / "redis.log").exists() else ""
    if "tls" in log.lower() and "not" in log.lower():
        pytest.skip(f"this redis-server has no TLS support: {log[-300:]}")
    raise RuntimeError(f"TLS redis-server did not start: {log[-500:]}")


def test_rediss_needs_the_private_ca_in_the_url(tmp_path):
    """Memorystore's in-transit encryption (manifests/README.md): its CA is private, so a bare rediss://
    URL fails certificate verification (503s for every named user); with `?ssl_ca_certs=<the mounted
    server CA>` the store works. A real TLS redis-server with a private CA stands in for the instance."""
    pytest.importorskip("redis")
    port, ca, process = _tls_redis(tmp_path / "tls", "s3cret")
    try:
        bare = open_store(f"rediss://:s3cret@127.0.0.1:{port}/0")
        with pytest.raises(StoreUnavailableError) as caught:
            bare.get("u1")
        assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value) and "s3cret" not in str(caught.value)
        store = open_store(f"rediss://:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={ca}")
        assert store.append("u1", ratings((1, 4))).version == 1
        assert store.get("u1").version == 1
        store.close()
    finally:
        process.kill()
        process.wait(timeout=10)
