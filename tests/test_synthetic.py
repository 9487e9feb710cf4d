"""The embedded synthetic data set: deterministic files in MovieLens-100K layout with designed structure."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from metarec.data.loaders import load_raw
from metarec.data.synthetic import OCCUPATIONS, PRESETS, generate_ratings_arrays, generate_synthetic

FILES = ("u.data", "u.user", "u.item")


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a = generate_synthetic(tmp_path / "a", preset="tiny", seed=3)
    b = generate_synthetic(tmp_path / "b", preset="tiny", seed=3)
    c = generate_synthetic(tmp_path / "c", preset="tiny", seed=4)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "u.data").read_bytes() != (c / "u.data").read_bytes()


def test_files_follow_the_movielens_100k_layout(tmp_path):
    out = generate_synthetic(tmp_path, preset="tiny")
    n_users, n_items = PRESETS["tiny"]["n_users"], PRESETS["tiny"]["n_items"]
    ratings = [line.split("\t") for line in (out / "u.data").read_text().splitlines()]
    assert all(len(fields) == 4 for fields in ratings)
    assert {int(r[2]) for r in ratings} <= {1, 2, 3, 4, 5}
    assert {int(r[0]) for r in ratings} == set(range(1, n_users + 1))
    users = [line.split("|") for line in (out / "u.user").read_text().splitlines()]
    assert len(users) == n_users and all(len(u) == 5 for u in users)
    assert {u[2] for u in users} == {"F", "M"} and {u[3] for u in users} <= set(OCCUPATIONS)
    items = [line.split("|") for line in (out / "u.item").read_bytes().decode("latin-1").splitlines()]
    assert len(items) == n_items and all(len(i) == 24 for i in items)
    years = [dt.datetime.strptime(i[2], "%d-%b-%Y").year for i in items]
    assert max(years) - min(years) >= 10  # a range of release dates for the date-based cold split
    assert all(sum(map(int, i[5:])) >= 1 for i in items)


def test_rating_counts_are_mostly_20_to_100_with_some_heavy_users():
    data = generate_ratings_arrays(600, 400, seed=0)
    per_user = np.bincount(data["user"])[1:]
    assert per_user.min() >= 20
    assert 0.8 < np.mean(per_user <= 100) < 1.0  # mostly 20-100, some heavy users
    assert per_user.max() > 150
    # No duplicate (user, item) pairs.
    assert len(set(zip(data["user"].tolist(), data["item"].tolist(), strict=True))) == len(data["user"])


def test_genre_preference_is_individual_and_visible_in_ratings(tmp_path):
    """Split each user's ratings in two halves: the per-user genre residuals of one half predict the other."""
    raw = load_raw(generate_synthetic(tmp_path), "synthetic")
    items = raw.items.set_index("item_id")
    ratings = raw.ratings.copy()
    ratings["residual"] = ratings["rating"] - ratings.groupby("user_id")["rating"].transform("mean")
    ratings["residual"] -= ratings.groupby("item_id")["residual"].transform("mean")
    genres = items.loc[ratings["item_id"], "genres"].str.split("|")
    ratings["genre"] = genres.to_numpy()
    ratings = ratings.explode("genre")
    ratings["half"] = np.random.default_rng(0).integers(0, 2, len(ratings))
    means = ratings.groupby(["user_id", "genre", "half"])["residual"].agg(["mean", "count"]).reset_index()
    means = (
        means[means["count"] >= 3]
        .pivot_table(index=["user_id", "genre"], columns="half", values="mean")
        .dropna()
    )
    reliability = np.corrcoef(means[0], means[1])[0, 1]
    assert reliability > 0.2, f"per-user genre taste not visible in ratings (split-half r={reliability:.2f})"


def test_genre_taste_is_partly_predicted_by_user_features():
    data = generate_ratings_arrays(600, 400, seed=0)
    occupation = np.array([OCCUPATIONS.index(o) for o in data["occupation"]])
    features = np.c_[
        np.ones(600),
        (data["age"] - 33) / 12,
        np.array(data["gender"]) == "F",
        np.eye(len(OCCUPATIONS))[occupation],
    ]
    taste = data["user_taste"]
    fit, held_out = slice(0, 400), slice(400, 600)
    beta, *_ = np.linalg.lstsq(features[fit], taste[fit], rcond=None)
    residual = taste[held_out] - features[held_out] @ beta
    r2 = 1 - residual.var() / taste[held_out].var()
    # The features help (feature-only prior beats the mean) but most taste is individual (adaptation helps).
    assert 0.1 < r2 < 0.7, r2


def test_bad_sizes_and_presets_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        generate_synthetic(tmp_path, preset="huge")
    with pytest.raises(ValueError, match="n_items"):
        generate_ratings_arrays(10, 5)
