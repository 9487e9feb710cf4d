"""The user-state store interface, its records, and the URL that chooses an implementation.

A store keeps, per user: the window of the latest rating of each of the most recently rated items (at
most ``window`` distinct items, oldest first; an append drops the user's earlier rating of each item it
rates, so a re-rating moves the item to the end, and the item rated longest ago goes first when the
window is full), a version counter bumped by every append, and one opaque state blob (the adapted
parameters) tagged with the version of the ratings it was computed from. Appends are atomic, so
concurrent feedback for one user loses nothing; a state is only stored when it is not older than the
one already stored, so the last write always matches the newest ratings.

Keeping one rating per item matters: a window of raw ratings, duplicates included, let repeated
ratings of a few items push the other items out (a retried feedback, or many re-ratings), and once a
re-rating of a history item left the window its older history rating came back.

Lifecycle: :meth:`UserStateStore.delete` erases a user (the ``forget`` route, ``metarec state
forget``). With a retention ``ttl_s``, a user's ratings and state expire ``ttl_s`` seconds after the
user's last write (an append or a state write; every write restarts the clock): an expired user reads
as absent, and a later append starts them afresh at version 1. A state computed from ratings the store
no longer holds (the user was deleted or expired meanwhile) is refused. Versions count feedback, so a
returning user reaches the old versions again: each record the store creates for a user (first append,
or a state write of no feedback) gets a fresh random ``incarnation``, and a state written with the
incarnation it was computed under is refused by a later record of the user (docs/realtime.md#erasure).
"""

from __future__ import annotations

import math
import numbers
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_WINDOW = 200  # ratings kept per user: the adapt support set is at most this large


@dataclass(frozen=True)
class Rating:
    """One rating of one item.

    Attributes:
        item_id: Raw item id.
        rating: The rating value.
        timestamp: Seconds since the epoch when the user rated (None when unknown).
    """

    item_id: str
    rating: float
    timestamp: float | None = None

    def to_list(self) -> list:
        """Returns the compact JSON form ``[item_id, rating, timestamp]``."""
        return [self.item_id, self.rating, self.timestamp]

    @classmethod
    def from_list(cls, values: list) -> Rating:
        """Inverse of :meth:`to_list`."""
        item_id, rating, timestamp = values
        return cls(str(item_id), float(rating), None if timestamp is None else float(timestamp))


@dataclass
class StoredUser:
    """What a store holds for one user.

    Attributes:
        ratings: The ratings window, oldest first: one (the latest) rating per item.
        version: Bumped by every append (0 for a user with no ratings yet).
        blob: The stored adapted state, or None.
        blob_version: The ``version`` of the ratings ``blob`` was computed from (-1 without a blob).
        incarnation: Random token of this record of the user, new each time the store creates it (after
            a delete or expiry too), so a state computed from a forgotten record's ratings can be told
            from one of the returning user's at the same version; :data:`PREDATES_INCARNATIONS` for a
            record written before incarnations existed (until its next append gives it one).
    """

    ratings: list[Rating] = field(default_factory=list)
    version: int = 0
    blob: bytes | None = None
    blob_version: int = -1
    incarnation: str | None = None

    @property
    def fresh(self) -> bool:
        """Whether the stored blob was computed from the current ratings."""
        return self.blob is not None and self.blob_version == self.version


class StoreUnavailableError(RuntimeError):
    """The store could not be reached or could not write: a passing condition, not a bad request.

    Raised for a refused, lost or timed-out connection, a server that is loading or read-only, out of
    memory or disk, or a file that is locked beyond the busy timeout. A failed call wrote nothing,
    except one whose reply was lost after the server ran it (a Redis timeout): a client that retries
    such a feedback appends its ratings twice, which changes no ratings but the order and timestamps
    of its own items (each item keeps one rating, so the retry pushes no other item out) and bumps the
    version, so the state is adapted again on the same support set.

    Args:
        where: The store, as it may be shown (no password).
        error: What the driver said.
    """

    def __init__(self, where: str, error: BaseException):
        super().__init__(f"the user-state store {where} is unavailable: {error}")
        self.where = where


class UserStateStore(ABC):
    """Per-user ratings windows and adapted states, safe for concurrent writers.

    Args:
        window: Most items whose ratings are kept per user (one rating each; the item rated longest
            ago goes first).
        ttl_s: Retention: seconds a user's entry is kept after their last write (None or 0: forever).
    """

    def __init__(self, window: int = DEFAULT_WINDOW, ttl_s: float | None = None):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"the ratings window must be a positive integer, got {window!r}")
        self.window = window
        self.ttl_s = check_ttl(ttl_s)

    @abstractmethod
    def append(self, user_id: str, ratings: list[Rating]) -> StoredUser:
        """Appends ratings to a user's window atomically and bumps the version.

        In the same atomic step, the user's earlier ratings of the items being rated are dropped (and
        of ``ratings`` only each item's last one is kept), then the window is trimmed to its last
        ``window`` entries: it holds the latest rating of up to ``window`` distinct items, in order of
        each item's latest rating.

        Args:
            user_id: Raw user id.
            ratings: Ratings to append, in order.

        Returns:
            The user's state right after this append (window, new version, stored blob).
        """

    @abstractmethod
    def get(self, user_id: str) -> StoredUser | None:
        """Returns a user's state, or None for a user the store has never seen."""

    @abstractmethod
    def put_state(self, user_id: str, blob: bytes, version: int, incarnation: str | None = None) -> bool:
        """Stores an adapted state computed from the ratings at ``version``.

        A state older than the stored one is dropped, so a slow writer never overwrites the state of
        newer ratings. So is one of a version the store does not hold (above the user's current version,
        0 for an absent user): its ratings were deleted (``forget``) or expired while it was computed,
        and storing it would keep what they taught. So is one given an ``incarnation`` other than the
        user's record's, or for a user the store no longer holds: the record it was computed from was
        deleted or expired, and the user came back (versions restart at 1, so the version alone cannot
        tell). One of the same version replaces the stored one: the reader recomputed it because
        the stored state was unusable (computed by another model, e.g. a retrained one packaged under
        the same version, or unreadable), and two writers of one model at one version write the same.

        A state of no feedback (``version`` 0) without an ``incarnation`` creates an absent user (with a
        fresh incarnation): an adapt of a user the store did not hold.

        Args:
            user_id: Raw user id.
            blob: The serialised state.
            version: The ratings version it was computed from.
            incarnation: The :attr:`StoredUser.incarnation` of the record the state was computed from
                (None: the reader saw no record; not checked). A record without one (written before
                incarnations) accepts any; :data:`PREDATES_INCARNATIONS` (read from such a record) is
                refused by any record that has one, e.g. the user's record after a forget.

        Returns:
            True when stored, False when a state of newer ratings was already there or its ratings
            are gone.
        """

    def append_many(self, entries: Sequence[tuple[str, list[Rating]]]) -> list[StoredUser]:
        """Appends several ``(user_id, ratings)`` in order, each one atomic as in :meth:`append`.

        A serving batch's feedback in one go; stores override it to save round trips (one SQLite
        transaction, one Redis pipeline). Every entry is checked before anything is written.

        Args:
            entries: ``(user_id, ratings)`` pairs; a user may appear several times.

        Returns:
            The user's state right after each entry's append, in order.
        """
        for _, ratings in entries:
            check_ratings(ratings)
        return [self.append(user_id, ratings) for user_id, ratings in entries]

    def put_states(self, entries: Sequence[StateEntry]) -> list[bool]:
        """Stores several states, each as in :meth:`put_state`.

        Args:
            entries: ``(user_id, blob, version)`` or ``(user_id, blob, version, incarnation)`` each.

        Returns:
            For each entry, whether it was stored.
        """
        return [self.put_state(*state_entry(entry)) for entry in entries]

    @abstractmethod
    def delete(self, user_id: str) -> bool:
        """Forgets a user entirely (ratings and state), at once, for every reader.

        Returns:
            Whether the store held the user (an expired user counts as absent).
        """

    @abstractmethod
    def prune(self) -> int:
        """Applies retention to what the store holds now (``metarec state prune``).

        SQLite deletes the expired users (reads already skip them; writes also prune, amortised).
        Redis expires keys itself; prune gives the retention to keys written without one (before
        retention was configured, or by a server without it).

        Returns:
            How many users it deleted (SQLite) or gave a time to live (Redis); 0 without ``ttl_s``.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Releases connections."""


# Longest retention (about 31,700 years): Redis's PEXPIRE refuses milliseconds past a signed 64-bit
# expiry time (and Lua scripts carry numbers as doubles, exact to 2^53), which failed every write.
MAX_TTL_S = 10**12


def check_ttl(ttl_s: float | None) -> float | None:
    """A retention in seconds: None (or 0) keeps users forever, else a positive number up to
    :data:`MAX_TTL_S`.

    Raises:
        ValueError: A negative, too large, non-finite or non-numeric value.
    """
    if ttl_s is None:
        return None
    if (
        isinstance(ttl_s, bool)
        or not isinstance(ttl_s, numbers.Real)
        or not math.isfinite(ttl_s)
        or ttl_s < 0
    ):
        raise ValueError(f"the state retention must be a number of seconds >= 0 (0: forever), got {ttl_s!r}")
    if ttl_s > MAX_TTL_S:
        raise ValueError(
            f"the state retention must be at most {MAX_TTL_S} s (0 keeps users forever), got {ttl_s!r}"
        )
    return float(ttl_s) if ttl_s > 0 else None


# A put_states entry: (user_id, blob, version) or (user_id, blob, version, incarnation).
StateEntry = tuple[str, bytes, int] | tuple[str, bytes, int, str | None]


def state_entry(entry: StateEntry) -> tuple[str, bytes, int, str | None]:
    """A :data:`StateEntry` as ``(user_id, blob, version, incarnation)`` (None when it names none)."""
    if len(entry) == 3:
        user_id, blob, version = entry
        return user_id, blob, version, None
    user_id, blob, version, incarnation = entry
    return user_id, blob, version, incarnation


# The incarnation a store reads for a record written before incarnations existed. A state computed from
# it names this, not None, so that it is refused once the record is gone and the user has a new one (a
# forgotten user who came back); no random token (hex) equals it.
PREDATES_INCARNATIONS = "-"


def new_incarnation() -> str:
    """A fresh :attr:`StoredUser.incarnation` for a record a store is about to create."""
    return uuid.uuid4().hex


def check_ratings(ratings: list[Rating]) -> None:
    """Refuses records no store should hold (the serving layer validates requests before this).

    Raises:
        ValueError: A rating that is not finite, naming its position.
    """
    for position, entry in enumerate(ratings):
        if not math.isfinite(entry.rating):
            raise ValueError(f"ratings[{position}].rating must be finite, got {entry.rating}")


def latest_per_item(ratings: Sequence[Rating]) -> list[Rating]:
    """The last rating of each item in ``ratings``, in order of those last ratings (what an append keeps)."""
    latest: dict[str, Rating] = {}
    for entry in ratings:
        key = str(entry.item_id)
        latest.pop(key, None)
        latest[key] = entry
    return list(latest.values())
