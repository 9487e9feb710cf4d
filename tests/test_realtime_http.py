"""The real-time loop over real HTTP: a TorchServe with two worker processes sharing the embedded store.

Known users are served from their history with rated items excluded; feedback handled by one worker is
read by the next request on another (the workers' own log lines name who answered); concurrent
feedback loses nothing; bad feedback is refused with a 4xx and stores nothing; a new user who adapts
once is personalised on the next plain recommend.
"""

from __future__ import annotations

import concurrent.futures
import re
from pathlib import Path

import pandas as pd
import pytest
import test_serving_http as serving_http

from metarec.serve_local import model_workers

pytestmark = pytest.mark.slow
# This module's own TorchServe (the same fixture as test_serving_http.py, started again for this module).
served = serving_http.served
call = serving_http.call


def test_two_worker_processes(served):
    """The read-your-writes test below is only meaningful with two worker processes."""
    assert len({worker["pid"] for worker in model_workers(served["info"])}) == 2


def post(served, body, route=""):
    info = served["info"]
    suffix = f"/1.0/{route}" if route else ""
    return call(f"{info.inference_url}/predictions/{info.model_name}{suffix}", body, info.inference_headers())


def _history(served) -> pd.DataFrame:
    pre = served["preprocessed"]
    interactions = pd.read_parquet(pre / "interactions.parquet")
    users = pd.read_parquet(pre / "users.parquet")
    items = pd.read_parquet(pre / "items.parquet")
    rows = interactions[interactions["user_split"] == "train"].merge(
        users[["user_idx", "user_id"]], on="user_idx"
    )
    return rows.merge(items[["item_idx", "item_id"]], on="item_idx")


def _item_ids(served) -> list[str]:
    return [str(i) for i in pd.read_parquet(served["preprocessed"] / "items.parquet")["item_id"]]


def test_known_user_is_personalised_from_history_and_rated_items_are_excluded(served):
    history = _history(served)
    user_id = str(history["user_id"].value_counts().index[0])
    rated = set(history.loc[history["user_id"].astype(str) == user_id, "item_id"].astype(str))
    n_items = len(_item_ids(served))
    status, known = post(served, {"user_id": user_id, "k": n_items})
    assert status == 200, known
    assert known["personalised"] is True and known["support_size"] == len(rated)
    returned = [entry["item_id"] for entry in known["items"]]
    assert rated.isdisjoint(returned) and len(returned) == n_items - len(rated)
    status, everything = post(served, {"user_id": user_id, "k": n_items, "include_rated": True})
    assert status == 200 and rated <= {entry["item_id"] for entry in everything["items"]}
    # The prior: the same user's features without their ratings.
    users = pd.read_parquet(served["preprocessed"] / "users.parquet")
    row = users[users["user_id"].astype(str) == user_id].iloc[0]
    features = {name: row[name] for name in ("age", "gender", "occupation", "zip") if name in row}
    features = {k: (v.item() if hasattr(v, "item") else v) for k, v in features.items()}
    status, prior = post(served, {"user": features, "k": n_items, "exclude": sorted(rated)})
    assert status == 200, prior
    prior_scores = {entry["item_id"]: entry["score"] for entry in prior["items"]}
    shifts = [abs(entry["score"] - prior_scores[entry["item_id"]]) for entry in known["items"]]
    assert max(shifts) > 0.05


def _workers_for(served, user_id: str) -> set[str]:
    """Worker ids (W-<port>-...) whose log lines say they answered for this user."""
    log = (Path(served["info"].workdir) / "logs" / "model_log.log").read_text(errors="replace")
    pattern = re.compile(r"(W-\d+)-\S*.*realtime user=" + re.escape(user_id) + r"\b")
    return {match.group(1) for match in pattern.finditer(log)}


def test_feedback_is_read_by_the_next_request_on_any_worker(served):
    items = _item_ids(served)
    user_id = "rt-reader"
    for round_number in range(1, 21):
        item = items[round_number]
        status, answer = post(served, {"user_id": user_id, "ratings": [{"item_id": item, "rating": 5}], "k": 3},
                              "feedback")  # fmt: skip
        assert status == 200, answer
        assert answer["state_version"] == round_number and len(answer["items"]) == 3
        status, recommended = post(served, {"user_id": user_id, "k": len(items)})
        assert status == 200, recommended
        assert recommended["state_version"] == round_number
        assert recommended["support_size"] == round_number
        assert item not in {entry["item_id"] for entry in recommended["items"]}
    assert len(_workers_for(served, user_id)) == 2, "both worker processes should have answered"


def test_concurrent_feedback_for_one_user_loses_nothing(served):
    items = _item_ids(served)
    user_id = "rt-crowd"

    def client(c):
        for n in range(5):
            body = {
                "user_id": user_id,
                "ratings": [{"item_id": items[(c * 5 + n) % len(items)], "rating": 1 + n % 5}],
            }
            status, answer = post(served, body, "feedback")
            assert status == 200, answer

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    status, answer = post(served, {"user_id": user_id, "k": 1})
    assert status == 200 and answer["state_version"] == 40


BAD_FEEDBACK = {
    "unknown item": ({"ratings": [{"item_id": "no-such-item", "rating": 4}]}, 400, "unknown item"),
    "rating above the scale": ({"ratings": [{"item_id": "@0", "rating": 9}]}, 400, "outside"),
    "rating not a number": ({"ratings": [{"item_id": "@0", "rating": "5"}]}, 400, "number"),
    "timestamp not a number": (
        {"ratings": [{"item_id": "@0", "rating": 4, "timestamp": "x"}]},
        400,
        "timestamp",
    ),
    "empty batch": ({"ratings": []}, 400, "empty"),
    "oversized batch": ({"ratings": "@many"}, 413, "at most"),
    "no user": ({"ratings": [{"item_id": "@0", "rating": 4}], "user_id": None}, 400, "user_id"),
}


@pytest.mark.parametrize("name", sorted(BAD_FEEDBACK))
def test_bad_feedback_is_refused_and_stores_nothing(served, name):
    items = _item_ids(served)
    body, status_expected, fragment = BAD_FEEDBACK[name]
    user_id = f"rt-bad-{name.replace(' ', '-')}"
    body = {"user_id": user_id, **body}
    if body["ratings"] == "@many":
        body["ratings"] = [{"item_id": items[n % len(items)], "rating": 3} for n in range(1001)]
    body["ratings"] = [{**entry, "item_id": items[0]} if entry.get("item_id") == "@0" else entry
                       for entry in body["ratings"]]  # fmt: skip
    if body["user_id"] is None:
        del body["user_id"]
    # A valid rating beside the bad one must not be stored either.
    if body["ratings"] and name != "oversized batch":
        body["ratings"] = [{"item_id": items[1], "rating": 4}, *body["ratings"]]
    status, answer = post(served, body, "feedback")
    assert status == status_expected and fragment in answer["message"], answer
    status, after = post(served, {"user_id": user_id})
    assert status == 404, after  # the new user was never created


def test_adapt_with_a_new_user_id_personalises_the_next_recommend(served):
    items = _item_ids(served)
    support = [{"item_id": items[n], "rating": 5 if n % 2 else 1} for n in range(8)]
    status, adapted = post(served, {"user_id": "rt-adapter", "support": support, "k": 5}, "adapt")
    assert status == 200, adapted
    status, later = post(served, {"user_id": "rt-adapter", "k": 5})
    assert status == 200 and later["personalised"] is True
    assert [e["item_id"] for e in later["items"]] == [e["item_id"] for e in adapted["items"]]


def test_explanations_over_http_add_up(served):
    items = _item_ids(served)
    ratings = [{"item_id": items[n], "rating": 5 if n < 4 else 1} for n in range(8)]
    status, answer = post(served, {"user_id": "rt-explained", "ratings": ratings, "k": 3, "explain": True},
                          "feedback")  # fmt: skip
    assert status == 200, answer
    for entry in answer["items"]:
        why = entry["explanation"]
        assert abs(entry["score"] - why["prior"] - why["from_ratings"]) < 1e-3
        named = sum(r["contribution"] for r in why["ratings"])
        assert abs(why["from_ratings"] - named - why["other_ratings"]) < 1e-6
        assert (
            abs(
                why["prior_features"]["baseline"]
                + sum(why["prior_features"]["shares"].values())
                - why["prior"]
            )
            < 1e-6
        )
