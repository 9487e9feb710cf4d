"""The shared user-state store on Redis: every worker and every replica sees the same users.

Each write is one Lua script, which Redis runs atomically, so an append (push, drop the user's earlier
ratings of the items it rates, trim, bump the version, read back) and a conditional state write can
never interleave with another client's. A serving batch's appends (``append_many``) and its state
writes (``put_states``) are one script call each: one round trip, and one script invocation on the
server instead of one per user (each cost ~20 us of server time here, most of it the call itself).
A user's keys share the hash tag ``{user_id}``; on a Redis Cluster, which refuses one call over keys of
several slots, each user's entry becomes its own call (all in one pipeline).

Retention: with ``ttl_s``, every script that writes a user sets the same PEXPIRE on both of the user's
keys in the same atomic step, so the time to live restarts at each write and the two keys always expire
together (Redis frees them itself); without it, a write removes any time to live (PERSIST). Keys
written without one (before retention was configured) get it from :meth:`RedisStateStore.prune`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence

from metarec.state.open import redacted_url
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

# Gives a user's two keys (KEYS[k], KEYS[k + 1]) the retention ttl_ms, or none when it is 0.
_KEEP = """
local function keep(k, ttl)
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[k], ttl)
    redis.call('PEXPIRE', KEYS[k + 1], ttl)
  else
    redis.call('PERSIST', KEYS[k])
    redis.call('PERSIST', KEYS[k + 1])
  end
end
"""
# A serving batch's appends in one script call: KEYS: each entry's ratings list and meta hash, in pairs.
# ARGV: window, retention in ms (0: none), then per entry a fresh incarnation (kept only when the append
# creates the user: HSETNX) and its number of ratings followed by, per rating, the prefix its JSON
# starts with (``["<item id>",``, which names the item: a JSON string token ends at its first unescaped
# quote) and the JSON rating; an entry's items are distinct (the client keeps each item's last rating).
# The user's earlier ratings of these items are dropped before the push, so the window keeps one rating
# per item. Returns per entry [version, blob, blob_version, incarnation, window as one JSON array] (one
# reply string, not one per rating: the client parses replies in Python, and a batch's windows are read
# on every feedback).
_APPEND = (
    _KEEP
    + """
local bound = -tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local results = {}
local arg = 3
for k = 1, #KEYS, 2 do
  local fresh = ARGV[arg]
  arg = arg + 1
  local count = tonumber(ARGV[arg])
  local last = arg + 2 * count
  if count > 0 then
    local old = redis.call('LRANGE', KEYS[k], 0, -1)
    -- Push first: RPUSH is the script's first write, which Redis refuses when out of memory (after a
    -- first write it would let the script run on), so an append refused then writes nothing.
    for i = arg + 2, last, 2 do redis.call('RPUSH', KEYS[k], ARGV[i]) end
    for _, entry in ipairs(old) do
      for i = arg + 1, last, 2 do
        local prefix = ARGV[i]
        if string.sub(entry, 1, #prefix) == prefix then
          redis.call('LREM', KEYS[k], 1, entry)  -- from the head: this old entry, before the pushed ones
          break
        end
      end
    end
  end
  arg = last + 1
  redis.call('LTRIM', KEYS[k], bound, -1)
  local version = redis.call('HINCRBY', KEYS[k + 1], 'version', 1)
  redis.call('HSETNX', KEYS[k + 1], 'incarnation', fresh)
  local meta = redis.call('HMGET', KEYS[k + 1], 'blob', 'blob_version', 'incarnation')
  local window = '[' .. table.concat(redis.call('LRANGE', KEYS[k], 0, -1), ',') .. ']'
  keep(k, ttl)
  results[#results + 1] = {version, meta[1] or false, meta[2] or false, meta[3] or false, window}
end
return results
"""
)
# A batch's state writes in one script call: KEYS: each entry's ratings list and meta hash, in pairs
# (the list only for its time to live). ARGV: retention in ms (0: none), then per entry its blob, version,
# incarnation ('' for none) and a fresh incarnation (for a user it creates). Each state is stored only
# over one of the same or an older version, only from ratings the user still has (its version at most
# the user's: 0 for a user deleted or expired since) and, when it names an incarnation, only into a
# record of that one (or of none: written before incarnations); returns 1 (stored) or 0 per entry.
_PUT_STATE = (
    _KEEP
    + """
local ttl = tonumber(ARGV[1])
local results = {}
for k = 1, #KEYS, 2 do
  local meta, blob, version = KEYS[k + 1], ARGV[2 * k], tonumber(ARGV[2 * k + 1])
  local given, fresh = ARGV[2 * k + 2], ARGV[2 * k + 3]
  local held = redis.call('HMGET', meta, 'version', 'blob_version', 'incarnation')
  local current = tonumber(held[1] or '0')
  local stored = tonumber(held[2] or '-1')
  -- A state of another record of the user (deleted or expired since it was read, maybe re-created).
  local other = given ~= '' and (not held[1] or (held[3] and held[3] ~= given))
  if other or stored > version or version > current then
    results[#results + 1] = 0
  else
    redis.call('HSET', meta, 'blob', blob, 'blob_version', version)
    if not held[1] then redis.call('HSET', meta, 'version', 0, 'incarnation', fresh) end
    keep(k, ttl)
    results[#results + 1] = 1
  end
end
return results
"""
)
# Gives a user's keys written without a time to live the retention (ARGV[1] ms); returns 1 if it did.
_RETAIN = """
if redis.call('PTTL', KEYS[1]) == -1 or redis.call('PTTL', KEYS[2]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


class RedisStateStore(UserStateStore):
    """:class:`UserStateStore` on a Redis server.

    Args:
        url: ``redis://host:port/db`` (``rediss://`` for TLS, ``unix:///path.sock``).
        window: Most items whose (latest) ratings are kept per user.
        prefix: Key prefix, so several models or environments can share one server.
        ttl_s: Retention: seconds a user's keys live after their last write (None: forever).
    """

    def __init__(
        self, url: str, window: int = DEFAULT_WINDOW, prefix: str = "metarec", ttl_s: float | None = None
    ):
        super().__init__(window, ttl_s)
        import redis  # the serving extra; only needed when this store is chosen

        self.where = redacted_url(url)  # it goes into error messages, logs and 503 answers
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
            failure = None
        except Exception as error:  # noqa: BLE001 - redis-py's parse errors quote the URL, password included
            failure = type(error).__name__  # ("Port could not be cast to integer value as '<its start>'")
        if failure is not None:  # raised outside the handler: the original is not even the context
            raise ValueError(f"state store URL {self.where!r} cannot be opened: {failure}")
        errors = redis.exceptions
        # ConnectionError covers a refused or lost connection, failed authentication and a server still
        # loading its data; ReadOnlyError a replica left behind by a failover.
        self._passing = (errors.ConnectionError, errors.TimeoutError, errors.ReadOnlyError,
                         errors.OutOfMemoryError)  # fmt: skip
        self.prefix = prefix
        self._append = self.client.register_script(_APPEND)
        self._put_state = self.client.register_script(_PUT_STATE)
        self._retain = self.client.register_script(_RETAIN)
        # Whole milliseconds, at least 1 (PEXPIRE 0 would delete at once); 0 tells the scripts: none.
        self._ttl_ms = 0 if self.ttl_s is None else max(1, round(self.ttl_s * 1000))
        self._per_entry = False  # set when the server is a Redis Cluster (see _run)

    def _keys(self, user_id: str) -> tuple[str, str]:
        tag = f"{self.prefix}:{{{user_id}}}"
        return f"{tag}:ratings", f"{tag}:meta"

    def append(self, user_id: str, ratings: list[Rating]) -> StoredUser:
        return self.append_many([(user_id, ratings)])[0]

    def append_many(self, entries: Sequence[tuple[str, list[Rating]]]) -> list[StoredUser]:
        for _, ratings in entries:
            check_ratings(ratings)
        calls = []
        for user_id, ratings in entries:
            latest = latest_per_item(ratings)
            args: list = [new_incarnation(), len(latest)]
            for r in latest:
                item = json.dumps(str(r.item_id))
                args += [f"[{item},", json.dumps([str(r.item_id), float(r.rating), r.timestamp])]
            calls.append((list(self._keys(user_id)), args))
        with self._reachable():
            results = self._run(self._append, calls, [self.window, self._ttl_ms])
        return [
            _state(json.loads(window), version, blob, blob_version, incarnation)
            for version, blob, blob_version, incarnation, window in results
        ]

    def get(self, user_id: str) -> StoredUser | None:
        ratings_key, meta_key = self._keys(user_id)
        # MULTI/EXEC: the window and the version are read as one snapshot.
        pipe = self.client.pipeline(transaction=True)
        pipe.hmget(meta_key, "version", "blob", "blob_version", "incarnation")
        pipe.lrange(ratings_key, 0, -1)
        with self._reachable():
            (version, blob, blob_version, incarnation), window = pipe.execute()
        if version is None:
            return None
        return _state([json.loads(entry) for entry in window], version, blob, blob_version, incarnation)

    def put_state(self, user_id: str, blob: bytes, version: int, incarnation: str | None = None) -> bool:
        return self.put_states([(user_id, blob, version, incarnation)])[0]

    def put_states(self, entries: Sequence[StateEntry]) -> list[bool]:
        calls = []
        for entry in entries:
            user_id, blob, version, incarnation = state_entry(entry)
            args = [blob, int(version), incarnation or "", new_incarnation()]
            calls.append((list(self._keys(user_id)), args))
        with self._reachable():
            return [bool(stored) for stored in self._run(self._put_state, calls, [self._ttl_ms])]

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        """Turns the client's errors of a passing condition into :class:`StoreUnavailableError`."""
        try:
            yield
        except self._passing as error:
            raise StoreUnavailableError(self.where, error) from error

    def _run(self, script, calls: list[tuple[list, list]], shared: Sequence = ()) -> list:
        """Runs a batch script on ``(keys, args)`` per entry; returns one result per entry.

        All entries go in one script call (one round trip, and Redis runs the whole batch atomically,
        which keeps each entry atomic). A Redis Cluster refuses keys of several hash slots in one call
        (CROSSSLOT, before running anything): from then on each entry is its own call, all of them in
        one pipeline (one round trip; an entry's keys share its user's hash tag). ``shared`` arguments
        come first in every call.
        """
        from redis.exceptions import ClusterCrossSlotError, NoScriptError, ResponseError

        if not calls:
            return []
        if not self._per_entry or len(calls) == 1:
            keys = [key for entry_keys, _ in calls for key in entry_keys]
            args = [*shared, *(arg for _, entry_args in calls for arg in entry_args)]
            try:
                return script(keys=keys, args=args)
            except ResponseError as error:
                # redis-py raises the server's "CROSSSLOT ..." reply as ClusterCrossSlotError with the
                # code stripped from its message, so the text alone never matched: every batch of two
                # users or more failed on a cluster instead of switching to one call per user.
                crossslot = isinstance(error, ClusterCrossSlotError) or str(error).startswith("CROSSSLOT")
                if len(calls) == 1 or not crossslot:
                    raise
                self._per_entry = True
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *shared, *args)
        results = pipe.execute(raise_on_error=False)
        for position, result in enumerate(results):
            if isinstance(result, NoScriptError):
                # A call the server refused with NOSCRIPT never ran: run it again alone (reloads it).
                keys, args = calls[position]
                results[position] = script(keys=keys, args=[*shared, *args])
            elif isinstance(result, Exception):
                raise result
        return [result[0] for result in results]

    def delete(self, user_id: str) -> bool:
        with self._reachable():
            return self.client.delete(*self._keys(user_id)) > 0

    def prune(self) -> int:
        if self.ttl_s is None:
            return 0
        head, tails = f"{self.prefix}:{{", ("}:ratings", "}:meta")
        given = 0
        with self._reachable():
            users: set[str] = set()
            for key in self.client.scan_iter(match=f"{_glob_escaped(self.prefix)}:{{*", count=1000):
                try:
                    key = key.decode("utf-8")
                except UnicodeDecodeError:  # not written by this store (its user ids are UTF-8)
                    continue
                tail = next((t for t in tails if key.endswith(t)), None)
                if key.startswith(head) and tail is not None:
                    users.add(key[len(head) : -len(tail)])
            ordered = sorted(users)
            for start in range(0, len(ordered), 500):  # one pipeline round trip per 500 users
                pipe = self.client.pipeline(transaction=False)
                for user_id in ordered[start : start + 500]:
                    self._retain(keys=list(self._keys(user_id)), args=[self._ttl_ms], client=pipe)
                given += sum(int(result) for result in pipe.execute())
        return given

    def close(self) -> None:
        self.client.close()


def _glob_escaped(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)


def _state(window: list[list], version, blob, blob_version, incarnation) -> StoredUser:
    return StoredUser(
        ratings=[Rating.from_list(entry) for entry in window],
        version=int(version),
        blob=None if blob in (None, False) else bytes(blob),
        blob_version=-1 if blob_version in (None, False) else int(blob_version),
        incarnation=PREDATES_INCARNATIONS
        if incarnation in (None, False)
        else bytes(incarnation).decode("ascii"),
    )
