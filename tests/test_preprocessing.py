"""Preprocessing invariants: splits, roles, k-shot ranks, filtering counts, no leakage, config checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401

from metarec.data.synthetic import generate_synthetic
from metarec.preprocessing import DEFAULTS, resolve_config, run_preprocessing


def read(out: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    schema = json.loads((out / "schema.json").read_text())
    return (
        schema,
        pd.read_parquet(out / "users.parquet"),
        pd.read_parquet(out / "items.parquet"),
        pd.read_parquet(out / "interactions.parquet"),
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "tiny"
    run_preprocessing("synthetic:tiny", None, None, str(out))
    return out


def test_outputs_follow_the_contract(tiny):
    schema, users, items, rows = read(tiny)
    assert schema["format_version"] == 1 and schema["dataset"] == "synthetic"
    assert schema["rating_min"] == 1.0 and schema["rating_max"] == 5.0
    assert [f["name"] for f in schema["user_features"]] == ["age", "gender", "occupation", "zip"]
    assert [f["name"] for f in schema["item_features"]] == ["genres", "year"]
    assert schema["tasks"] == {"query_size": 10, "cold_query_size": 10, "min_ratings": 13, "max_ratings": 100,
                               "users_over_max": "train", "n_extra_train_users": 0,
                               "kshots": [1, 3, 5, 10, 20]}  # fmt: skip
    assert list(users.columns[:2]) == ["user_idx", "user_id"] and users["user_idx"].tolist() == list(
        range(len(users))
    )
    assert users["user_id"].map(type).eq(str).all()
    assert list(items.columns[:4]) == ["item_idx", "item_id", "warm_idx", "is_cold"]
    assert set(rows.columns) == {"user_idx", "item_idx", "rating", "timestamp", "user_split", "item_cold", "role",
                                 "kshot_rank"}  # fmt: skip
    assert rows["rating"].dtype == np.float32 and rows["timestamp"].dtype == np.int64
    assert schema["n_users"] == len(users) == rows["user_idx"].nunique()
    assert schema["n_items"] == len(items) and schema["n_warm_items"] == int((~items["is_cold"]).sum())
    assert "|" in "".join(items["genres"])  # multi-hot stored as a joined string
    assert [d["name"] for d in schema["display"]] == ["title", "genres", "year"]
    assert items["display_title"].str.fullmatch(r"The \w+ \w+ \d+ \(\d{4}\)").all()  # readable titles


def test_roles_and_kshot_ranks_per_user(tiny):
    _, _, items, rows = read(tiny)
    assert (rows["item_cold"] == rows["item_idx"].map(items.set_index("item_idx")["is_cold"])).all()
    for _, group in rows.groupby("user_idx"):
        warm, cold = group[~group["item_cold"]], group[group["item_cold"]]
        assert set(warm["role"]) <= {"support", "query"} and set(cold["role"]) <= {"cold_query", "unused"}
        assert (warm["role"] == "query").sum() == 10
        support = warm[warm["role"] == "support"]
        assert len(support) >= 1
        assert sorted(support["kshot_rank"]) == list(range(len(support)))
        assert (group.loc[group["role"] != "support", "kshot_rank"] == -1).all()
        assert (cold["role"] == "cold_query").sum() == min(10, len(cold))


def test_user_splits_are_disjoint_with_expected_fractions(tiny):
    schema, users, _, rows = read(tiny)
    per_user = rows.groupby("user_idx")["user_split"].agg(lambda s: set(s))
    assert per_user.map(len).eq(1).all()  # every user's rows carry one split
    assert (users.set_index("user_idx")["user_split"] == per_user.map(lambda s: next(iter(s)))).all()
    n = len(users)
    counts = users["user_split"].value_counts()
    assert counts["train"] == round(0.7 * n) and counts["val"] == round(0.1 * n)
    assert counts.sum() == n and schema["splits"]["n_users"] == counts.to_dict()


def test_cold_items_are_the_newest_and_have_no_warm_index(tiny):
    _, _, items, _ = read(tiny)
    cold, warm = items[items["is_cold"]], items[~items["is_cold"]]
    assert len(cold) == round(0.2 * len(items))
    assert (cold["warm_idx"] == 0).all()
    assert sorted(warm["warm_idx"]) == list(range(1, len(warm) + 1))
    assert cold["year"].min() >= warm["year"].max() - 1  # newest by release date (ties within a year)


def test_vocabularies_and_statistics_use_train_users_and_warm_items_only(tmp_path):
    data = generate_synthetic(tmp_path / "raw", preset="tiny")
    lines = (data / "u.user").read_text().splitlines()
    # Give every user a unique occupation and an extreme age for non-train users to detect leakage.
    lines = [f"{u}|{a}|{g}|occupation{u}|{z}" for u, a, g, _, z in (line.split("|") for line in lines)]
    (data / "u.user").write_text("\n".join(lines) + "\n")
    run_preprocessing(str(data), "synthetic", None, str(tmp_path / "out"))
    schema, users, items, _ = read(tmp_path / "out")
    features = {f["name"]: f for f in schema["user_features"]}
    train = users[users["user_split"] == "train"]
    assert features["occupation"]["vocab"] == sorted(train["occupation"])
    assert features["age"]["mean"] == pytest.approx(train["age"].mean())
    assert features["age"]["mean"] != pytest.approx(users["age"].mean())
    year = next(f for f in schema["item_features"] if f["name"] == "year")
    assert year["mean"] == pytest.approx(items.loc[~items["is_cold"], "year"].mean())


def test_filtering_counts_add_up(tmp_path):
    out = tmp_path / "out"
    config = {"max_ratings": 60, "min_ratings": 25, "users_over_max": "drop"}
    summary = run_preprocessing("synthetic", None, config, str(out))
    schema, users, _, rows = read(out)
    counts = schema["counts"]
    assert counts == summary["counts"]
    dropped = (counts["users_dropped_too_few_ratings"] + counts["users_dropped_too_many_ratings"]
               + counts["users_dropped_too_few_warm_ratings"])  # fmt: skip
    assert counts["users_dropped_too_many_ratings"] > 0 and counts["users_dropped_too_few_ratings"] > 0
    assert counts["users_kept_over_max_for_training"] == 0
    assert counts["users_read"] == dropped + len(users) == 600
    assert counts["ratings_kept"] == counts["ratings_dropped_with_users"] + len(rows)
    per_user = rows.groupby("user_idx").size()
    assert per_user.min() >= 25 and per_user.max() <= 60
    assert sum(counts[f"rows_{r}"] for r in ("support", "query", "cold_query", "unused")) == len(rows)


def test_users_over_max_train_only_and_leave_the_evaluated_users_unchanged(tmp_path):
    config = {"max_ratings": 60, "min_ratings": 25}
    run_preprocessing("synthetic", None, {**config, "users_over_max": "drop"}, str(tmp_path / "drop"))
    summary = run_preprocessing(
        "synthetic", None, {**config, "users_over_max": "train"}, str(tmp_path / "train")
    )
    _, dropped_users, _, dropped_rows = read(tmp_path / "drop")
    schema, users, _, rows = read(tmp_path / "train")
    counts = summary["counts"]
    extra = counts["users_kept_over_max_for_training"]
    assert extra > 0 and schema["tasks"]["n_extra_train_users"] == extra
    assert counts["users_read"] == len(users) + counts["users_dropped_too_few_ratings"] + counts[
        "users_dropped_too_many_ratings"] + counts["users_dropped_too_few_warm_ratings"]  # fmt: skip
    assert len(users) == len(dropped_users) + extra
    per_user = rows.groupby("user_idx").size()
    heavy = per_user.index[per_user > 60]
    assert len(heavy) == extra
    # Heavy users are training users only, and every warm rating of theirs is a support row.
    assert set(users.loc[users["user_idx"].isin(heavy), "user_split"]) == {"train"}
    heavy_rows = rows[rows["user_idx"].isin(heavy)]
    assert set(heavy_rows.loc[~heavy_rows["item_cold"], "role"]) == {"support"}
    # ... and none of their cold-item ratings is a query row: they are not tasks of any scenario.
    assert set(heavy_rows.loc[heavy_rows["item_cold"], "role"]) == {"unused"}
    from metarec.tasks import Preprocessed, scenario_tasks

    kept, dropped = Preprocessed.load(tmp_path / "train"), Preprocessed.load(tmp_path / "drop")
    for scenario in ("warm", "user_cold", "item_cold", "user_item_cold"):
        ids = [set(pre.users.loc[scenario_tasks(pre, scenario)[0], "user_id"]) for pre in (kept, dropped)]
        assert ids[0] == ids[1], scenario  # the evaluated users do not depend on users_over_max
    # The task users (and so the validation and test sets) are the same users with the same split.
    by_id = users.set_index("user_id")["user_split"]
    dropped_by_id = dropped_users.set_index("user_id")["user_split"]
    assert (by_id.loc[dropped_by_id.index] == dropped_by_id).all()
    evaluated = users.loc[users["user_split"] != "train", "user_idx"]
    assert per_user.loc[evaluated].max() <= 60
    assert len(rows) == len(dropped_rows) + len(heavy_rows)


def test_same_seed_same_output_other_seed_differs(tmp_path):
    run_preprocessing("synthetic:tiny", None, {"seed": 5}, str(tmp_path / "a"))
    run_preprocessing("synthetic:tiny", None, {"seed": 5}, str(tmp_path / "b"))
    run_preprocessing("synthetic:tiny", None, {"seed": 6}, str(tmp_path / "c"))
    a, b, c = (read(tmp_path / x)[3] for x in "abc")
    pd.testing.assert_frame_equal(a, b)
    assert not a["role"].equals(c["role"]) or not a["user_split"].equals(c["user_split"])


def test_time_split_and_count_based_cold_items(tmp_path):
    run_preprocessing("synthetic:tiny", None, {"user_split": "time", "item_split": "count", "cold_max_ratings": 40},
                      str(tmp_path / "out"))  # fmt: skip
    schema, users, items, rows = read(tmp_path / "out")
    first = rows.groupby("user_idx")["timestamp"].min()
    split = users.set_index("user_idx")["user_split"]
    assert first[split == "train"].max() <= first[split == "val"].min()
    assert first[split == "val"].max() <= first[split == "test"].min()
    assert schema["splits"]["users"] == "time" and schema["splits"]["items"] == "count"
    # Count split: items with <= 40 ratings (before user filtering) are cold.
    raw_counts = pd.read_csv(generate_synthetic(tmp_path / "raw", preset="tiny") / "u.data", sep="\t",
                             header=None)[1].value_counts()  # fmt: skip
    expected = items["item_id"].astype(int).map(raw_counts).fillna(0) <= 40
    assert (items["is_cold"] == expected).all() and 0 < expected.sum() < len(items)


def test_csv_dataset_without_user_features(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(u, i, rng.integers(1, 11) / 2, 1000 + u * 10 + i) for u in range(1, 31) for i in range(1, 31)
            if rng.random() < 0.7]  # fmt: skip
    pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(
        tmp_path / "ratings.csv", index=False
    )
    movies = pd.DataFrame({"movieId": range(1, 31), "title": [f"M{i} ({1980 + i})" for i in range(1, 31)],
                           "genres": ["Comedy|Drama", "Action"] * 15})  # fmt: skip
    movies.to_csv(tmp_path / "movies.csv", index=False)
    (tmp_path / "tags.csv").write_text("userId,movieId,tag,timestamp\n")  # a release may have no tags yet
    summary = run_preprocessing(str(tmp_path), "movielens-csv", {"max_ratings": 30}, str(tmp_path / "out"))
    schema, users, items, interactions = read(tmp_path / "out")
    assert schema["user_features"] == [] and list(users.columns) == ["user_idx", "user_id", "user_split"]
    assert schema["rating_min"] == 0.5 and schema["rating_step"] == 0.5
    assert set(items.loc[items["is_cold"], "year"]) == set(range(2005, 2011))  # the 6 newest of 30
    assert summary["n_interactions"] == len(interactions) > 0


def ml100k_with_title_text(tmp_path):
    """The shipped MovieLens-100K config with its (commented-out) title text feature switched on."""
    from metarec.data.config import CONFIGS_DIR

    text = (CONFIGS_DIR / "movielens-100k.yaml").read_text()
    line = "    # - {name: text, kind: text, columns: [title], dim: 32}"
    assert line in text
    path = tmp_path / "movielens-100k-text.yaml"
    path.write_text(text.replace(line, line.replace("# ", "", 1)))
    return str(path)


def test_preprocess_real_movielens(ml100k_dir, tmp_path):
    config = ml100k_with_title_text(tmp_path)
    summary = run_preprocessing(str(ml100k_dir), config, None, str(tmp_path / "out"))
    schema, users, items, rows = read(tmp_path / "out")
    assert schema["n_items"] == 1682 and schema["counts"]["users_read"] == 943
    assert summary["n_users"] == len(users) > 300
    per_user = rows.groupby("user_idx").size()
    evaluated = users.loc[users["user_split"] != "train", "user_idx"]
    assert (per_user.loc[evaluated] <= 100).all() and per_user.max() > 100  # heavy users train only
    text = next(f for f in schema["item_features"] if f["kind"] == "text")
    assert text["fitted_on_items"] == schema["n_warm_items"] and text["sources"]["columns"] == ["title"]
    assert np.isfinite(np.stack(items["text_vector"].to_numpy())).all()
    assert items.loc[0, "display_title"] == "Toy Story (1995)" and items.loc[0, "display_year"] == 1995


def test_config_is_validated():
    assert set(DEFAULTS) >= {"min_ratings", "max_ratings", "query_size", "kshots", "seed", "user_split"}
    with pytest.raises(ValueError, match="users_over_max"):
        resolve_config({"users_over_max": "keep"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['min_rating'\]"):
        run_preprocessing("synthetic:tiny", None, {"min_rating": 3}, "/nonexistent/never-written")
    with pytest.raises(ValueError, match="user_split"):
        run_preprocessing(
            "synthetic:tiny", None, {"user_split": "alphabetical"}, "/nonexistent/never-written"
        )
    with pytest.raises(ValueError, match="split_fractions"):
        run_preprocessing("synthetic:tiny", None, {"split_fractions": [0.5, 0.5, 0.5]}, "/nonexistent/x")


def test_gcs_output(tmp_path, gcs_bucket):  # noqa: F811
    from metarec import storage
    from metarec.tasks import Preprocessed

    uri = f"gs://{gcs_bucket}/pre"
    summary = run_preprocessing("synthetic:tiny", None, None, uri)
    assert summary["output_dir"] == uri
    names = {u.rsplit("/", 1)[1] for u in storage.list_uris(uri)}
    assert {"schema.json", "users.parquet", "items.parquet", "interactions.parquet"} <= names
    assert Preprocessed.load(uri).n_users == summary["n_users"]


def test_scale_benchmark_smoke(capsys):
    """bench/preprocess_scale.py end to end on a small size: its one stdout line is the JSON result, with
    time and peak RSS over those of a bare read of the same file measured in the same run."""
    from bench_modules import load_bench

    bench = load_bench("preprocess_scale")
    assert bench.main(["--ratings", "20000"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    result = json.loads(line)
    assert set(result) >= {"ratings", "seconds", "peak_rss_mb", "ratings_per_s"}
    assert 15_000 < result["ratings"] < 25_000 and result["interactions_written"] > 10_000
    assert result["seconds_over_read"] == pytest.approx(result["seconds"] / result["read_seconds"], rel=0.25)
    # The read ran in its own process: its peak is its own, below preprocessing's (torch, pandas, ...).
    assert 0 < result["read_peak_rss_mb"] < result["peak_rss_mb"]
    assert result["peak_rss_over_read"] == pytest.approx(
        result["peak_rss_mb"] / result["read_peak_rss_mb"], rel=0.01
    )


def test_text_features_see_only_what_training_sees(tmp_path):
    from csv_release import write_csv_release

    from metarec.features import vector_column

    source = write_csv_release(tmp_path / "raw")
    summary = run_preprocessing(str(source), "movielens-csv", None, str(tmp_path / "out"))
    schema, users, items, rows = read(tmp_path / "out")
    text = next(f for f in schema["item_features"] if f["kind"] == "text")
    assert text["sources"] == {"columns": ["title"], "tags": True} and text["dim"] == 32
    assert text["encoder"] == "ngrams" and text["fitted_on_items"] == schema["n_warm_items"]
    vectors = np.stack(items[vector_column("text")].to_numpy())
    assert vectors.shape == (len(items), 32) and np.isfinite(vectors).all()

    # Which pair tags u<user>m<item> reached each item's text.
    seen = {(u, m) for t in items["text"] for u, m in re.findall(r"u(\d+)m(\d+)", t)}
    pair_tags = pd.read_csv(source / "tags.csv").query("tag.str.startswith('u')")
    user_split = users.set_index("user_id")["user_split"].astype(str)
    item_of = items.set_index("item_idx")["item_id"]
    user_of = users.set_index("user_idx")["user_id"]
    query = {
        (user_of[u], item_of[i])
        for u, i in rows.loc[rows["role"] == "query", ["user_idx", "item_idx"]].to_numpy()
    }
    cold = set(items.loc[items["is_cold"], "item_id"])
    expected = {
        (str(u), str(m))
        for u, m in pair_tags[["userId", "movieId"]].to_numpy()
        if user_split.get(str(u), "dropped") not in ("val", "test")
        and str(m) not in cold
        and (str(u), str(m)) not in query
    }
    assert seen == expected and len(expected) > 100
    assert summary["counts"]["tags_used"] > len(expected)  # the genre tags count too
    assert (items.loc[items["is_cold"], "text"] == items.loc[items["is_cold"], "display_title"]).all()

    assert schema["display"] == [
        {"name": "title", "column": "display_title", "source": "title"},
        {"name": "genres", "column": "display_genres", "source": "genres"},
        {"name": "year", "column": "display_year", "source": "year"},
    ]
    assert list(items.loc[0, "display_genres"]) == [items.loc[0, "genres"]]
    assert items["display_year"].tolist() == items["year"].astype(int).tolist()


def test_string_ids_are_kept_verbatim_through_preprocessing(tmp_path):
    """id_type: string keeps '01', '1' and '001' apart and writes the source ids back, as clients send them."""
    from metarec.realtime import write_history

    rng = np.random.default_rng(0)
    user_ids = ["01", "1", "001", " x7 "] + [f"u{n}" for n in range(26)]
    item_ids = ["07", "7"] + [f"B00{n:05d}X" for n in range(18)]
    rows = [(u, i, int(rng.integers(1, 6)), 1000 + n) for n, u in enumerate(user_ids)
            for i in rng.choice(item_ids, 18, replace=False)]  # fmt: skip
    ratings = pd.DataFrame(rows, columns=["uid", "iid", "stars", "ts"])
    ratings.to_csv(tmp_path / "ratings.csv", index=False)
    occupation = {u: f"job{n % 3}" for n, u in enumerate(user_ids)}
    pd.DataFrame({"uid": user_ids, "occ": [occupation[u] for u in user_ids]}).to_csv(
        tmp_path / "users.csv", index=False
    )
    titles = {i: f"Title {i} ({1990 + n})" for n, i in enumerate(item_ids)}
    pd.DataFrame({"iid": item_ids, "title": list(titles.values())}).to_csv(
        tmp_path / "items.csv", index=False
    )
    (tmp_path / "tags.csv").write_text("uid,iid,tag\n01,07,zebra\n")
    config = {
        "name": "strings",
        "ratings": {"file": "ratings.csv", "header": True, "user": "uid", "item": "iid", "rating": "stars",
                    "timestamp": "ts", "id_type": "string"},
        "users": {"file": "users.csv", "header": True, "id": "uid",
                  "features": [{"name": "occ", "kind": "categorical", "column": "occ"}]},
        "items": {"file": "items.csv", "header": True, "id": "iid",
                  "features": [{"name": "year", "kind": "numeric", "column": "title", "parse": "title_year"},
                               {"name": "text", "kind": "text", "columns": ["title"], "tags": True, "dim": 4}]},
        "tags": {"file": "tags.csv", "header": True, "user": "uid", "item": "iid", "tag": "tag"},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(json.dumps(config))
    run_preprocessing(str(tmp_path), str(tmp_path / "cfg.yaml"), {"max_ratings": 30, "split_fractions": [1, 0, 0]},
                      str(tmp_path / "out"))  # fmt: skip
    schema, users, items, interactions = read(tmp_path / "out")
    stripped = [u.strip() for u in user_ids]
    assert sorted(users["user_id"]) == sorted(stripped) and sorted(items["item_id"]) == sorted(item_ids)
    assert users.set_index("user_id")["occ"].to_dict() == {u.strip(): o for u, o in occupation.items()}
    assert items.set_index("item_id")["year"].to_dict() == {i: 1990 + n for n, i in enumerate(item_ids)}
    assert "zebra" in items.set_index("item_id").loc["07", "text"] and "zebra" not in "".join(
        items["text"][1:]
    )
    # Downstream: the serving history names users and items by their source ids, with their ratings.
    write_history(tmp_path / "out", tmp_path / "history.parquet", window=100)
    history = pd.read_parquet(tmp_path / "history.parquet")
    source = {(u.strip(), i): r for u, i, r, _ in rows}
    assert len(history) == len(source) == len(interactions)
    assert all(source[(u, i)] == r for u, i, r in history[["user_id", "item_id", "rating"]].to_numpy())


def write_small_csv_dataset(root: Path, titles: list[str], timestamp: bool = True) -> Path:
    """30 users x 30 items in the MovieLens CSV layout; returns a dataset config path for it."""
    rng = np.random.default_rng(0)
    rows = [(u, i, rng.integers(1, 11) / 2, 1000 + u * 10 + i) for u in range(1, 31) for i in range(1, 31)
            if rng.random() < 0.7]  # fmt: skip
    pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(
        root / "ratings.csv", index=False
    )
    pd.DataFrame({"movieId": range(1, 31), "title": titles}).to_csv(root / "movies.csv", index=False)
    ratings = {
        "file": "ratings.csv",
        "header": True,
        "user": "userId",
        "item": "movieId",
        "rating": "rating",
        "rating_scale": [0.5, 5],
        "rating_step": 0.5,
    } | ({"timestamp": "timestamp"} if timestamp else {})
    config = {"name": "small", "ratings": ratings,
              "items": {"file": "movies.csv", "header": True, "id": "movieId",
                        "features": [{"name": "year", "kind": "numeric", "column": "title", "parse": "title_year"}]}}  # fmt: skip
    (root / "small.yaml").write_text(json.dumps(config))
    return root / "small.yaml"


def test_settings_the_data_cannot_honour_are_not_ignored(tmp_path, caplog):
    dated = [f"M{i} ({1980 + i})" for i in range(1, 31)]
    config = write_small_csv_dataset(tmp_path, dated, timestamp=False)
    with pytest.raises(ValueError, match=r"user_split='time' needs a timestamp column \(ratings.timestamp\)"):
        run_preprocessing(str(tmp_path), str(config), {"user_split": "time"}, str(tmp_path / "out"))
    config = write_small_csv_dataset(tmp_path, [f"M{i}" for i in range(1, 31)])
    with pytest.raises(
        ValueError, match=r"item_split='date' found no release date or year in any of the 30 items"
    ):
        run_preprocessing(str(tmp_path), str(config), {"max_ratings": 30}, str(tmp_path / "out"))
    config = write_small_csv_dataset(tmp_path, dated[:3] + [f"M{i}" for i in range(4, 31)])
    with caplog.at_level("WARNING"):
        run_preprocessing(str(tmp_path), str(config), {"max_ratings": 30}, str(tmp_path / "out"))
    schema = json.loads((tmp_path / "out" / "schema.json").read_text())
    assert schema["splits"]["n_cold_items"] == 3 and schema["counts"]["items_without_release"] == 27
    assert "3 cold items instead of the 6 asked for" in caplog.text
