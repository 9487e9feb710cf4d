"""The shared user-state store on Redis: every worker and every replica sees the same users.

Each write is one Lua script, which Redis runs atomically, so an append (push, trim, bump the
version, read back) and a conditional state write can never interleave with another client's. A
user's keys share the hash tag ``{user_id}`` so the scripts also work on a Redis Cluster. A serving
batch's appends (``append_many``) and state writes (``put_states``) go in one pipeline each.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from metarec.state.store import DEFAULT_WINDOW, Rating, StoredUser, UserStateStore, check_ratings

# KEYS: ratings list, meta hash. ARGV: window, then the JSON ratings. Returns [version, blob,
# blob_version, window as one JSON array] (one reply string, not one per rating: the client parses
# replies in Python, and a batch's windows are read on every feedback).
_APPEND = """
for i = 2, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
local version = redis.call('HINCRBY', KEYS[2], 'version', 1)
local meta = redis.call('HMGET', KEYS[2], 'blob', 'blob_version')
local window = '[' .. table.concat(redis.call('LRANGE', KEYS[1], 0, -1), ',') .. ']'
return {version, meta[1] or false, meta[2] or false, window}
"""
# KEYS: meta hash. ARGV: blob, version. Stores only over an older state.
_PUT_STATE = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'blob_version') or '-1')
if stored >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'blob', ARGV[1], 'blob_version', ARGV[2])
if not redis.call('HGET', KEYS[1], 'version') then redis.call('HSET', KEYS[1], 'version', 0) end
return 1
"""


class RedisStateStore(UserStateStore):
    """:class:`UserStateStore` on a Redis server.

    Args:
        url: ``redis://host:port/db`` (``rediss://`` for TLS, ``unix:///path.sock``).
        window: Most ratings kept per user.
        prefix: Key prefix, so several models or environments can share one server.
    """

    def __init__(self, url: str, window: int = DEFAULT_WINDOW, prefix: str = "metarec"):
        super().__init__(window)
        import redis  # the serving extra; only needed when this store is chosen

        self.client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
        self.prefix = prefix
        self._append = self.client.register_script(_APPEND)
        self._put_state = self.client.register_script(_PUT_STATE)

    def _keys(self, user_id: str) -> tuple[str, str]:
        tag = f"{self.prefix}:{{{user_id}}}"
        return f"{tag}:ratings", f"{tag}:meta"

    def append(self, user_id: str, ratings: list[Rating]) -> StoredUser:
        return self.append_many([(user_id, ratings)])[0]

    def append_many(self, entries: Sequence[tuple[str, list[Rating]]]) -> list[StoredUser]:
        # A batch is one pipeline of append scripts, each still atomic on the server (another
        # client's append may run between two of them, as between two separate calls).
        for _, ratings in entries:
            check_ratings(ratings)
        calls = [
            (list(self._keys(user_id)), [self.window, *(json.dumps(r.to_list()) for r in ratings)])
            for user_id, ratings in entries
        ]
        return [
            _state(json.loads(window), version, blob, blob_version)
            for version, blob, blob_version, window in self._run(self._append, calls)
        ]

    def get(self, user_id: str) -> StoredUser | None:
        ratings_key, meta_key = self._keys(user_id)
        # MULTI/EXEC: the window and the version are read as one snapshot.
        pipe = self.client.pipeline(transaction=True)
        pipe.hmget(meta_key, "version", "blob", "blob_version")
        pipe.lrange(ratings_key, 0, -1)
        (version, blob, blob_version), window = pipe.execute()
        if version is None:
            return None
        return _state([json.loads(entry) for entry in window], version, blob, blob_version)

    def put_state(self, user_id: str, blob: bytes, version: int) -> bool:
        return self.put_states([(user_id, blob, version)])[0]

    def put_states(self, entries: Sequence[tuple[str, bytes, int]]) -> list[bool]:
        calls = [([self._keys(user_id)[1]], [blob, int(version)]) for user_id, blob, version in entries]
        return [bool(stored) for stored in self._run(self._put_state, calls)]

    def _run(self, script, calls: list[tuple[list, list]]) -> list:
        """Runs a script once per ``(keys, args)``: one call alone, several in one pipeline (one round
        trip; a call the server refuses with NOSCRIPT never ran, so it is run again on its own, which
        reloads the script)."""
        if len(calls) == 1:
            ((keys, args),) = calls
            return [script(keys=keys, args=args)]
        from redis.exceptions import NoScriptError

        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        results = pipe.execute(raise_on_error=False)
        for position, result in enumerate(results):
            if isinstance(result, NoScriptError):
                keys, args = calls[position]
                results[position] = script(keys=keys, args=args)
            elif isinstance(result, Exception):
                raise result
        return results

    def delete(self, user_id: str) -> None:
        self.client.delete(*self._keys(user_id))

    def close(self) -> None:
        self.client.close()


def _state(window: list[list], version, blob, blob_version) -> StoredUser:
    return StoredUser(
        ratings=[Rating.from_list(entry) for entry in window],
        version=int(version),
        blob=None if blob in (None, False) else bytes(blob),
        blob_version=-1 if blob_version in (None, False) else int(blob_version),
    )
