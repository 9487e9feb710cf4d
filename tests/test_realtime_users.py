"""Per-user serving state over both stores: history-seeded known users, feedback re-adaptation from the
meta-learned start, cached states reused only when fresh, and no lost update under concurrent feedback."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch
from test_fast_adapt import USER_TERMS, random_model
from test_model import N_ITEMS
from test_state_store import redis_url, store_url  # noqa: F401 - fixtures

from metarec.features import EncodedFeatures
from metarec.meta import Adapter, AdaptSettings
from metarec.personalise import Personaliser
from metarec.realtime import RealtimeUsers
from metarec.state import Rating
from metarec.state.blob import decode_state
from metarec.state.open import open_store

STEPS = 5
ITEM_INDEX = {f"i{n}": n for n in range(N_ITEMS)}


@pytest.fixture(scope="module")
def model():
    return random_model(**USER_TERMS["bias_factors_prior"])


@pytest.fixture
def users(model, store_url):  # noqa: F811
    store = open_store(store_url, window=500)
    personaliser = Personaliser(Adapter(model, AdaptSettings.from_dict(mode="head", inner_lr=0.3), fast=True))
    yield RealtimeUsers(personaliser, store, ITEM_INDEX, HISTORY, "v1", STEPS)
    store.close()


HISTORY = {"known": [Rating("i1", 5.0, 1.0), Rating("i2", 1.0, 2.0), Rating("i1", 4.0, 3.0)]}


def features(seed=0):
    return EncodedFeatures(torch.tensor([[1, seed % 5]]), torch.tensor([[0.1 * seed]]), torch.zeros(1, 4))


def adapt_from_scratch(users, items, ratings, user=None):
    user = features() if user is None else user
    adapted = users.personaliser.adapt(user, torch.tensor(items), torch.tensor(ratings), STEPS)
    return users.personaliser.score(user, adapted, torch.arange(N_ITEMS))


def scores(users, view):
    return users.personaliser.score(view.features, view.adapted, torch.arange(N_ITEMS))


def test_a_user_without_history_or_state_has_no_view(users):
    assert users.view("stranger", features()) is None


def test_known_user_is_adapted_from_history_and_cached(users):
    view = users.view("known", features())
    # Latest rating per item, in order of the latest rating.
    assert (view.support_items, view.support_ratings, view.version) == ([2, 1], [1.0, 4.0], 0)
    assert torch.allclose(scores(users, view), adapt_from_scratch(users, [2, 1], [1.0, 4.0]))
    stored = users.store.get("known")
    assert stored.fresh and stored.ratings == []  # history is not copied into the store
    # A second view reuses the cached state: poison the personaliser to prove it is not called (views
    # adapt through adapt_many; poisoning adapt alone proved nothing).
    users.personaliser.adapt = users.personaliser.adapt_many = None
    again = users.view("known", features())
    assert torch.equal(scores(users, again), scores(users, view))


def test_feedback_re_adapts_from_the_meta_learned_start(users):
    first = users.record("known", [Rating("i7", 2.0, 10.0)], features())
    second = users.record("known", [Rating("i2", 5.0, 11.0)], features())
    assert first.version == 1 and second.version == 2
    assert second.support_items == [1, 7, 2] and second.support_ratings == [4.0, 2.0, 5.0]
    expected = adapt_from_scratch(users, [1, 7, 2], [4.0, 2.0, 5.0])
    assert torch.allclose(scores(users, second), expected, atol=1e-6)
    assert torch.allclose(scores(users, users.view("known", features())), expected, atol=1e-6)


def test_a_new_user_keeps_the_features_it_was_adapted_with(users):
    users.record("new", [Rating("i3", 5.0)], features(seed=3))
    view = users.view("new", features(seed=0), authoritative=False)
    assert torch.equal(view.features.cat, features(seed=3).cat)
    # Feedback that only names the user keeps them, also when the state is recomputed.
    later = users.record("new", [Rating("i4", 1.0)], features(seed=0), authoritative=False)
    assert torch.equal(later.features.cat, features(seed=3).cat)
    expected = adapt_from_scratch(users, [3, 4], [5.0, 1.0], user=features(seed=3))
    assert torch.allclose(scores(users, later), expected, atol=1e-6)


def test_a_fresh_state_adapted_with_other_features_than_given_is_re_adapted_and_stored(users):
    users.record("new", [Rating("i3", 5.0), Rating("i5", 2.0)], features(seed=3))
    calls = []
    adapt_many = users.personaliser.adapt_many
    users.personaliser.adapt_many = lambda *args: (calls.append(len(args[1])), adapt_many(*args))[1]
    view = users.view("new", features(seed=4))
    expected = adapt_from_scratch(users, [3, 5], [5.0, 2.0], user=features(seed=4))
    assert calls == [1] and torch.allclose(scores(users, view), expected, atol=1e-6)
    stored = users.store.get("new")
    assert stored.fresh and stored.version == 1
    kept = decode_state(stored.blob, "v1", torch.device("cpu"))["features"]
    assert all(torch.equal(a, b) for a, b in zip(kept, features(seed=4), strict=True))
    # The same features again (or none given): the cached state is served.
    assert torch.allclose(scores(users, users.view("new", features(seed=4))), expected, atol=1e-6)
    assert torch.allclose(
        scores(users, users.view("new", features(), authoritative=False)), expected, atol=1e-6
    )
    assert calls == [1]


def test_after_a_model_change_a_new_users_features_are_kept_only_with_the_same_encoding(users):
    def served(tag, key):
        return RealtimeUsers(users.personaliser, users.store, ITEM_INDEX, {}, tag, STEPS, features_key=key)

    served("v1", "enc-1").record("new", [Rating("i3", 5.0)], features(seed=3))
    for key, seed in (("enc-1", 3), ("enc-2", 0), (None, 0)):
        (read,) = served(f"v2-{key}", key).stored_features([("new", features())])
        assert torch.equal(read.cat, features(seed=seed).cat), key
    other = served("v2", "enc-1")
    view = other.view("new", features(), authoritative=False)
    assert torch.equal(view.features.cat, features(seed=3).cat)
    expected = adapt_from_scratch(users, [3], [5.0], user=features(seed=3))
    assert torch.allclose(scores(other, view), expected, atol=1e-6)
    # Stored again with them under the new tag.
    kept = decode_state(users.store.get("new").blob, "v2", torch.device("cpu"))["features"]
    assert torch.equal(kept[0], features(seed=3).cat)


def test_stale_or_foreign_states_are_recomputed(users, model):
    users.record("u", [Rating("i4", 5.0)], features())
    other = RealtimeUsers(users.personaliser, users.store, ITEM_INDEX, {}, "v2", STEPS)
    view = other.view("u", features())
    assert torch.allclose(scores(other, view), adapt_from_scratch(users, [4], [5.0]), atol=1e-6)
    # The recomputed state replaces the foreign one at the same feedback version, so the new model reads
    # its cache from then on instead of re-adapting on every request until the user's next feedback
    # (during a rolling update the two models may replace each other's state: extra adaptations while
    # both serve, never a wrong answer).
    stored = users.store.get("u")
    assert stored.fresh and decode_state(stored.blob, "v2", torch.device("cpu")) is not None
    assert decode_state(stored.blob, "v1", torch.device("cpu")) is None


def replayed_window(sent: dict[int, Rating]) -> list[Rating]:
    """The window a sequential replay of ratings, by the version their append got, ends at: the latest
    rating of each item, in order of those ratings."""
    latest: dict[str, Rating] = {}
    for version in sorted(sent):
        latest.pop(sent[version].item_id, None)
        latest[sent[version].item_id] = sent[version]
    return list(latest.values())


def test_concurrent_feedback_loses_nothing_and_ends_at_the_sequential_state(users):
    """8 clients x 50 ratings (over 30 items) for one user: 400 appends, none lost (the window is what
    replaying them in the order they were appended gives); the stored state is the sequential replay's."""
    clients, count = 8, 50
    sent: dict[int, Rating] = {}

    def client(c):
        for n in range(count):
            item = (c * count + n) % N_ITEMS
            rating = Rating(f"i{item}", 1.0 + (c + n) % 5, float(c * count + n))
            sent[users.record("busy", [rating], features()).version] = rating

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    stored = users.store.get("busy")
    assert stored.version == clients * count and sorted(sent) == list(range(1, clients * count + 1))
    assert stored.ratings == replayed_window(sent) and len(stored.ratings) == N_ITEMS
    assert stored.fresh
    final = users.view("busy", features())
    items, ratings = users.support("busy", stored)
    expected = adapt_from_scratch(users, items, ratings)
    assert torch.allclose(scores(users, final), expected, atol=1e-6)


def test_a_rerating_of_a_history_item_outlives_many_ratings_of_other_items(model, store_url):  # noqa: F811
    """window 3: "known" re-rates history item i2 (1.0 -> 5.0), then sends 20 ratings of two items: the
    support keeps i2 at 5.0 (a window of raw ratings lost the re-rating, and the history's 1.0 came back)."""
    store = open_store(store_url, window=3)
    personaliser = Personaliser(Adapter(model, AdaptSettings.from_dict(mode="head", inner_lr=0.3), fast=True))
    small = RealtimeUsers(personaliser, store, ITEM_INDEX, HISTORY, "v1", STEPS)
    try:
        small.record("known", [Rating("i2", 5.0)], features())
        for n in range(10):
            view = small.record("known", [Rating("i3", 1.0 + n % 5), Rating("i4", 2.0)], features())
        assert (view.support_items, view.support_ratings) == ([2, 3, 4], [5.0, 5.0, 2.0])
    finally:
        store.close()


def test_record_many_appends_all_and_adapts_each_user_once_in_one_pass(users):
    calls = []
    adapt_many = users.personaliser.adapt_many

    def counted(features_list, supports, steps):
        calls.append(len(supports))
        return adapt_many(features_list, supports, steps)

    users.personaliser.adapt_many = counted
    entries = [
        ("known", [Rating("i7", 2.0)], features(), True),
        ("fresh", [Rating("i3", 5.0), Rating("i4", 1.0)], features(seed=2), True),
        ("known", [Rating("i2", 5.0)], features(), True),
    ]
    views = users.record_many(entries)
    assert calls == [2]
    # "known" twice: both entries see the state after both appends.
    assert [(v.version, v.support_items) for v in views] == [(2, [1, 7, 2]), (1, [3, 4]), (2, [1, 7, 2])]
    assert views[0] is views[2]
    assert torch.allclose(
        scores(users, views[0]), adapt_from_scratch(users, [1, 7, 2], [4.0, 2.0, 5.0]), atol=1e-6
    )
    expected = adapt_from_scratch(users, [3, 4], [5.0, 1.0], user=features(seed=2))
    assert torch.allclose(scores(users, views[1]), expected, atol=1e-6)
    assert users.store.get("known").fresh and users.store.get("fresh").fresh
    assert users.record_many([]) == []


def test_concurrent_feedback_batches_lose_nothing_and_end_at_the_sequential_state(users):
    """8 clients x 50 ratings for one user, sent as record_many batches of 5 (a worker's batch)."""
    clients, count, batch = 8, 50, 5
    sent: dict[int, Rating] = {}

    def client(c):
        for start in range(0, count, batch):
            entries = [
                (
                    "batched",
                    [Rating(f"i{(c * count + n) % N_ITEMS}", 1.0 + (c + n) % 5, float(n))],
                    features(),
                    True,
                )
                for n in range(start, start + batch)
            ]
            final = users.record_many(entries)[-1].version
            # A batch's appends are one transaction (one script call): consecutive versions.
            for position, (_, ratings, _, _) in enumerate(entries):
                sent[final - batch + 1 + position] = ratings[0]

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    stored = users.store.get("batched")
    assert stored.version == clients * count and sorted(sent) == list(range(1, clients * count + 1))
    assert stored.ratings == replayed_window(sent) and len(stored.ratings) == N_ITEMS and stored.fresh
    items, ratings = users.support("batched", stored)
    final = users.view("batched", features())
    assert torch.allclose(scores(users, final), adapt_from_scratch(users, items, ratings), atol=1e-6)


def test_a_re_adaptation_in_flight_when_the_user_is_forgotten_and_comes_back_is_not_stored(users):
    """forget racing feedback through serving: the state adapted from the erased ratings lands after the
    user came back with as many new ones (same version); it carries the incarnation it was read under,
    so the store refuses it and the returning user is adapted on their new ratings only."""
    store = users.store
    put_states = store.put_states

    def forgotten_meanwhile(entries):
        # The state is computed; before it is written the user is forgotten and sends new feedback.
        store.delete("u1")
        store.append("u1", [Rating("i9", 1.0, 20.0)])
        return put_states(entries)

    store.put_states = forgotten_meanwhile
    users.record("u1", [Rating("i3", 5.0, 10.0)], features())
    store.put_states = put_states
    again = store.get("u1")
    assert again.version == 1 and again.blob is None  # the erased ratings' state was refused
    view = users.view("u1", features())
    assert (view.support_items, view.support_ratings) == ([9], [1.0])
    assert torch.allclose(scores(users, view), adapt_from_scratch(users, [9], [1.0]), atol=1e-6)
