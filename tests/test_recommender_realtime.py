"""The Recommender's real-time loop in-process: known users from history, feedback, new users who adapt,
explanations, and bad feedback that stores nothing (same code path as the handler, no TorchServe)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import redis_server
from demo_model import build_demo_model
from serving_cases import answer_all
from test_recommender import one_torch_thread  # noqa: F401 - autouse fixture

from metarec.realtime import HISTORY_FILE, write_history
from metarec.recommender import Recommender
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


def test_known_user_ranked_from_history_without_rated_items(rec, demo):
    history = pd.read_parquet(demo["model"] / HISTORY_FILE)
    user_id = str(history["user_id"].iloc[0])
    rated = set(history.loc[history["user_id"] == user_id, "item_id"])
    status, answer = ask(rec, {"user_id": user_id, "k": 100})
    assert status == 200 and answer["personalised"] and answer["support_size"] == len(rated)
    assert rated.isdisjoint(e["item_id"] for e in answer["items"])
    assert len(answer["items"]) == len(rec.item_ids) - len(rated)
    prior = rec.personaliser.score(rec.known_user(user_id), None, rec.all_items)
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
