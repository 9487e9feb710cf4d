"""Erasure and retention of stored users, for on-call without a server (``metarec state ...``).

The serving route ``forget`` does the same erasure through the Recommender; both come down to
:meth:`~metarec.state.store.UserStateStore.delete`, which every worker sees at once (no worker keeps a
copy of a user between requests). What neither can erase: a known user's ratings in a model archive's
``history.parquet`` and what training learned from them (docs/realtime.md#erasure).
"""

from __future__ import annotations

from collections.abc import Sequence

from metarec.state.open import open_store, sqlite_path
from metarec.state.store import UserStateStore


def forget_users(url: str, user_ids: Sequence[str]) -> dict[str, bool]:
    """Erases users' stored ratings and state.

    Args:
        url: The store (``sqlite:///...``, ``redis://...``), as ``METAREC_STATE_URL`` names it.
        user_ids: Raw user ids.

    Returns:
        Per user id, whether the store held the user.

    Raises:
        ValueError: An empty user id or an unknown store URL.
        FileNotFoundError: A SQLite store whose file does not exist.
        StoreUnavailableError: The store could not be reached (the users before it were erased).
    """
    if any(not user_id for user_id in user_ids):
        raise ValueError("a user id must not be empty")
    store = _open_existing(url)
    try:
        return {user_id: store.delete(user_id) for user_id in user_ids}
    finally:
        store.close()


def prune_store(url: str, ttl_s: float) -> int:
    """Applies a retention to a store now: deletes the expired users (SQLite) or gives keys written
    without a time to live the retention (Redis, which expires keys itself).

    Args:
        url: The store.
        ttl_s: The retention in seconds, as served (``state_ttl_s``); must be positive.

    Returns:
        Users deleted (SQLite) or given a time to live (Redis).

    Raises:
        ValueError: A retention that is not positive, or an unknown store URL.
        FileNotFoundError: A SQLite store whose file does not exist.
    """
    if not ttl_s > 0:
        raise ValueError(f"prune needs a positive retention, got {ttl_s!r} s")
    store = _open_existing(url, ttl_s=ttl_s)
    try:
        return store.prune()
    finally:
        store.close()


def _open_existing(url: str, ttl_s: float | None = None) -> UserStateStore:
    """Opens a store that must already exist: opening a SQLite URL creates its file (and folders), so a
    mistyped path would report every user "not stored" from a new empty store, a false erasure."""
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"no SQLite state store at {path} (check --store / METAREC_STATE_URL)")
    return open_store(url, ttl_s=ttl_s)
