"""The Recommender's real-time loop in-process: known users from history, feedback, new users who adapt,
explanations, and bad feedback that stores nothing (same code path as the handler, no TorchServe)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import redis_server
import torch
from demo_model import build_demo_model
from serving_cases import answer_all
from test_recommender import one_torch_thread  # noqa: F401 - autouse fixture

from metarec.realtime import HISTORY_FILE, write_history
from metarec.recommender import Recommender
from metarec.serving_settings import RequestLimits
from metarec.state.blob import decode_state
from metarec.state.local_redis import start_redis, stop_redis
from metarec.state.open import open_store

redis_url = redis_server.redis_url  # a real redis-server for the module (fixture)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    paths = build_demo_model(tmp_path_factory.mktemp("rt-rec"), meta_steps=150)
    model = paths["model"]
    shutil.copyfile(paths["preprocessed"] / "schema.json", model / "schema.json")
    write_history(paths["preprocessed"], model / HISTORY_FILE, window=200)
    return paths


@pytest.fixture
def rec(demo, tmp_path):
    recommender = Recommender.from_dir(
        demo["model"], catalogue_dir=demo["preprocessed"], store=open_store(f"sqlite:///{tmp_path / 's.db'}")
    )
    yield recommender
    recommender.store.close()


def ask(rec, body, route=""):
    """One request through the serving protocol layer (validation, routing) and the Recommender."""
    ((status, document),) = answer_all(rec, [body], [route])
    return status, document


def test_without_a_store_feedback_and_new_users_are_refused(demo):
    rec = Recommender.from_dir(demo["model"], catalogue_dir=demo["preprocessed"])
    status, answer = ask(
        rec, {"user_id": "new", "ratings": [{"item_id": rec.item_ids[0], "rating": 4}]}, "feedback"
    )
    assert status == 404 and "state store" in answer["message"]
    status, answer = ask(
        rec, {"user_id": "new", "support": [{"item_id": rec.item_ids[0], "rating": 4}]}, "adapt"
    )
    assert status == 404 and "unknown user_id" in answer["message"]


def test_without_a_store_known_users_are_still_personalised_from_history(rec, demo):
    """The multi-replica manifests run with METAREC_STATE_URL=none: a known user must still be ranked from
    the archive's history (as docs/realtime.md and the manifests say), exactly as with a store that holds
    no feedback for them, not given the prior with their rated items back."""
    stateless = Recommender.from_dir(demo["model"], catalogue_dir=demo["preprocessed"])
    history = pd.read_parquet(demo["model"] / HISTORY_FILE)
    user_id = str(history["user_id"].iloc[0])
    status, answer = ask(stateless, {"user_id": user_id, "k": 10})
    assert status == 200 and answer["personalised"] is True
    assert answer == ask(rec, {"user_id": user_id, "k": 10})[1]


def test_without_a_store_a_worker_adapts_each_history_user_once(demo, monkeypatch):
    """A history is fixed while its archive is served, so a server without a store keeps each known user's
    state in the worker (bounded, least recently used dropped) instead of adapting them at every request;
    a kept state answers exactly as a fresh adaptation does."""
    stateless = Recommender.from_dir(demo["model"], catalogue_dir=demo["preprocessed"])
    calls = _counting_adapts(stateless, monkeypatch)
    history = pd.read_parquet(demo["model"] / HISTORY_FILE)
    first, second = (str(u) for u in history["user_id"].unique()[:2])
    answer = ask(stateless, {"user_id": first, "k": 10})[1]
    assert ask(stateless, {"user_id": first, "k": 10})[1] == answer and calls == [1]
    stateless.history_users.store.capacity = 1  # room for one user: the other is dropped and re-adapted
    ask(stateless, {"user_id": second, "k": 10})
    assert ask(stateless, {"user_id": first, "k": 10})[1] == answer and calls == [1, 1, 1]


def test_known_user_ranked_from_history_without_rated_items(rec, demo):
    history = pd.read_parquet(demo["model"] / HISTORY_FILE)
    user_id = str(history["user_id"].iloc[0])
    rated = set(history.loc[history["user_id"] == user_id, "item_id"])
    status, answer = ask(rec, {"user_id": user_id, "k": 100})
    assert status == 200 and answer["personalised"] and answer["support_size"] == len(rated)
    assert rated.isdisjoint(e["item_id"] for e in answer["items"])
    assert len(answer["items"]) == len(rec.item_ids) - len(rated)
    prior = rec.personaliser.score(rec.known_user(user_id), None, torch.arange(rec.model.n_items))
    scores = {e["item_id"]: e["score"] for e in answer["items"]}
    assert max(abs(scores[i] - float(prior[rec.item_index[i]])) for i in scores) > 0.05


def test_feedback_appends_readapts_and_answers_top_k(rec):
    items = rec.item_ids
    status, first = ask(rec, {"user_id": "fresh", "ratings": [{"item_id": items[0], "rating": 5, "timestamp": 1}]},
                        "feedback")  # fmt: skip
    assert status == 200 and first["stored"] and first["state_version"] == 1 and "items" not in first
    status, second = ask(rec, {"user_id": "fresh", "ratings": [{"item_id": items[1], "rating": 1}], "k": 4},
                         "feedback")  # fmt: skip
    assert status == 200 and second["state_version"] == 2 and second["support_size"] == 2
    assert len(second["items"]) == 4 and {items[0], items[1]}.isdisjoint(
        e["item_id"] for e in second["items"]
    )
    # The same ranking as an adapt request on the same ratings (same loop, same steps).
    support = [{"item_id": items[0], "rating": 5}, {"item_id": items[1], "rating": 1}]
    status, adapted = ask(rec, {"user": {}, "support": support, "k": 4}, "adapt")
    assert [e["item_id"] for e in adapted["items"]] == [e["item_id"] for e in second["items"]]
    status, later = ask(rec, {"user_id": "fresh", "k": 4})
    assert later["items"] == second["items"] and later["state_version"] == 2


def test_bad_feedback_stores_nothing(rec):
    good = {"item_id": rec.item_ids[0], "rating": 4}
    bad = [
        ({"item_id": "nope", "rating": 4}, 400),
        ({"item_id": rec.item_ids[1], "rating": 6}, 400),
        ({"item_id": rec.item_ids[1], "rating": float("nan")}, 400),
        ({"item_id": rec.item_ids[1], "rating": 4, "timestamp": "yesterday"}, 400),
        ({"item_id": rec.item_ids[1], "rating": 4, "mood": "happy"}, 400),
    ]
    for entry, expected in bad:
        status, answer = ask(rec, {"user_id": "careful", "ratings": [good, entry]}, "feedback")
        assert status == expected, answer
    status, answer = ask(rec, {"user_id": "careful", "ratings": [good] * 101}, "feedback")
    assert status == 413 and "at most 100" in answer["message"]
    assert rec.store.get("careful") is None


def test_a_user_id_the_store_cannot_hold_is_refused_alone_in_its_batch(rec):
    """A lone surrogate (valid JSON ``"\\ud800"``, not encodable as UTF-8) used to raise in the store's
    read and fail the whole batch with 503, losing its good feedback; an empty, over-long or control
    character id fails the same way only its own request."""
    items = rec.item_ids
    good_feedback = {"user_id": "neighbour", "ratings": [{"item_id": items[0], "rating": 4}]}
    good = [(good_feedback, "feedback"), ({"user_id": "1", "k": 3}, ""),
            ({"support": [{"item_id": items[1], "rating": 5}], "k": 3}, "adapt")]  # fmt: skip
    bad = [
        (b'{"user_id": "\\ud800", "k": 3}', "", "not valid Unicode"),
        (b'{"user_id": "x\\udfff", "ratings": [{"item_id": "1", "rating": 4}]}', "feedback", "not valid Unicode"),
        (b'{"user_id": "\\ud800", "support": [{"item_id": "1", "rating": 4}]}', "adapt", "not valid Unicode"),
        (b'{"user_id": "", "support": [{"item_id": "1", "rating": 4}]}', "adapt", "must not be empty"),
        (b'{"user_id": "a\\nrealtime user=1", "k": 3}', "", "control characters"),
        (json.dumps({"user_id": "L" * 257, "ratings": [{"item_id": "1", "rating": 4}]}).encode(), "feedback",
         "257 characters; at most 256"),
        # Item ids are checked against the catalogue, whose ids are all valid text: a 400 as well.
        (b'{"user_id": "n2", "ratings": [{"item_id": "\\ud800", "rating": 4}]}', "feedback", "unknown item id"),
        (b'{"support": [{"item_id": "\\ud800", "rating": 4}], "candidates": ["\\udfff"]}', "adapt", "unknown item"),
    ]  # fmt: skip
    mixed = answer_all(
        rec, [b for b, _, _ in bad] + [g for g, _ in good], [r for _, r, _ in bad] + [r for _, r in good]
    )
    for (status, answer), (_, _, fragment) in zip(mixed, bad, strict=False):
        assert status == 400 and fragment in answer["message"], answer
    assert [status for status, _ in mixed[len(bad) :]] == [200, 200, 200]
    assert rec.store.get("neighbour").version == 1  # the good feedback of the batch was stored
    alone = answer_all(rec, [g for g, _ in good[1:]], [r for _, r in good[1:]])
    assert mixed[len(bad) + 1 :] == alone


def test_feedback_keeps_the_rating_sent_last_and_user_ids_are_exact_text(rec):
    """docs/openapi.yaml: an item rated again keeps the rating sent last whatever its timestamp (the
    window is in order of arrival); a JSON integer id is its decimal text, any other spelling another
    user."""
    items = rec.item_ids
    later = {"user_id": 9001, "ratings": [{"item_id": items[0], "rating": 5, "timestamp": 2000}]}
    earlier = {"user_id": "9001", "ratings": [{"item_id": items[0], "rating": 1, "timestamp": 1000},
                                              {"item_id": items[1], "rating": 2}, {"item_id": items[1], "rating": 4}]}  # fmt: skip
    assert ask(rec, later, "feedback")[0] == 200 and ask(rec, earlier, "feedback")[0] == 200
    stored = rec.store.get("9001")
    assert [(r.item_id, r.rating, r.timestamp) for r in stored.ratings] == [
        (items[0], 1.0, 1000.0), (items[1], 4.0, None)
    ]  # fmt: skip
    assert stored.version == 2 and ask(rec, {"user_id": 9001, "k": 2})[1]["support_size"] == 2
    for other in (" 9001", "9001 ", "+9001"):
        status, answer = ask(rec, {"user_id": other, "k": 2})
        assert status == 404 and "unknown user_id" in answer["message"]


def test_adapt_with_a_new_user_id_stores_the_user(rec):
    support = [{"item_id": rec.item_ids[n], "rating": 5 if n % 2 else 1} for n in range(6)]
    status, adapted = ask(
        rec, {"user_id": "adapter", "user": {"age": 30}, "support": support, "k": 5}, "adapt"
    )
    assert status == 200 and adapted["stored"] and adapted["state_version"] == 1
    status, later = ask(rec, {"user_id": "adapter", "k": 5})
    assert later["personalised"] and [e["item_id"] for e in later["items"]] == [
        e["item_id"] for e in adapted["items"]
    ]


def test_adapt_naming_a_described_new_user_scores_with_their_stored_features(rec):
    """A new user who described themselves in feedback is scored with those features later: by plain
    recommend, and (it used to be with no features at all) by an adapt that only names them."""
    features = {"age": 60, "gender": "F", "occupation": "retired"}
    items = rec.item_ids
    rated = {"user_id": "feat-user-7", "user": features, "ratings": [{"item_id": items[4], "rating": 5}]}
    assert ask(rec, rated, "feedback")[0] == 200
    support = [{"item_id": items[6], "rating": 2}, {"item_id": items[9], "rating": 5}]
    asks = {"support": support, "k": 5, "explain": True}
    (status, named), (_, described), (_, anonymous) = answer_all(
        rec, [{"user_id": "feat-user-7", **asks}, {"user": features, **asks}, asks], ["adapt"] * 3
    )
    assert status == 200 and "stored" not in named  # a what-if for a user the server already has
    assert named["items"] == described["items"]  # scores and explanations
    assert named["support_loss_before"] == described["support_loss_before"]
    assert [e["score"] for e in named["items"]] != [e["score"] for e in anonymous["items"]]
    # Features given in the request still win over the stored ones.
    (_, own), (_, direct) = answer_all(
        rec,
        [{"user_id": "feat-user-7", "user": {"age": 20}, **asks}, {"user": {"age": 20}, **asks}],
        ["adapt"] * 2,
    )
    assert own["items"] == direct["items"]


def test_a_stored_new_user_described_anew_is_served_explained_and_stored_with_the_new_features(rec):
    """A new user rated with features A, then recommended naming them with features B: the cached state
    (adapted with A) was served scored with B, and the explanation (computed with B) did not add up to
    the served score. A state adapted with other features than the request's is now stale: re-adapted
    with B and stored with B, so a later plain request is served with B too."""
    first = {"age": 65, "gender": "F", "occupation": "retired", "zip": "12345"}
    second = {"age": 18, "gender": "M", "occupation": "student", "zip": "99999"}
    items = rec.item_ids
    support = [{"item_id": items[i], "rating": 1 + (i * 3) % 5} for i in range(6)]
    assert ask(rec, {"user_id": "nf", "user": first, "ratings": support}, "feedback")[0] == 200
    status, served = ask(rec, {"user_id": "nf", "user": second, "k": 4, "explain": True})
    assert status == 200 and served["items"]
    for entry in served["items"]:
        assert abs(entry["explanation"]["score"] - entry["score"]) <= 5.1e-5, (
            entry
        )  # scores are rounded to 1e-4
    _, described = ask(rec, {"user": second, "support": support, "k": 4}, "adapt")
    assert [e["item_id"] for e in served["items"]] == [e["item_id"] for e in described["items"]]
    assert [e["score"] for e in served["items"]] == pytest.approx(
        [e["score"] for e in described["items"]], abs=1e-4
    )
    # Stored with the new features: the same as those of a user who gave them in feedback.
    assert ask(rec, {"user_id": "nf-second", "user": second, "ratings": support}, "feedback")[0] == 200
    kept = [
        decode_state(rec.store.get(u).blob, rec.state_tag, torch.device("cpu")) for u in ("nf", "nf-second")
    ]
    assert rec.store.get("nf").fresh and rec.store.get("nf").version == 1
    assert all(torch.equal(a, b) for a, b in zip(kept[0]["features"], kept[1]["features"], strict=True))
    _, plain = ask(rec, {"user_id": "nf", "k": 4})
    assert [e["score"] for e in plain["items"]] == [e["score"] for e in served["items"]]


def _check_explanations(items):
    assert items
    for entry in items:
        why = entry["explanation"]
        assert abs(why["score"] - why["prior"] - why["from_ratings"]) < 1e-9
        assert abs(why["score"] - entry["score"]) < 1e-3
        named = sum(r["contribution"] for r in why["ratings"])
        assert abs(why["from_ratings"] - named - why["other_ratings"]) < 1e-9
        shares = why["prior_features"]["shares"]
        assert abs(why["prior_features"]["baseline"] + sum(shares.values()) - why["prior"]) < 1e-9


def test_explain_on_every_route(rec):
    items = rec.item_ids
    ratings = [{"item_id": items[n], "rating": 5 if n < 3 else 1} for n in range(6)]
    status, fed = ask(rec, {"user_id": "why", "ratings": ratings, "k": 3, "explain": True}, "feedback")
    assert status == 200
    _check_explanations(fed["items"])
    assert all(len(e["explanation"]["ratings"]) == 5 for e in fed["items"])
    status, recommended = ask(rec, {"user_id": "why", "k": 3, "explain": True})
    _check_explanations(recommended["items"])
    status, adapted = ask(rec, {"user": {}, "support": ratings[:2], "k": 2, "explain": True}, "adapt")
    _check_explanations(adapted["items"])
    status, prior = ask(rec, {"user": {}, "k": 2, "explain": True})
    _check_explanations(prior["items"])
    assert prior["items"][0]["explanation"]["ratings"] == []
    status, answer = ask(rec, {"user": {}, "explain": "yes"})
    assert status == 400 and "'explain' must be true or false" in answer["message"]


def test_explanations_are_capped_per_body(rec):
    """64 explained instances in one body took seconds and a batch of 8 such bodies outlived TorchServe's
    responseTimeout (the worker was killed): at most ``max_explained`` (4) instances of a body may ask."""
    support = [{"item_id": item, "rating": 1 + n % 5} for n, item in enumerate(rec.item_ids[:40])]
    instance = {"support": support, "k": 20, "explain": True}
    capped = {"instances": [instance] * 4 + [{**instance, "explain": False}] * 60}
    over = {"instances": [instance] * 5}
    (status, answer), (refused, error), (neighbour, _) = answer_all(
        rec, [capped, over, {"user_id": "1", "k": 3}], ["adapt", "adapt", ""]
    )
    assert status == 200 and refused == 413 and neighbour == 200
    assert "5 instances ask for 'explain'; at most 4 per body" in error["message"]
    predictions = answer["predictions"]
    assert all("explanation" in e for p in predictions[:4] for e in p["items"])
    assert not any("explanation" in e for p in predictions[4:] for e in p["items"])
    (wider,) = answer_all(rec, [over], ["adapt"], RequestLimits(max_explained=5))
    assert wider[0] == 200


def test_concurrent_feedback_in_process_matches_a_sequential_replay(rec, demo, tmp_path):
    import concurrent.futures

    items = rec.item_ids

    def client(c):
        for n in range(10):
            body = {
                "user_id": "many",
                "ratings": [{"item_id": items[(c * 10 + n) % len(items)], "rating": 1 + (c + n) % 5}],
            }
            assert ask(rec, body, "feedback")[0] == 200

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    stored = rec.store.get("many")
    assert stored.version == 80 and len(stored.ratings) == 80
    _, final = ask(rec, {"user_id": "many", "k": 10})
    # Sequential replay of the stored ratings on a fresh store.
    replay = Recommender.from_dir(
        demo["model"], catalogue_dir=demo["preprocessed"], store=open_store(f"sqlite:///{tmp_path / 'r.db'}")
    )
    for rating in stored.ratings:
        ask(
            replay,
            {"user_id": "many", "ratings": [{"item_id": rating.item_id, "rating": rating.rating}]},
            "feedback",
        )
    _, sequential = ask(replay, {"user_id": "many", "k": 10})
    assert final["items"] == sequential["items"]


def _counting_adapts(rec, monkeypatch) -> list[int]:
    """Counts the Recommender's Adapter.adapt calls (the batch size of each)."""
    calls = []
    adapt = rec.adapter.adapt

    def counted(users, *args, **kwargs):
        calls.append(users.cat.shape[0])
        return adapt(users, *args, **kwargs)

    monkeypatch.setattr(rec.adapter, "adapt", counted)
    return calls


def _stored_params(rec, user_id):
    stored = rec.store.get(user_id)
    document = decode_state(stored.blob, rec.state_tag, torch.device("cpu"))
    return stored, document["params"]


def _same_answers(batched, sequential):
    for (status_b, got), (status_s, want) in zip(batched, sequential, strict=True):
        assert status_b == status_s == 200, (got, want)
        assert {k: v for k, v in got.items() if k != "items"} == {
            k: v for k, v in want.items() if k != "items"
        }
        assert [e["item_id"] for e in got.get("items", [])] == [e["item_id"] for e in want.get("items", [])]
        for mine, theirs in zip(got.get("items", []), want.get("items", []), strict=True):
            assert abs(mine["score"] - theirs["score"]) <= 2e-4


def _feedback_recommenders(demo, tmp_path):
    return [
        Recommender.from_dir(
            demo["model"],
            catalogue_dir=demo["preprocessed"],
            store=open_store(f"sqlite:///{tmp_path / name}"),
        )
        for name in ("batched.db", "sequential.db")
    ]


def test_a_feedback_batch_adapts_once_and_matches_sequential_single_requests(demo, tmp_path, monkeypatch):
    """N feedback requests in one batch: one Adapter.adapt call for all of them, and the same answers
    and stored states as the same requests sent one at a time."""
    batched, sequential = _feedback_recommenders(demo, tmp_path)
    items = batched.item_ids
    known = str(pd.read_parquet(demo["model"] / HISTORY_FILE)["user_id"].iloc[0])
    bodies = [
        {"user_id": known, "ratings": [{"item_id": items[5], "rating": 1}], "k": 5},
        {
            "user_id": "b-new",
            "ratings": [{"item_id": items[n], "rating": 1 + n % 5} for n in range(7)],
            "k": 3,
        },
        {"user_id": "b-plain", "ratings": [{"item_id": items[9], "rating": 4}]},
        {
            "user_id": "b-described",
            "user": {"age": 30},
            "ratings": [{"item_id": items[2], "rating": 5}],
            "k": 4,
        },
        {
            "user_id": "b-many",
            "ratings": [{"item_id": items[n], "rating": 3} for n in range(20, 45)],
            "k": 10,
        },
        {
            "user_id": "b-ranked",
            "ratings": [{"item_id": items[3], "rating": 2}],
            "k": 100,
            "include_rated": True,
        },
    ]
    for rec in (batched, sequential):  # an earlier state, so that the batch re-adapts over stored ones
        assert (
            ask(rec, {"user_id": "b-new", "ratings": [{"item_id": items[50], "rating": 2}]}, "feedback")[0]
            == 200
        )
    calls = _counting_adapts(batched, monkeypatch)
    got = answer_all(batched, bodies, ["feedback"] * len(bodies))
    assert calls == [len(bodies)]
    want = [ask(sequential, body, "feedback") for body in bodies]
    _same_answers(got, want)
    assert [answer["state_version"] for _, answer in got] == [1, 2, 1, 1, 1, 1]
    for body in bodies:
        (mine, mine_params), (theirs, their_params) = (
            _stored_params(r, body["user_id"]) for r in (batched, sequential)
        )
        assert (
            mine.fresh and theirs.fresh and mine.version == theirs.version and mine.ratings == theirs.ratings
        )
        for name, tensor in their_params.items():
            assert mine_params[name].shape == tensor.shape
            assert torch.allclose(mine_params[name], tensor, atol=1e-5), name
    # The stored states answer later recommends as the sequential ones do.
    later = answer_all(batched, [{"user_id": b["user_id"], "k": 5} for b in bodies], [""] * len(bodies))
    _same_answers(later, [ask(sequential, {"user_id": b["user_id"], "k": 5}) for b in bodies])


def test_a_user_twice_in_a_feedback_batch_is_adapted_once_on_the_final_window(demo, tmp_path, monkeypatch):
    batched, sequential = _feedback_recommenders(demo, tmp_path)
    items = batched.item_ids
    bodies = [
        {"user_id": "twice", "user": {"age": 40}, "ratings": [{"item_id": items[1], "rating": 5}], "k": 3},
        {"user_id": "other", "ratings": [{"item_id": items[2], "rating": 1}]},
        {"user_id": "twice", "ratings": [{"item_id": items[3], "rating": 1}, {"item_id": items[1], "rating": 2}],
         "k": 3},
    ]  # fmt: skip
    calls = _counting_adapts(batched, monkeypatch)
    got = answer_all(batched, bodies, ["feedback"] * len(bodies))
    assert calls == [2]  # "twice" and "other", one pass
    # Both of the user's requests are answered from the state after both (item 1's latest rating wins).
    assert [(a["state_version"], a["support_size"]) for _, a in got] == [(2, 2), (1, 1), (2, 2)]
    assert got[0][1]["items"] == got[2][1]["items"]
    want = [ask(sequential, body, "feedback") for body in bodies]
    _same_answers(got[1:], want[1:])  # the last request's answer is the sequential one's
    (mine, mine_params), (theirs, their_params) = (_stored_params(r, "twice") for r in (batched, sequential))
    assert mine.ratings == theirs.ratings and mine.version == theirs.version == 2 and mine.fresh
    assert all(torch.allclose(mine_params[name], their_params[name], atol=1e-5) for name in their_params)
    # The first request described the user: the stored state keeps those features, as in turn.
    mine_doc = decode_state(mine.blob, batched.state_tag, torch.device("cpu"))
    their_doc = decode_state(theirs.blob, sequential.state_tag, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(mine_doc["features"], their_doc["features"], strict=True))


def test_an_adapt_batch_stores_its_new_users_in_one_pass(demo, tmp_path, monkeypatch):
    batched, sequential = _feedback_recommenders(demo, tmp_path)
    items = batched.item_ids
    bodies = [
        {"user_id": f"a-{n}", "support": [{"item_id": items[n + m], "rating": 1 + (n + m) % 5} for m in range(3 + n)],
         "k": 4}
        for n in range(4)
    ] + [{"user_id": "a-0", "support": [{"item_id": items[70], "rating": 5}], "k": 4}]  # fmt: skip
    calls = _counting_adapts(batched, monkeypatch)
    got = answer_all(batched, bodies, ["adapt"] * len(bodies))
    assert calls == [5, 4]  # the answers (one steps group), then the four new users' stored states
    # The second a-0 request came after the first had created the user: a what-if, nothing stored.
    assert [a.get("stored") for _, a in got] == [True] * 4 + [None]
    want = [ask(sequential, body, "adapt") for body in bodies]
    _same_answers(got, want)
    for n in range(4):
        (mine, mine_params), (theirs, their_params) = (
            _stored_params(r, f"a-{n}") for r in (batched, sequential)
        )
        assert mine.ratings == theirs.ratings and mine.version == theirs.version == 1
        assert all(torch.allclose(mine_params[k], their_params[k], atol=1e-5) for k in their_params)


def test_handler_keeps_the_embedded_store_in_its_working_directory(monkeypatch, tmp_path):
    import tempfile

    from metarec.serving import handler

    monkeypatch.chdir(tmp_path)
    assert handler.default_state_url() == f"sqlite:///{tmp_path / handler.STATE_FILE}"
    # A read-only working directory (the hardened pod's root filesystem): the temporary directory.
    monkeypatch.setattr(handler.os, "access", lambda path, mode: False)
    assert handler.default_state_url() == f"sqlite:///{Path(tempfile.gettempdir()) / handler.STATE_FILE}"


def test_include_rated_keeps_the_support_items_of_an_adapt_request(rec):
    support = [{"item_id": rec.item_ids[n], "rating": 5} for n in range(3)]
    n_items = len(rec.item_ids)
    _, without = ask(rec, {"user": {}, "support": support, "k": 100}, "adapt")
    _, with_rated = ask(rec, {"user": {}, "support": support, "k": 100, "include_rated": True}, "adapt")
    assert len(without["items"]) == n_items - 3 and len(with_rated["items"]) == n_items


def test_two_replicas_share_users_through_redis(demo, redis_url):
    """Two Recommenders (two replicas) on one real Redis: a write through one is read by the other."""
    store = open_store(redis_url)
    store.client.flushdb()
    store.close()
    replicas = [
        Recommender.from_dir(demo["model"], catalogue_dir=demo["preprocessed"], store=open_store(redis_url))
        for _ in range(2)
    ]
    items = replicas[0].item_ids
    for n in range(6):
        writer, reader = replicas[n % 2], replicas[(n + 1) % 2]
        body = {"user_id": "roaming", "ratings": [{"item_id": items[n], "rating": 1 + n % 5}], "k": 3}
        status, written = ask(writer, body, "feedback")
        assert status == 200 and written["state_version"] == n + 1
        status, read = ask(reader, {"user_id": "roaming", "k": 3})
        assert read["state_version"] == n + 1 and read["items"] == written["items"]


def test_answers_carry_the_catalogues_display_fields(demo, tmp_path):
    catalogue = tmp_path / "catalogue"
    shutil.copytree(demo["preprocessed"], catalogue)
    items = pd.read_parquet(catalogue / "items.parquet")
    items["display_title"] = [f"Film {n}" for n in range(len(items))]
    items["display_genres"] = [["Drama", "War"] if n % 2 else None for n in range(len(items))]
    items["display_year"] = [1990.0 + n if n % 3 else float("nan") for n in range(len(items))]
    items["display_score"] = 1.0  # a reserved key: never shown
    items.to_parquet(catalogue / "items.parquet")
    rec = Recommender.from_dir(demo["model"], catalogue_dir=catalogue)
    status, answer = ask(rec, {"user": {}, "k": 100})
    assert status == 200
    for entry in answer["items"]:
        n = rec.item_index[entry["item_id"]]
        assert entry["title"] == f"Film {n}"
        assert entry.get("genres") == (["Drama", "War"] if n % 2 else None)
        assert entry.get("year") == (1990.0 + n if n % 3 else None)
        assert isinstance(entry["score"], float) and entry["score"] != 1.0
    json.dumps(answer, allow_nan=False)


def test_demo_request_shows_titles_when_the_answer_has_them():
    from metarec.demo_request import format_demo

    items = [
        {"item_id": "1", "score": 4.5, "title": "Toy Story", "year": 1995.0},
        {"item_id": "2", "score": 4.2, "title": "Heat (1995)", "year": 1995},
        {"item_id": "3", "score": 4.1},
    ]
    result = {
        "adapted": {"items": items, "support_loss_before": 1.0, "support_loss_after": 0.5, "steps": 5},
        "request": {"url": "http://x", "body": {"support": [{}]}},
        "genre": "Drama",
        "genre_share_before": 0.1,
        "genre_share_after": 0.5,
    }
    lines = format_demo(result).splitlines()
    assert "  4.50  Toy Story (1995)" in lines and "  4.20  Heat (1995)" in lines
    assert not any(line.startswith("  4.10") for line in lines)


def test_a_retrained_model_under_the_same_version_recomputes_the_stored_states(demo, tmp_path):
    """Pipeline reruns package every model as version "1.0": a new model meeting the old one's states in
    the same store must recompute them from the ratings, never serve (or crash on) them."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    old = Recommender.from_dir(demo["model"], catalogue_dir=demo["preprocessed"], store=open_store(url))
    items = old.item_ids
    ratings = [{"item_id": items[i], "rating": r} for i, r in ((0, 5), (3, 1), (7, 4))]
    assert ask(old, {"user_id": "carol", "ratings": ratings}, "feedback")[0] == 200

    retrained = Recommender.from_dir(demo["model"], catalogue_dir=demo["preprocessed"], store=open_store(url))
    with torch.no_grad():  # "retraining": other weights, same model card (same version string)
        for parameter in retrained.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    retrained = Recommender(retrained.model, retrained.schema, _items(demo), _users(demo),
                            {"mode": retrained.adapt_mode, "inner_steps": retrained.default_steps,
                             "inner_lr": retrained.inner_lr}, retrained.model_card,
                            store=open_store(url), history=retrained.history)  # fmt: skip
    assert retrained.model_version == old.model_version and retrained.state_tag != old.state_tag
    # Same version, other weights: the answers' model_id tells on-call which training answered.
    anyone = {"user": {"age": 30}, "k": 1}
    assert ask(old, anyone)[1]["model_id"] != ask(retrained, anyone)[1]["model_id"] == retrained.model_id
    # The same model loaded again (another worker, a restart) keeps its tag, and so its cached states;
    # a store with another ratings window does not (its states were adapted on other support sets).
    again = Recommender.from_dir(demo["model"], catalogue_dir=demo["preprocessed"], store=open_store(url))
    assert again.state_tag == old.state_tag
    narrower = Recommender.from_dir(
        demo["model"], catalogue_dir=demo["preprocessed"], store=open_store(url, window=20)
    )
    assert narrower.state_tag != old.state_tag
    fresh = Recommender(retrained.model, retrained.schema, _items(demo), _users(demo),
                        {"mode": retrained.adapt_mode, "inner_steps": retrained.default_steps,
                         "inner_lr": retrained.inner_lr}, retrained.model_card,
                        store=open_store(f"sqlite:///{tmp_path / 'fresh.db'}"))  # fmt: skip
    assert ask(fresh, {"user_id": "carol", "ratings": ratings}, "feedback")[0] == 200

    old_answer = ask(old, {"user_id": "carol", "k": 5})[1]["items"]  # from its own cached state
    status, answer = ask(retrained, {"user_id": "carol", "k": 5})
    assert status == 200 and answer["personalised"]
    # Exactly what the retrained model computes from carol's ratings, not the old model's state.
    assert answer["items"] == ask(fresh, {"user_id": "carol", "k": 5})[1]["items"]
    assert answer["items"] != old_answer
    # The recomputed state replaced the old one in the store (the next read is served from it).
    stored = retrained.store.get("carol")
    assert stored.fresh and decode_state(stored.blob, retrained.state_tag, torch.device("cpu")) is not None
    assert decode_state(stored.blob, old.state_tag, torch.device("cpu")) is None


def test_a_model_change_keeps_a_new_users_features_when_the_feature_encoding_is_the_same(demo, tmp_path):
    """A new user described themselves under one model; a retrained model (another state tag) over the
    same store rejected the whole blob and re-adapted them with no features, storing none: lost for
    good. The features are kept when both models encode user features the same way (same fingerprint of
    the schema's user features), and still dropped when the encoding differs."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    old = Recommender.from_dir(demo["model"], catalogue_dir=demo["preprocessed"], store=open_store(url))
    items = old.item_ids
    described = {"age": 65, "gender": "F", "occupation": "retired"}
    ratings = [{"item_id": items[i], "rating": r} for i, r in ((0, 5), (3, 1), (7, 4))]
    assert ask(old, {"user_id": "dora", "user": described, "ratings": ratings}, "feedback")[0] == 200

    def retrained(schema):
        base = Recommender.from_dir(demo["model"], catalogue_dir=demo["preprocessed"])
        with torch.no_grad():
            for parameter in base.model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        return Recommender(base.model, schema, _items(demo), _users(demo),
                           {"mode": base.adapt_mode, "inner_steps": base.default_steps,
                            "inner_lr": base.inner_lr}, base.model_card, store=open_store(url),
                           history=base.history)  # fmt: skip

    new = retrained(old.schema)
    assert new.state_tag != old.state_tag and new.encoder.user_fingerprint == old.encoder.user_fingerprint
    status, answer = ask(new, {"user_id": "dora", "k": 5})
    expected = ask(new, {"user": described, "support": ratings, "k": 5}, "adapt")[1]
    assert status == 200 and answer["items"] == expected["items"]
    assert answer["items"] != ask(new, {"support": ratings, "k": 5}, "adapt")[1]["items"]
    # Stored again with the features, under the new tag: the next plain request reads them from there.
    stored = new.store.get("dora")
    assert (
        stored.fresh and decode_state(stored.blob, new.state_tag, torch.device("cpu"))["features"] is not None
    )
    assert ask(new, {"user_id": "dora", "k": 5})[1]["items"] == expected["items"]

    # Another encoding of user features (a vocabulary changed): the old features mean nothing there.
    schema = json.loads(json.dumps(new.schema))
    occupation = next(f for f in schema["user_features"] if f["name"] == "occupation")
    occupation["vocab"] = list(reversed(occupation["vocab"]))
    other = retrained(schema)
    assert other.encoder.user_fingerprint != new.encoder.user_fingerprint
    status, answer = ask(other, {"user_id": "dora", "k": 5})
    assert status == 200 and answer["items"] == ask(other, {"support": ratings, "k": 5}, "adapt")[1]["items"]


def test_a_model_of_another_feature_encoding_keeps_the_other_models_features_of_a_new_user(demo, tmp_path):
    """A rolling update (or a rollback): the old model and a retrained one, whose user features encode
    otherwise (a refitted standardisation), serve over one store. A new user described themselves to the
    old model; one plain recommend on the new model replaced the blob with its own, holding no features
    the old model can read, so the old model served them without their features from then on (and a
    rollback lost them for good). The new model's blob now carries the old encoding's features along."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    old = Recommender.from_dir(demo["model"], catalogue_dir=demo["preprocessed"], store=open_store(url))
    base = Recommender.from_dir(demo["model"], catalogue_dir=demo["preprocessed"])
    schema = json.loads(json.dumps(base.schema))
    age = next(f for f in schema["user_features"] if f["name"] == "age")
    age["mean"] = float(age["mean"]) + 1.0  # retrained on more users: another standardisation
    with torch.no_grad():
        for parameter in base.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    new = Recommender(base.model, schema, _items(demo), _users(demo),
                      {"mode": base.adapt_mode, "inner_steps": base.default_steps, "inner_lr": base.inner_lr},
                      {"version": "2.0"}, store=open_store(url), history=base.history)  # fmt: skip
    assert new.encoder.user_fingerprint != old.encoder.user_fingerprint
    items = old.item_ids
    described = {"age": 65, "gender": "F", "occupation": "retired"}
    ratings = [{"item_id": items[i], "rating": r} for i, r in ((0, 5), (3, 1), (7, 4))]
    assert ask(old, {"user_id": "dora", "user": described, "ratings": ratings}, "feedback")[0] == 200
    expected = ask(old, {"user": described, "support": ratings, "k": 5}, "adapt")[1]["items"]
    assert ask(old, {"user_id": "dora", "k": 5})[1]["items"] == expected

    for _ in range(2):  # each model in turn replaces the other's blob, twice over
        status, answer = ask(new, {"user_id": "dora", "k": 5})  # the new model cannot read them: none
        assert (
            status == 200 and answer["items"] == ask(new, {"support": ratings, "k": 5}, "adapt")[1]["items"]
        )
        assert ask(old, {"user_id": "dora", "k": 5})[1]["items"] == expected
    # Feedback through the new model keeps them too; the old model adapts on the new window with them.
    more = [{"item_id": items[9], "rating": 2}]
    assert ask(new, {"user_id": "dora", "ratings": more}, "feedback")[0] == 200
    assert (
        ask(old, {"user_id": "dora", "k": 5})[1]["items"]
        == ask(old, {"user": described, "support": ratings + more, "k": 5}, "adapt")[1]["items"]
    )


def _items(demo):
    return pd.read_parquet(demo["preprocessed"] / "items.parquet")


def _users(demo):
    return pd.read_parquet(demo["preprocessed"] / "users.parquet")


def test_an_unavailable_store_refuses_what_needs_it_and_answers_the_rest(demo, tmp_path):
    """Redis out of memory, then stopped: feedback and named users get a 503 naming the store, nothing
    half-stored; anonymous requests are answered, an adapt naming a new user is answered unkept; the
    same Recommender works again once Redis is back."""
    try:
        url, process = start_redis(tmp_path / "redis")
    except FileNotFoundError as error:
        pytest.skip(str(error))
    rec = Recommender.from_dir(demo["model"], catalogue_dir=demo["preprocessed"], store=open_store(url))
    items = rec.item_ids
    known = str(pd.read_parquet(demo["model"] / HISTORY_FILE)["user_id"].iloc[0])
    rate = {"user_id": "outage", "ratings": [{"item_id": items[0], "rating": 5}]}
    support = [{"item_id": items[1], "rating": 4}, {"item_id": items[2], "rating": 1}]
    try:
        assert ask(rec, rate, "feedback")[0] == 200
        # Out of memory: Redis refuses writes and transactions (the reads of a state are one).
        rec.store.client.config_set("maxmemory-policy", "noeviction")
        rec.store.client.config_set("maxmemory", 1)
        bodies = [rate, {"user_id": known, "k": 3}, {"support": support, "k": 3},
                  {"user_id": "new-in-outage", "support": support, "k": 3}]  # fmt: skip
        refused, named, anonymous, new = answer_all(rec, bodies, ["feedback", "", "adapt", "adapt"])
        assert refused[0] == 503 and refused[1]["type"] == "StoreUnavailable"
        assert "127.0.0.1" in refused[1]["message"] and refused[1]["message"].endswith("retry later")
        assert anonymous[0] == 200 and len(anonymous[1]["items"]) == 3
        assert new[0] == 200 and new[1]["stored"] is False and "not kept" in new[1]["notes"][-1]
        assert named[0] == 503
        rec.store.client.config_set("maxmemory", 0)
        assert rec.store.get("outage").version == 1 and rec.store.get("new-in-outage") is None

        # Stopped: everything that reads the store is refused, the rest answered.
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        stop_redis(process)
        bodies = [rate, {"user_id": known}, {"user_id": "outage"}, {"user": {}, "k": 2}, {"support": support},
                  {"user_id": "outage", "support": support}]  # fmt: skip
        answers = answer_all(rec, bodies, ["feedback", "", "", "", "adapt", "adapt"])
        assert [status for status, _ in answers] == [503, 503, 503, 200, 200, 200]
        # An adapt naming a stored user is answered without their stored features, and says so.
        notes = answers[-1][1]["notes"]
        assert "stored features could not be read" in notes[0] and "not kept" in notes[-1]

        # Back (empty: this test's Redis keeps nothing on disk): the same client reconnects.
        url, process = start_redis(tmp_path / "redis-again", port=port)
        status, answer = ask(rec, rate, "feedback")
        assert status == 200 and answer["state_version"] == 1
    finally:
        rec.store.close()
        stop_redis(process)


def test_a_stored_user_refused_while_parsing_is_logged(rec, monkeypatch, caplog):
    """A user only the store knows is looked up while the request is read; a store outage there answers
    503 and logs a `refused` warning like the Recommender's own refusals (the runbook greps for it)."""
    from metarec.state import StoreUnavailableError

    def unavailable(user_id):
        raise StoreUnavailableError("redis://:***@metarec-redis:6379/0", ConnectionError("refused by test"))

    monkeypatch.setattr(rec, "has_state", unavailable)
    with caplog.at_level("WARNING"):
        status, document = ask(rec, {"user_id": "only-in-the-store", "k": 3})
    assert status == 503 and document["type"] == "StoreUnavailable"
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "refused" in r.getMessage()]
    assert len(warnings) == 1 and "metarec-redis" in warnings[0].getMessage(), caplog.text


def test_a_state_that_cannot_be_cached_is_still_served(rec, demo):
    """Reads work, writes fail (an unwritable SQLite file): a known user's state is computed and served
    but not cached; it is cached by the first read after the store recovers."""
    known = str(pd.read_parquet(demo["model"] / HISTORY_FILE)["user_id"].iloc[0])
    rec.store._connection().execute("PRAGMA query_only = ON")
    try:
        status, answer = ask(rec, {"user_id": known, "k": 3})
        assert status == 200 and answer["personalised"] and len(answer["items"]) == 3
        assert rec.store.get(known) is None
    finally:
        rec.store._connection().execute("PRAGMA query_only = OFF")
    assert ask(rec, {"user_id": known, "k": 3}) == (status, answer)
    assert rec.store.get(known).blob is not None


def test_forget_erases_a_new_users_ratings_state_and_features(rec):
    """A new user's feedback, state and stored features are gone after forget: the next request that
    only names them is refused as unknown, and forgetting them again erases nothing."""
    items = rec.item_ids
    feedback = {"user_id": "leaver", "user": {"age": 60}, "ratings": [{"item_id": items[0], "rating": 5}]}
    assert ask(rec, feedback, "feedback")[0] == 200
    status, before = ask(rec, {"user_id": "leaver", "k": 3})
    assert status == 200 and before["personalised"] and before["support_size"] == 1
    status, answer = ask(rec, {"user_id": "leaver"}, "forget")
    assert status == 200 and answer == {
        "user_id": "leaver",
        "deleted": True,
        "model_version": rec.model_version,
        "model_id": rec.model_id,
    }
    assert rec.store.get("leaver") is None
    status, after = ask(rec, {"user_id": "leaver", "k": 3})
    assert status == 404 and "unknown user_id" in after["message"]
    assert ask(rec, {"user_id": "leaver"}, "forget")[1]["deleted"] is False
    # Ids are checked as on every route; a KServe body forgets several users.
    ask(rec, {"user_id": "a", "ratings": [{"item_id": items[1], "rating": 2}]}, "feedback")
    status, both = ask(rec, {"instances": [{"user_id": "a"}, {"user_id": 7}]}, "forget")
    assert status == 200 and [(p["user_id"], p["deleted"]) for p in both["predictions"]] == [
        ("a", True),
        ("7", False),
    ]


def test_forget_of_a_history_user_drops_their_feedback_and_keeps_their_history(rec, demo):
    """A known user's stored feedback is erased, so they are ranked as before it (from the archive's
    history, which forget cannot erase: the answer says so)."""
    history = pd.read_parquet(demo["model"] / HISTORY_FILE)
    user_id = str(history["user_id"].iloc[0])
    shipped = int((history["user_id"] == user_id).sum())
    status, before = ask(rec, {"user_id": user_id, "k": 5})
    assert status == 200 and before["support_size"] == shipped
    unrated = [i for i in rec.item_ids if i not in set(history.loc[history["user_id"] == user_id, "item_id"])]
    feedback = {"user_id": user_id, "ratings": [{"item_id": i, "rating": 1} for i in unrated[:8]], "k": 5}
    status, rated = ask(rec, feedback, "feedback")
    assert status == 200 and rated["support_size"] == shipped + 8 and rated["items"] != before["items"]
    status, answer = ask(rec, {"user_id": user_id}, "forget")
    assert status == 200 and answer["deleted"] is True and "history" in answer["notes"][0]
    status, after = ask(rec, {"user_id": user_id, "k": 5})
    assert status == 200 and after["support_size"] == shipped and after["state_version"] == 0
    assert after["items"] == before["items"]


def test_a_state_adapted_while_the_user_is_forgotten_is_not_kept(rec, monkeypatch):
    """Another worker forgets the user while this one re-adapts them after their feedback: the state
    adapted from the erased ratings must not be stored back (it was, as a user of version 0 holding it)."""
    adapt_many = rec.personaliser.adapt_many

    def forgotten_meanwhile(*args, **kwargs):
        states = adapt_many(*args, **kwargs)
        assert ask(rec, {"user_id": "racer"}, "forget")[1]["deleted"] is True
        return states

    monkeypatch.setattr(rec.personaliser, "adapt_many", forgotten_meanwhile)
    feedback = {"user_id": "racer", "ratings": [{"item_id": rec.item_ids[0], "rating": 5}]}
    assert ask(rec, feedback, "feedback")[0] == 200
    assert rec.store.get("racer") is None


def test_a_batch_forgets_after_its_feedback(rec):
    """TorchServe batches a user's feedback and forget together: the forget runs last, so it erases the
    feedback instead of the feedback bringing the user back."""
    feedback = {
        "user_id": "batched",
        "user": {"age": 30},
        "ratings": [{"item_id": rec.item_ids[0], "rating": 4}],
    }
    forget = {"user_id": "batched"}
    (fed, forgot) = answer_all(rec, [feedback, forget], ["feedback", "forget"])
    assert fed[0] == 200 and forgot == (200, {"user_id": "batched", "deleted": True,
                                              **rec.served_by})  # fmt: skip
    assert rec.store.get("batched") is None


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({}, 400, "missing field 'user_id'"),
        ({"user_id": "x", "k": 3}, 400, "unknown field(s) ['k']"),
        ({"user_id": ["x"]}, 400, "'user_id' must be a string or an integer"),
        ({"user_id": ""}, 400, "must not be empty"),
        ({"user_id": "a\nb"}, 400, "control characters"),
        ({"user_id": "L" * 257}, 400, "at most 256"),
        ([1], 400, "must be a JSON object"),
    ],
)
def test_bad_forget_requests_are_refused_with_a_message(rec, body, status, fragment):
    rec.store.append("x", [])  # a held user the bad requests must leave alone
    answered, document = ask(rec, body, "forget")
    assert answered == status and fragment in document["message"], document
    assert rec.store.get("x") is not None


def test_forget_without_a_store_or_while_it_is_unavailable(demo, rec, monkeypatch):
    bare = Recommender.from_dir(demo["model"], catalogue_dir=demo["preprocessed"])
    status, answer = ask(bare, {"user_id": "1"}, "forget")
    assert status == 404 and "state store" in answer["message"]
    from metarec.state import StoreUnavailableError

    def unavailable(user_id):
        raise StoreUnavailableError("redis://:***@metarec-redis:6379/0", ConnectionError("refused by test"))

    monkeypatch.setattr(rec.store, "delete", unavailable)
    status, answer = ask(rec, {"user_id": "1"}, "forget")
    assert status == 503 and answer["type"] == "StoreUnavailable"
    # Every forget of a batch the store refused answers 503, not only the first one.
    answers = answer_all(rec, [{"user_id": "1"}, {"instances": [{"user_id": "2"}, {"user_id": "3"}]}],
                         ["forget", "forget"])  # fmt: skip
    assert [(status, document["type"]) for status, document in answers] == [(503, "StoreUnavailable")] * 2
