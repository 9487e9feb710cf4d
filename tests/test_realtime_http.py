"""The real-time loop over real HTTP: a TorchServe with two worker processes sharing the embedded store.

Known users are served from their history with rated items excluded; feedback handled by one worker is
read by the next request on another (the workers' own log lines name who answered); concurrent
feedback loses nothing (8 clients x 50 ratings for one user, on the embedded store and on a second
server whose workers share a real Redis) and ends at the state of a sequential replay; bad feedback is
refused with a 4xx and stores nothing; a new user who adapts once is personalised on the next plain
recommend.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import re
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import redis_server
import test_serving_http as serving_http
import torch
from demo_model import build_demo_archive
from serving_cases import answer_all

from metarec.recommender import Recommender
from metarec.serve_local import model_workers, start_server, stop_server
from metarec.serving.handler import STATE_FILE, STATE_URL_ENV
from metarec.state.blob import decode_state
from metarec.state.local_redis import start_redis, stop_redis
from metarec.state.open import open_store

pytestmark = pytest.mark.slow
call = serving_http.call
redis_url = redis_server.redis_url  # a real redis-server for the module (fixture)

# Items whose ratings are kept per user: above the 400 ratings the lost-update test sends to one user.
WINDOW = 500
CLIENTS, PER_CLIENT = 8, 50


def _start(archive_dir: Path, workdir: Path, state_url: str):
    """Starts TorchServe on the archive with its workers' user state at ``state_url``."""
    return start_server(archive_dir, workdir, 0, 0, timeout_s=180, environment={STATE_URL_ENV: state_url})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """This module's TorchServe (as in test_serving_http.py), its archive keeping WINDOW ratings per user,
    its two workers sharing one SQLite store."""
    built = build_demo_archive(tmp_path_factory.mktemp("demo"), serving_config={"state_window": WINDOW})
    workdir = tmp_path_factory.mktemp("torchserve")
    state_url = f"sqlite:///{workdir / STATE_FILE}"
    info = _start(built["archive_dir"], workdir, state_url)
    try:
        yield {**built, "info": info, "state_url": state_url}
    finally:
        stop_server(workdir)


@pytest.fixture(scope="module")
def served_redis(served, redis_url, tmp_path_factory):
    """A second TorchServe on the same archive whose two workers keep user state in a real Redis."""
    workdir = tmp_path_factory.mktemp("torchserve-redis")
    info = _start(served["archive_dir"], workdir, redis_url)
    try:
        yield {**served, "info": info, "state_url": redis_url}
    finally:
        stop_server(workdir)


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


def _answers_for(served, user_id: str) -> list[tuple[str, str, int]]:
    """(worker id, route, state version) of each logged answer for this user, in log order."""
    log = (Path(served["info"].workdir) / "logs" / "model_log.log").read_text(errors="replace")
    pattern = re.compile(r"(W-\d+)-\S*.*realtime user=" + re.escape(user_id) + r" route=(\w+) version=(\d+)")
    return [(match.group(1), match.group(2), int(match.group(3))) for match in pattern.finditer(log)]


def test_feedback_is_read_by_the_next_request_on_any_worker(served):
    items = _item_ids(served)
    user_id = "rt-reader"
    for round_number in range(1, 21):
        item = items[round_number]
        status, answer = post(served, {"user_id": user_id, "ratings": [{"item_id": item, "rating": 5}], "k": 3},
                              "feedback")  # fmt: skip
        assert status == 200, answer
        assert answer["state_version"] == round_number and len(answer["items"]) == 3
        # Two reads per write: with one, the workers answer in turn and one only ever writes, the other
        # only ever reads, so neither reads over a user it wrote before (a stale per-worker copy).
        for _ in range(2):
            status, recommended = post(served, {"user_id": user_id, "k": len(items)})
            assert status == 200, recommended
            assert recommended["state_version"] == round_number
            assert recommended["support_size"] == round_number
            assert item not in {entry["item_id"] for entry in recommended["items"]}
    assert len(_workers_for(served, user_id)) == 2, "both worker processes should have answered"
    # The case the test is for must have happened: a worker that wrote the user earlier read a newer
    # version another worker wrote.
    answers = _answers_for(served, user_id)
    writers = {version: worker for worker, route, version in answers if route == "feedback"}
    assert sorted(writers) == list(range(1, 21)), answers
    assert any(
        route == "recommend" and writers[version] != worker
        and any(writer == worker for earlier, writer in writers.items() if earlier < version)
        for worker, route, version in answers
    ), answers  # fmt: skip


def _crowd(served, user_id: str) -> dict[float, tuple[str, float, int]]:
    """CLIENTS concurrent clients each send PER_CLIENT single-rating feedback requests for one user.

    Returns:
        Per rating sent, by its (unique) timestamp: its item, rating and the state version answered (the
        version after its append; the requests of one serving batch share their batch's last one).
    """
    sent = {}
    items = _item_ids(served)

    def client(c):
        versions = []
        for n in range(PER_CLIENT):
            item = items[(c * PER_CLIENT + n) % len(items)]
            body = {
                "user_id": user_id,
                "ratings": [{"item_id": item, "rating": 1 + (c + n) % 5, "timestamp": c * 1000 + n}],
            }
            status, answer = post(served, body, "feedback")
            assert status == 200, answer
            versions.append(answer["state_version"])
            sent[float(c * 1000 + n)] = (item, float(1 + (c + n) % 5), answer["state_version"])
        # A client waits for each answer, so each of its answers has seen all its earlier ratings.
        assert versions == sorted(versions) and len(set(versions)) == PER_CLIENT, versions

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    return sent


def _replay(served, ratings, user_id: str, tmp_path: Path) -> Recommender:
    """The served archive in process on a fresh store, fed the ratings one feedback request at a time."""
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(served["archive_dir"] / "model-store" / "metarec.mar") as mar:
        mar.extractall(unpacked)
    replay = Recommender.from_dir(unpacked, store=open_store(f"sqlite:///{tmp_path / 'replay.db'}", WINDOW))
    for rating in ratings:
        body = {
            "user_id": user_id,
            "ratings": [{"item_id": rating.item_id, "rating": rating.rating, "timestamp": rating.timestamp}],
        }
        ((status, answer),) = answer_all(replay, [body], ["feedback"])
        assert status == 200, answer
    return replay


def _check_crowd_loses_nothing_and_matches_a_sequential_replay(served, tmp_path):
    user_id = "rt-crowd"
    sent = _crowd(served, user_id)
    store = open_store(served["state_url"], WINDOW)
    try:
        stored = store.get(user_id)
    finally:
        store.close()
    total = CLIENTS * PER_CLIENT
    assert stored.version == total and len(sent) == total
    # Nothing lost: the window holds one rating of every item rated, each the one appended last (the
    # highest answered version; requests of one batch tie), in the order of those appends.
    assert sorted(r.item_id for r in stored.ratings) == sorted({item for item, _, _ in sent.values()})
    latest = collections.defaultdict(int)
    for item, _, version in sent.values():
        latest[item] = max(latest[item], version)
    for r in stored.ratings:
        assert sent[r.timestamp][:2] == (r.item_id, r.rating) and sent[r.timestamp][2] == latest[r.item_id]
    versions = [sent[r.timestamp][2] for r in stored.ratings]
    assert versions == sorted(versions)
    # The newest state was computed from all 400 appends...
    assert stored.fresh and stored.blob_version == total
    n_items = len(_item_ids(served))
    status, served_answer = post(served, {"user_id": user_id, "k": n_items, "include_rated": True})
    assert status == 200 and served_answer["state_version"] == total, served_answer
    # ... and is the one a sequential replay of the stored ratings, in the stored order, ends at.
    replay = _replay(served, stored.ratings, user_id, tmp_path)
    ((_, replayed),) = answer_all(replay, [{"user_id": user_id, "k": n_items, "include_rated": True}], [""])
    # (one request per stored rating: as many versions as the window has ratings)
    assert replayed["state_version"] == len(stored.ratings)
    assert replayed["support_size"] == served_answer["support_size"]
    scores = {entry["item_id"]: entry["score"] for entry in replayed["items"]}
    assert len(served_answer["items"]) == len(scores) == n_items
    assert max(abs(entry["score"] - scores[entry["item_id"]]) for entry in served_answer["items"]) <= 2e-4
    mine = decode_state(stored.blob, replay.state_tag, torch.device("cpu"))
    theirs = decode_state(replay.store.get(user_id).blob, replay.state_tag, torch.device("cpu"))
    assert mine is not None and set(mine["params"]) == set(theirs["params"])
    for name, tensor in theirs["params"].items():
        assert torch.allclose(mine["params"][name], tensor, atol=1e-5), name
    replay.store.close()


def test_concurrent_feedback_for_one_user_loses_nothing(served, tmp_path):
    """8 clients x 50 ratings for one user over HTTP, two workers on the embedded store: no append lost
    stored, and the final state is a sequential replay's."""
    _check_crowd_loses_nothing_and_matches_a_sequential_replay(served, tmp_path)


def test_concurrent_feedback_for_one_user_loses_nothing_on_redis(served_redis, tmp_path):
    """The same with the two workers' state in a real Redis (what several replicas share)."""
    assert len({worker["pid"] for worker in model_workers(served_redis["info"])}) == 2
    _check_crowd_loses_nothing_and_matches_a_sequential_replay(served_redis, tmp_path)


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


def test_forget_erases_feedback_for_every_worker(served):
    """feedback -> forget -> recommend over HTTP, two workers reading one store: the forgotten new user
    is unknown to every worker, and a history user is ranked from their history alone again, as before
    their feedback (forget keeps no per-worker copy, and the archive's history is not erased)."""
    items = _item_ids(served)
    history = _history(served)
    known = str(history["user_id"].value_counts().index[-1])
    rated = set(history.loc[history["user_id"].astype(str) == known, "item_id"].astype(str))
    status, before = post(served, {"user_id": known, "k": 5})
    assert status == 200, before
    fresh = [item for item in items if item not in rated][:6]
    for user_id in ("rt-forgotten", known):
        body = {"user_id": user_id, "ratings": [{"item_id": item, "rating": 1} for item in fresh], "k": 5}
        status, answer = post(served, body, "feedback")
        assert status == 200 and answer["stored"], answer
    status, answer = post(served, {"user_id": known, "k": 5})
    assert answer["support_size"] == len(rated) + len(fresh) and answer["items"] != before["items"]
    for user_id in ("rt-forgotten", known):
        status, answer = post(served, {"user_id": user_id}, "forget")
        assert status == 200 and answer["deleted"] is True and answer["user_id"] == user_id, answer
    # Four reads each: the two workers answer in turn, so both read after the erasure.
    for _ in range(4):
        status, answer = post(served, {"user_id": "rt-forgotten", "k": 5})
        assert status == 404 and "unknown user_id" in answer["message"], answer
        status, answer = post(served, {"user_id": known, "k": 5})
        assert status == 200 and answer["support_size"] == len(rated) and answer["items"] == before["items"]
    assert len(_workers_for(served, "rt-forgotten")) == 2 or len(_workers_for(served, known)) == 2
    status, again = post(served, {"user_id": "rt-forgotten"}, "forget")
    assert status == 200 and again["deleted"] is False
    status, bad = post(served, {"user_id": "rt-forgotten", "ratings": []}, "forget")
    assert status == 400 and "unknown field(s) ['ratings']" in bad["message"]


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


def test_a_redis_outage_is_a_503_and_the_server_recovers_with_it(served, tmp_path):
    """Over real HTTP, two workers on a real Redis that stops and comes back: feedback and named users
    are answered 503 with a JSON message naming the store while it is down, anonymous requests 200, no
    worker restarts, and feedback works again on the same server once Redis is back."""
    try:
        url, redis = start_redis(tmp_path / "redis")
    except FileNotFoundError as error:
        pytest.skip(str(error))
    workdir = tmp_path / "torchserve"
    try:
        info = _start(served["archive_dir"], workdir, url)
        here = {**served, "info": info}
        workers = {(w["id"], w["pid"]) for w in model_workers(info)}
        item = _item_ids(served)[0]
        rate = {"user_id": "outage", "ratings": [{"item_id": item, "rating": 4}]}
        assert post(here, rate, "feedback")[0] == 200
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        errors_before = _requests_5xx(info)
        stop_redis(redis)
        for route, body in (("feedback", rate), ("", {"user_id": "outage"})):
            status, answer = post(here, body, route)
            assert status == 503 and answer["type"] == "StoreUnavailable", answer
            assert f"127.0.0.1:{port}" in answer["message"]
        request = urllib.request.Request(
            f"{info.inference_url}/predictions/{info.model_name}/1.0/feedback", data=json.dumps(rate).encode(),
            headers={"Content-Type": "application/json", **info.inference_headers()},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
        status, answer = post(here, {"support": [{"item_id": item, "rating": 5}], "k": 2}, "adapt")
        assert status == 200 and len(answer["items"]) == 2
        assert _requests_5xx(info) == errors_before + 3  # what an alert on the outage would count
        url, redis = start_redis(tmp_path / "redis-again", port=port)
        status, answer = post(here, rate, "feedback")
        assert status == 200 and answer["state_version"] == 1  # this test's Redis keeps nothing on disk
        assert {(w["id"], w["pid"]) for w in model_workers(info)} == workers
    finally:
        stop_server(workdir)
        stop_redis(redis)


def _requests_5xx(info) -> float:
    """TorchServe's frontend counter of 5xx answers (Prometheus format; absent before the first one)."""
    with urllib.request.urlopen(f"{info.metrics_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("Requests5XX{"))
