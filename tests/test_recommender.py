"""Recommender: recommend/adapt semantics, batching, genre shift after adaptation (requests go through
the request protocol, metarec.serving.requests, whose own tests are in test_requests.py)."""

from __future__ import annotations

import collections
import json
import shutil

import pandas as pd
import pytest
import torch
from demo_model import build_demo_model
from serving_cases import GOOD_SUPPORT, answer_all

from metarec.model import PreferenceModel
from metarec.preprocessing import run_preprocessing
from metarec.recommender import Recommender
from metarec.serving_settings import RequestLimits
from metarec.tasks import Preprocessed


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors: one intra-op thread, as the serving workers use (extra threads only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    run_preprocessing("synthetic:tiny", None, None, str(out))
    return out


@pytest.fixture(scope="module")
def untrained_dir(preprocessed, tmp_path_factory):
    """A freshly initialised model directory (fast; enough for validation and batching tests)."""
    torch.manual_seed(0)
    pre = Preprocessed.load(str(preprocessed))
    model = PreferenceModel(
        pre.encoder.user_dims,
        pre.encoder.item_dims,
        pre.schema["n_warm_items"],
        pre.item_features,
        pre.item_warm_idx,
    )
    out = tmp_path_factory.mktemp("model")
    model.save(out, {"method": "maml", "adapt": {"mode": "decision", "inner_steps": 3, "inner_lr": 0.05}})
    shutil.copyfile(preprocessed / "schema.json", out / "schema.json")
    return out


@pytest.fixture(scope="module")
def rec(untrained_dir, preprocessed):
    return Recommender.from_dir(untrained_dir, catalogue_dir=preprocessed)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("trained"))


def answer(rec, body, route=""):
    ((status, document),) = answer_all(rec, [body], [route])
    return status, document


def test_missing_items_table_is_reported(untrained_dir):
    with pytest.raises(FileNotFoundError, match="items.parquet"):
        Recommender.from_dir(untrained_dir)


def test_known_user_matches_the_same_user_given_by_features(rec, preprocessed):
    users = pd.read_parquet(preprocessed / "users.parquet")
    row = users.iloc[4]
    features = {
        name: (None if pd.isna(row[name]) else row[name]) for name in ("age", "gender", "occupation", "zip")
    }
    features["age"] = float(features["age"])
    status_known, known = answer(rec, {"user_id": row["user_id"], "k": 5})
    status_features, by_features = answer(rec, {"user": features, "k": 5})
    assert status_known == status_features == 200
    assert known["user"] == {"user_id": row["user_id"]}
    assert [i["item_id"] for i in known["items"]] == [i["item_id"] for i in by_features["items"]]


def test_recommend_ranks_by_score_and_honours_k_candidates_exclude(rec):
    status, full = answer(rec, {"user_id": "3", "k": 80})
    assert status == 200
    scores = [item["score"] for item in full["items"]]
    assert len(scores) == 80 and scores == sorted(scores, reverse=True)
    assert {item["item_id"] for item in full["items"]} == set(rec.item_ids)

    _, top = answer(rec, {"user_id": "3", "k": 4})
    assert top["items"] == full["items"][:4]

    candidates = ["5", "9", 12, "40"]
    _, restricted = answer(rec, {"user_id": "3", "k": 10, "candidates": candidates, "exclude": ["9"]})
    # k larger than the candidates left: all of them, in score order.
    assert [i["item_id"] for i in restricted["items"]] == [
        i["item_id"] for i in full["items"] if i["item_id"] in {"5", "12", "40"}
    ]


def test_kserve_body_answers_predictions_in_order(rec):
    status, document = answer(rec, {"instances": [{"user_id": "1", "k": 2}, {"user": {"age": 30}, "k": 3}]})
    assert status == 200
    assert [len(p["items"]) for p in document["predictions"]] == [2, 3]
    _, single = answer(rec, {"user_id": "1", "k": 2})
    assert document["predictions"][0] == single


def test_batch_answers_equal_single_answers_and_bad_request_stays_isolated(rec):
    bodies = [
        {"user_id": "1", "k": 3},
        {"support": GOOD_SUPPORT, "k": 3},
        b'{"user_id": "999999"}',
        {"support": GOOD_SUPPORT[:1], "k": 4, "steps": 1},
        {"instances": [{"user": {"gender": "F"}, "k": 2}]},
    ]
    routes = ["", "adapt", "", "adapt", None]
    batch = answer_all(rec, bodies, routes)
    assert [status for status, _ in batch] == [200, 200, 404, 200, 200]
    for body, route, (status, document) in zip(bodies, routes, batch, strict=True):
        if status == 200:
            single_status, single = answer(rec, body, route)
            assert single_status == 200
            assert json.dumps(document) == json.dumps(single) or _close(document, single)


def _close(a, b) -> bool:
    """Same items; scores equal up to float noise of batched vs single kernels."""
    a_items = a.get("items") or a["predictions"][0]["items"]
    b_items = b.get("items") or b["predictions"][0]["items"]
    return [i["item_id"] for i in a_items] == [i["item_id"] for i in b_items] and all(
        abs(x["score"] - y["score"]) < 1e-3 for x, y in zip(a_items, b_items, strict=True)
    )


@pytest.fixture(scope="module")
def generic_rec(untrained_dir, preprocessed):
    """The same model served without the fast adaptation path (torch.func inner loop)."""
    return Recommender.from_dir(untrained_dir, catalogue_dir=preprocessed, fast_adapt=False)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "generic"])
def test_adapt_runs_one_vectorised_pass_per_step_count(rec, generic_rec, fast, monkeypatch):
    calls = []
    rec = rec if fast else generic_rec
    assert (rec.adapter.fast is not None) == fast
    real_adapt = rec.adapter.adapt

    def counting_adapt(users, items, ratings, mask, steps=None):
        calls.append((len(items), steps, tuple(mask.shape)))
        return real_adapt(users, items, ratings, mask, steps)

    monkeypatch.setattr(rec.adapter, "adapt", counting_adapt)
    support_long = [{"item_id": str(i), "rating": 3 + (i % 3)} for i in range(1, 8)]
    bodies = [{"support": GOOD_SUPPORT}, {"support": support_long}, {"support": GOOD_SUPPORT, "steps": 2}]
    results = answer_all(rec, bodies, ["adapt"] * 3)
    assert [status for status, _ in results] == [200, 200, 200]
    # Two requests at the model's default 3 steps share one padded pass; the 2-step one runs alone.
    assert sorted(calls) == [(1, 2, (1, 3)), (2, 3, (2, 7))]
    assert [doc["support_size"] for _, doc in results] == [3, 7, 3]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "generic"])
def test_adapt_answers_as_one_pass_over_support_and_catalogue(rec, generic_rec, fast):
    """adapt scores the catalogue with ``score_catalogue`` and the support rows apart; its answer is the
    one the former single scoring pass over ``[support, every item]`` gives (ranking, scores, losses)."""
    from metarec.meta import masked_mse
    from metarec.serving.requests import RequestParser

    rec = rec if fast else generic_rec
    support = [{"item_id": str(i), "rating": 1 + (i * 7) % 5} for i in range(10, 16)]
    body = {"support": support, "user": {"age": 33, "gender": "F"}, "k": 25}
    status, document = answer(rec, body, "adapt")
    assert status == 200
    request, _ = RequestParser(rec, RequestLimits()).parse_adapt(body)
    users = rec._stack_users([request])
    items, ratings = request.support_items[None], request.support_ratings[None]
    ones = torch.ones_like(ratings)
    state = rec.adapter.adapt(users, items, ratings, ones, request.steps)
    scores = rec.adapter.score(
        users, state, torch.cat([items, torch.arange(rec.model.n_items)[None]], dim=1)
    )[0]
    n_support = items.shape[1]
    ranked = scores[n_support:].masked_fill(~request.candidate_mask, -float("inf"))
    values, indices = torch.topk(ranked, request.k)
    assert [entry["item_id"] for entry in document["items"]] == [rec.item_ids[i] for i in indices.tolist()]
    assert [entry["score"] for entry in document["items"]] == pytest.approx(values.tolist(), abs=1e-4)
    loss = masked_mse(scores[:n_support], ratings[0], ones[0])
    assert document["support_loss_after"] == pytest.approx(float(loss), abs=1e-6)
    assert not set(indices.tolist()) & set(request.support_items.tolist())  # rated items stay out


@pytest.fixture(scope="module")
def user_terms_dir(preprocessed, tmp_path_factory):
    """A model with every adapted user term and learned inner rates, all weights random."""
    torch.manual_seed(1)
    pre = Preprocessed.load(str(preprocessed))
    model = PreferenceModel(
        pre.encoder.user_dims, pre.encoder.item_dims, pre.schema["n_warm_items"], pre.item_features,
        pre.item_warm_idx, hidden=(16, 8), learn_inner_lr=True, user_bias=True, user_bias_prior=3.0,
        user_factors=4,
    )  # fmt: skip
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    out = tmp_path_factory.mktemp("model_user_terms")
    model.save(out, {"method": "maml", "adapt": {"mode": "head", "inner_steps": 3, "inner_lr": 0.2}})
    shutil.copyfile(preprocessed / "schema.json", out / "schema.json")
    return out


@pytest.mark.parametrize("model", ["untrained", "user_terms"])
def test_fast_adapt_answers_equal_the_generic_path(model, untrained_dir, user_terms_dir, preprocessed):
    model_dir = untrained_dir if model == "untrained" else user_terms_dir
    fast = Recommender.from_dir(model_dir, catalogue_dir=preprocessed)
    generic = Recommender.from_dir(model_dir, catalogue_dir=preprocessed, fast_adapt=False)
    assert fast.adapter.fast is not None and generic.adapter.fast is None
    support_long = [{"item_id": str(i), "rating": 1 + (i * 7) % 5} for i in range(10, 30)]
    bodies = [
        {"support": GOOD_SUPPORT, "k": 20},
        {"support": support_long, "user_id": "2", "k": 20},
        {"support": support_long[:5], "user": {"age": 41, "gender": "M"}, "k": 20, "steps": 0},
        {
            "instances": [
                {"support": GOOD_SUPPORT[:1], "k": 20, "steps": 5},
                {"support": support_long, "k": 20},
            ]
        },
    ]
    fast_answers = answer_all(fast, bodies, ["adapt"] * len(bodies))
    generic_answers = answer_all(generic, bodies, ["adapt"] * len(bodies))
    documents = []
    for (fast_status, fast_doc), (generic_status, generic_doc) in zip(
        fast_answers, generic_answers, strict=True
    ):
        assert fast_status == generic_status == 200
        pairs = zip(
            fast_doc.get("predictions", [fast_doc]),
            generic_doc.get("predictions", [generic_doc]),
            strict=True,
        )
        documents.extend(pairs)
    for fast_doc, generic_doc in documents:
        assert _close(fast_doc, generic_doc)
        for key in ("support_loss_before", "support_loss_after"):
            assert fast_doc[key] == pytest.approx(generic_doc[key], abs=1e-5)
        assert (
            fast_doc["steps"] == generic_doc["steps"]
            and fast_doc["support_size"] == generic_doc["support_size"]
        )
    # Adaptation did something the comparison could miss: the losses moved.
    assert any(abs(d["support_loss_after"] - d["support_loss_before"]) > 1e-2 for d, _ in documents)


def test_adapt_steps_are_capped_and_support_items_not_recommended(rec):
    status, document = answer(rec, {"support": GOOD_SUPPORT, "k": 100, "steps": 1000}, "adapt")
    assert status == 200
    assert document["steps"] == RequestLimits().max_steps
    returned = {item["item_id"] for item in document["items"]}
    assert returned.isdisjoint({"1", "2", "3"}) and len(returned) == 77

    _, no_steps = answer(rec, {"support": GOOD_SUPPORT, "steps": 0}, "adapt")
    assert no_steps["support_loss_after"] == pytest.approx(no_steps["support_loss_before"], abs=1e-5)


@pytest.mark.slow
def test_trained_adaptation_lowers_support_loss_and_shifts_toward_the_favoured_genre(trained):
    rec = Recommender.from_dir(trained["model"], catalogue_dir=trained["preprocessed"])
    items = pd.read_parquet(trained["preprocessed"] / "items.parquet")
    genres = items.set_index("item_id")["genres"].str.split("|")
    counts = collections.Counter(g for labels in genres for g in labels)
    share_shift, gap_shift = [], []
    for genre, _ in counts.most_common(10):
        favoured = [i for i in genres.index if genre in genres[i]]
        others = [i for i in genres.index if genre not in genres[i]]
        # Half of the genre's items loved, ten other items disliked: a clear taste for the genre.
        support = [{"item_id": i, "rating": 5} for i in favoured[: len(favoured) // 2]]
        support += [{"item_id": i, "rating": 1} for i in others[:10]]
        rated = [entry["item_id"] for entry in support]
        (_, before), (_, after) = answer_all(
            rec,
            [{"user": {}, "k": 80, "exclude": rated}, {"user": {}, "k": 80, "support": support}],
            ["", "adapt"],
        )
        assert after["support_loss_after"] < after["support_loss_before"]
        share_shift.append(_genre_share(after, genre, genres) - _genre_share(before, genre, genres))
        gap_shift.append(_score_gap(after, genre, genres) - _score_gap(before, genre, genres))
    # Averaged over the ten most common genres, adaptation moves the top 10 and the scores toward
    # the genre the support set favours.
    assert sum(share_shift) / len(share_shift) > 0.03, share_shift
    assert sum(gap_shift) / len(gap_shift) > 0.1, gap_shift
    assert sum(shift > 0 for shift in gap_shift) >= 6, gap_shift


def _genre_share(document, genre, genres, k=10) -> float:
    return sum(genre in genres[item["item_id"]] for item in document["items"][:k]) / k


def _score_gap(document, genre, genres) -> float:
    """Mean score of the genre's (unrated) items minus the mean score of the other items."""
    inside = [i["score"] for i in document["items"] if genre in genres[i["item_id"]]]
    outside = [i["score"] for i in document["items"] if genre not in genres[i["item_id"]]]
    return sum(inside) / len(inside) - sum(outside) / len(outside)


def test_every_answer_names_the_model_version_from_the_model_card(untrained_dir, preprocessed):
    versioned = Recommender.from_dir(untrained_dir, catalogue_dir=preprocessed)
    versioned.model_version = "7.1"  # as set from model_card.json's "version" inside an archive
    _, recommended = answer(versioned, {"user": {"age": 30.0}, "k": 3})
    _, adapted = answer(versioned, {"support": GOOD_SUPPORT, "k": 3}, "adapt")
    assert recommended["model_version"] == adapted["model_version"] == "7.1"
    _, unversioned = answer(Recommender.from_dir(untrained_dir, catalogue_dir=preprocessed), {"user_id": "1"})
    assert unversioned["model_version"] == "unversioned"


def test_display_fields_are_built_per_item_as_the_eager_table_was():
    """DisplayFields builds an item's fields when an answer shows it; each equals what the former eager
    table (one dict per catalogue item, built at load) held: numpy values as JSON values, missing and
    NaN values left out, reserved keys never shown."""
    import numpy as np

    from metarec.recommender import RESERVED_ITEM_KEYS, DisplayFields, _plain

    items = pd.DataFrame(
        {
            "item_idx": range(4),
            "display_title": ["A", None, "C", "D"],
            "display_genres": [np.array(["Drama", "War"]), None, np.array([], dtype=object), np.array(["X"])],
            "display_year": [1990.0, float("nan"), 1995.0, 2001.0],
            "display_rank": np.array([3, 1, 4, 1], dtype=np.int64),
            "display_score": 1.0,  # reserved: never shown
            "title": ["not", "a", "display", "column"],
        }
    )
    eager = [{} for _ in range(len(items))]
    for column in (c for c in items.columns if c.startswith("display_") and c[8:] not in RESERVED_ITEM_KEYS):
        for row, value in enumerate(items[column].tolist()):
            if _plain(value) is not None:
                eager[row][column[8:]] = _plain(value)
    display = DisplayFields(items)
    assert len(display) == 4
    assert [display[row] for row in range(4)] == eager
    assert display[0] == {"title": "A", "genres": ["Drama", "War"], "year": 1990.0, "rank": 3}
    assert display[1] == {"rank": 1} and type(display[0]["rank"]) is int
    json.dumps([display[row] for row in range(4)], allow_nan=False)
