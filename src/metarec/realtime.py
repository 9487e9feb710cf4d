"""Per-user serving state: each user's support set, adapted state and its caching in the store.

A user's support set is their history (the ratings the archive ships for known users, fixed) followed by
the feedback they sent since (the store's ratings window), the latest rating of each item winning,
bounded to the last ``window`` items. The adapted state is the meta-learned inner loop run on that
support set from the meta-learned initialisation (never from a previous state, so serving computes
exactly what evaluation measured); it is cached in the store, tagged with the version of the feedback
it saw, and recomputed when stale. The blob also keeps the user's encoded features, so a new user who
described themselves once is scored with the same features later; a fresh state kept with other
features than a request gives is stale for that request (re-adapted with the given ones and stored).

Consistency: appends are atomic in the store and a state is only stored over an older one, so after
any interleaving of concurrent feedback the stored ratings are all of them and the newest stored state
is the one computed from all of them (what a sequential replay gives).

Batches: :meth:`RealtimeUsers.record_many` (a serving batch's feedback) appends every entry's ratings,
then re-adapts all its users in one batched pass (:meth:`Personaliser.adapt_many`, supports padded and
masked) and stores each state against the version it was computed from; :meth:`RealtimeUsers.view_many`
does the same for the stale states of a recommend batch.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from metarec.features import EncodedFeatures
from metarec.personalise import Params, Personaliser, support_from_window
from metarec.state import Rating, StoredUser, StoreUnavailableError, UserStateStore
from metarec.state.blob import carried_features, decode_features, decode_state, encode_state
from metarec.state.store import StateEntry, state_entry

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.parquet"
# Users whose adapted states a server without a store keeps per worker (~1 KB each: 711 bytes for a
# MovieLens-100K model), so ~20 MB at most.
HISTORY_STATES_KEPT = 20_000
HISTORY_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


@dataclass
class UserView:
    """What serving knows about one user.

    Attributes:
        features: encoded user features (leading dimension 1).
        adapted: the adapted state, or None when the user has no rating yet (the prior applies).
        support_items: item indices of the support set the state was adapted on.
        support_ratings: their ratings.
        version: the store version of the user's feedback (0 without feedback).
    """

    features: EncodedFeatures
    adapted: Params | None
    support_items: list[int]
    support_ratings: list[float]
    version: int


class HistoryOnly:
    """Stands in for the store of a server that keeps no per-user state (``METAREC_STATE_URL=none``):
    it holds no ratings, so :class:`RealtimeUsers` over it serves the users of the archive's history from
    that history alone. Their adapted states are kept in this process only, the last ``capacity`` users
    used: a history does not change while its archive is served, so a kept state never goes stale, and
    each worker adapts a user once instead of at every request (another worker or replica adapts them
    once too: nothing is shared, nothing outlives the process).

    Args:
        window: Most ratings of a support set (the store's window, ``RequestLimits.state_window``).
        capacity: Most users whose states are kept (~1 KB each), least recently used dropped first.
    """

    def __init__(self, window: int, capacity: int = HISTORY_STATES_KEPT):
        self.window = window
        self.capacity = capacity
        self._states: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()  # the in-process tests call one Recommender from several threads

    def get(self, user_id: str) -> StoredUser | None:
        """The user's kept state (no ratings: a fresh state of version 0), or None."""
        with self._lock:
            blob = self._states.get(user_id)
            if blob is None:
                return None
            self._states.move_to_end(user_id)
        return StoredUser(ratings=[], version=0, blob=blob, blob_version=0)

    def put_states(self, states: Sequence[StateEntry]) -> None:
        """Keeps each ``(user_id, blob, version[, incarnation])`` state, dropping the least recently used."""
        with self._lock:
            for entry in states:
                user_id, blob, _, _ = state_entry(entry)
                self._states[user_id] = blob
                self._states.move_to_end(user_id)
            while len(self._states) > self.capacity:
                self._states.popitem(last=False)


class RealtimeUsers:
    """Per-user state of one served model over a :class:`~metarec.state.UserStateStore`.

    Args:
        personaliser: adapts and scores for the model.
        store: the shared store.
        item_index: raw item id -> item index.
        history: raw user id -> the user's known ratings, oldest first (from :func:`read_history`).
        model_tag: what identifies the model that computes the states (the Recommender's
            ``state_tag``: version, weights fingerprint, adapt settings); stored states with another
            are recomputed.
        steps: inner steps of every adaptation (the model's evaluated setting).
        features_key: what fixes the model's user-feature encoding
            (:attr:`~metarec.features.FeatureEncoder.user_fingerprint`): kept with each state, so that
            after a model change (another ``model_tag``) a new user's stored features are still read
            when the new model encodes features the same way; None keeps features to this model only.
    """

    def __init__(
        self,
        personaliser: Personaliser,
        store: UserStateStore,
        item_index: dict[str, int],
        history: dict[str, list[Rating]],
        model_tag: str,
        steps: int,
        features_key: str | None = None,
    ):
        self.personaliser = personaliser
        self.store = store
        self.item_index = item_index
        self.history = history
        self.model_tag = model_tag
        self.steps = steps
        self.features_key = features_key
        self.device = next(personaliser.model.parameters()).device

    def support(self, user_id: str, stored: StoredUser | None) -> tuple[list[int], list[float]]:
        """The support set of a user: history, then stored feedback; latest per item; last ``window``."""
        window = self.history.get(user_id, []) + (stored.ratings if stored is not None else [])
        items, ratings = support_from_window(window, self.item_index)
        bound = self.store.window
        return items[-bound:], ratings[-bound:]

    def view(self, user_id: str, features: EncodedFeatures, authoritative: bool = True) -> UserView | None:
        """The user's current state, computed and cached when the cached one is missing or stale.

        Args:
            user_id: raw user id.
            features: the user's features.
            authoritative: ``features`` come from the catalogue or the request; False lets the features
                stored with a new user's state win (a request that only names the user).

        Returns:
            The view, or None for a user with neither history nor stored state.
        """
        return self.view_many([(user_id, features, authoritative)])[0]

    def view_many(self, users: Sequence[tuple[str, EncodedFeatures, bool]]) -> list[UserView | None]:
        """:meth:`view` for several ``(user_id, features, authoritative)``; the users whose cached state
        is missing or stale are adapted together in one batched pass."""
        found = [(entry, self.store.get(entry[0])) for entry in users]
        known = [
            (user_id, features, stored, authoritative)
            for (user_id, features, authoritative), stored in found
            if stored is not None or user_id in self.history
        ]
        views = iter(self._resolve_many(known))
        return [
            next(views) if stored is not None or user_id in self.history else None
            for (user_id, _, _), stored in found
        ]

    def stored_features(self, users: Sequence[tuple[str, EncodedFeatures]]) -> list[EncodedFeatures]:
        """The features kept with each user's stored state (a new user who described themselves once),
        else the given ones; no state is adapted (an ``adapt`` request needs the features only).

        Args:
            users: ``(user_id, fallback features)`` each.

        Returns:
            One feature set per user, on the model's device.
        """
        found = []
        for user_id, fallback in users:
            stored = self.store.get(user_id)
            kept = None
            if stored is not None and stored.blob is not None:
                kept = decode_features(stored.blob, self.model_tag, self.device, self.features_key)
            features = fallback if kept is None else EncodedFeatures(*kept)
            found.append(features.to(self.device))
        return found

    def record(
        self, user_id: str, ratings: Sequence[Rating], features: EncodedFeatures, authoritative: bool = True
    ) -> UserView:
        """Appends ratings (feedback, or an adapt request's support) and stores the re-adapted state.

        Args:
            user_id: raw user id (a new one is created).
            ratings: validated ratings of catalogue items.
            features: the user's features (kept in the state, for a new user).
            authoritative: see :meth:`view`.

        Returns:
            The view after this append.
        """
        return self.record_many([(user_id, ratings, features, authoritative)])[0]

    def record_many(
        self, entries: Sequence[tuple[str, Sequence[Rating], EncodedFeatures, bool]]
    ) -> list[UserView]:
        """:meth:`record` for a serving batch: ``(user_id, ratings, features, authoritative)`` each.

        Every entry's ratings are appended in order (one atomic store append each, so concurrent
        writers still lose nothing), then each user is re-adapted once, on the window after their last
        append of the batch, all users in one batched pass, and each state is stored against the
        version it was computed from. A user with several entries gets the same (final) view for each;
        their features are those of their last authoritative entry, as if the entries ran in turn.

        Args:
            entries: what :meth:`record` takes, per entry.

        Returns:
            One view per entry.
        """
        stored = self.store.append_many([(user_id, list(ratings)) for user_id, ratings, _, _ in entries])
        last: dict[str, tuple[str, EncodedFeatures, StoredUser, bool]] = {}
        for (user_id, _, features, authoritative), after in zip(entries, stored, strict=True):
            previous = last.get(user_id)
            if not authoritative and previous is not None and previous[3]:
                features, authoritative = previous[1], True  # an earlier entry described the user
            last[user_id] = (user_id, features, after, authoritative)
        views = dict(zip(last, self._resolve_many(list(last.values())), strict=True))
        return [views[user_id] for user_id, _, _, _ in entries]

    def _resolve_many(
        self, users: Sequence[tuple[str, EncodedFeatures, StoredUser | None, bool]]
    ) -> list[UserView]:
        """The views of ``(user_id, features, stored, authoritative)``: fresh cached states are used,
        the others adapted in one :meth:`Personaliser.adapt_many` call and stored."""
        views: list[UserView] = []
        pending: list[int] = []
        for user_id, features, stored, authoritative in users:
            version = stored.version if stored is not None else 0
            items, ratings = self.support(user_id, stored)
            document = None
            # Read only when it is served (fresh) or its features are (a request that only names the user).
            if stored is not None and stored.blob is not None and (stored.fresh or not authoritative):
                # A stale state is read for its features only (its parameters are recomputed).
                document = decode_state(stored.blob, self.model_tag, self.device, params=stored.fresh)
            if not authoritative and stored is not None and stored.blob is not None:
                # Kept with this model's state, or with another model's that encodes features alike.
                kept = (
                    document.get("features")
                    if document is not None
                    else decode_features(stored.blob, self.model_tag, self.device, self.features_key)
                )
                features = features if kept is None else EncodedFeatures(*kept)
            elif document is not None and not _same_features(document.get("features"), features):
                # Adapted with other features than the request gives (a stored new user describing
                # themselves anew): stale for this request, so it is served and explained with one set
                # of features, and the state re-adapted with the given ones replaces it.
                document = None
            if document is not None and stored.fresh:
                views.append(UserView(features, document["params"], items, ratings, version))
                continue
            if items:
                pending.append(len(views))
            views.append(UserView(features, None, items, ratings, version))
        if not pending:
            return views
        adapted = self.personaliser.adapt_many(
            [views[p].features for p in pending],
            [(views[p].support_items, views[p].support_ratings) for p in pending],
            self.steps,
        )
        states = []
        for position, state in zip(pending, adapted, strict=True):
            views[position].adapted = state
            user_id, _, stored, _ = users[position]
            # The features of other encodings the replaced blob held stay with the user: a model serving
            # beside this one (a rolling update) or rolled back to still reads its own.
            carried = carried_features(stored.blob if stored is not None else None, self.features_key)
            blob = encode_state(state, self.model_tag, views[position].features, self.features_key, carried)
            # The record it was read from: a state of a user forgotten meanwhile is refused even when
            # they came back with as many ratings (same version, another incarnation; a record from before
            # incarnations reads as PREDATES_INCARNATIONS, which a new record refuses too).
            incarnation = stored.incarnation if stored is not None else None
            states.append((user_id, blob, views[position].version, incarnation))
        try:
            self.store.put_states(states)
        except StoreUnavailableError as error:
            # A state is a cache of its ratings (stored already, or read): the answer stands, and the
            # next read of these users recomputes what was not written.
            logger.warning("adapted states not cached: %s", error)
        return views


def _same_features(stored: list | None, given: EncodedFeatures) -> bool:
    """Whether the features kept in a state are the given ones (a state kept without any is not)."""
    if stored is None or len(stored) != len(given):
        return False
    return all(
        kept.shape == new.shape and kept.dtype == new.dtype and torch.equal(kept, new.to(kept.device))
        for kept, new in zip(stored, given, strict=True)
    )


def read_history(path: str | Path | None) -> dict[str, list[Rating]]:
    """Loads an archive's ``history.parquet`` into per-user rating lists (oldest first).

    Args:
        path: the file, or None / a missing file for no history.

    Returns:
        raw user id -> ratings.
    """
    if path is None or not Path(path).is_file():
        return {}
    frame = pd.read_parquet(path, columns=HISTORY_COLUMNS).sort_values(
        ["user_id", "timestamp"], kind="stable"
    )
    history: dict[str, list[Rating]] = {}
    for user_id, item_id, rating, timestamp in frame.itertuples(index=False):
        history.setdefault(str(user_id), []).append(Rating(str(item_id), float(rating), float(timestamp)))
    return history


def write_history(preprocessed_dir: str | Path, output: str | Path, window: int, splits=("train",)) -> int:
    """Writes the known users' recent ratings for an archive (raw ids, last ``window`` per user).

    Only users of ``splits`` (default: the training users) are included, so the validation and test
    users' ratings stay out of the served model and an evaluation against the archive stays honest.

    Args:
        preprocessed_dir: preprocessing output (``interactions.parquet``, ``users.parquet``,
            ``items.parquet``).
        output: the ``history.parquet`` to write.
        window: most ratings kept per user (the newest).
        splits: user splits to include.

    Returns:
        The number of rows written.
    """
    folder = Path(preprocessed_dir)
    interactions = pd.read_parquet(folder / "interactions.parquet")
    users = pd.read_parquet(folder / "users.parquet", columns=["user_idx", "user_id"])
    items = pd.read_parquet(folder / "items.parquet", columns=["item_idx", "item_id"])
    rows = interactions[interactions["user_split"].isin(list(splits))]
    rows = rows.sort_values(["user_idx", "timestamp"], kind="stable").groupby("user_idx").tail(window)
    rows = rows.merge(users, on="user_idx").merge(items, on="item_idx")
    table = pd.DataFrame(
        {
            "user_id": rows["user_id"].astype(str),
            "item_id": rows["item_id"].astype(str),
            "rating": rows["rating"].astype("float32"),
            "timestamp": rows["timestamp"].astype("int64"),
        }
    )
    table.to_parquet(output, index=False)
    return len(table)
