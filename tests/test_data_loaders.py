"""Data-set configs and raw loaders: real MovieLens-100K, the CSV layout, and every bad-input case."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401

from metarec.data.config import CONFIGS_DIR, load_dataset_config, parse_dataset_config, shipped_config_names
from metarec.data.loaders import dense_codes, drop_duplicates_keep_latest, load_raw

MOVIES_CSV = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
2,Jumanji (1995),Adventure|Children|Fantasy
3,"American President, The (1995)",Comedy|Drama|Romance
4,Untitled Film,(no genres listed)
"""
RATINGS_CSV = """userId,movieId,rating,timestamp
1,1,4.0,964982703
1,3,4.5,964981247
2,2,0.5,964982224
2,3,5.0,964983815
3,1,3.5,964982931
"""


TAGS_CSV = """userId,movieId,tag,timestamp
1,1,pixar,1139045764
2,1,Pixar,1139045765
2,3, politics ,1139045766
3,9,no such movie,1139045767
3,2,,1139045768
"""


def write_csv_dataset(
    root: Path, ratings: str = RATINGS_CSV, movies: str = MOVIES_CSV, tags: str = TAGS_CSV
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.csv").write_text(ratings)
    (root / "movies.csv").write_text(movies)
    (root / "tags.csv").write_text(tags)
    return root


def test_shipped_configs_load_by_name():
    assert {"movielens-100k", "movielens-csv", "synthetic"} <= set(shipped_config_names())
    ml = load_dataset_config("movielens-100k")
    assert ml.ratings.file == "u.data" and ml.items.encoding == "latin-1"
    assert [f.name for f in ml.users.features] == ["age", "gender", "occupation", "zip"]
    genres = ml.items.features[0]
    assert (
        genres.kind == "multi_hot" and genres.labels[:2] == ("unknown", "Action") and len(genres.labels) == 19
    )
    csv = load_dataset_config("movielens-csv")
    assert csv.users is None and csv.ratings.rating_step == 0.5 and csv.ratings.rating_scale == (0.5, 5.0)


def test_movielens_100k_loads_in_full(ml100k_dir):
    raw = load_raw(ml100k_dir, "movielens-100k")
    assert len(raw.ratings) == 100_000
    assert raw.ratings["user_id"].nunique() == 943 and len(raw.users) == 943
    assert len(raw.items) == 1682
    assert raw.ratings["rating"].dtype == np.float32 and raw.ratings["user_id"].dtype == np.int32
    assert raw.counts["duplicates_dropped"] == 0 and raw.counts["unknown_item_ratings_dropped"] == 0
    toy_story = raw.items.set_index("item_id").loc[1]
    assert toy_story["year"] == 1995 and toy_story["genres"] == "Animation|Children's|Comedy"
    assert np.isnan(raw.items.set_index("item_id").loc[267, "year"])  # "unknown" has no date
    assert set(raw.users["gender"]) == {"F", "M"}


def test_csv_layout_half_stars_no_users_year_from_title(tmp_path):
    raw = load_raw(write_csv_dataset(tmp_path), "movielens-csv")
    assert raw.users is None
    assert sorted(raw.ratings["rating"].tolist()) == [0.5, 3.5, 4.0, 4.5, 5.0]
    items = raw.items.set_index("item_id")
    assert items.loc[3, "year"] == 1995 and items.loc[3, "genres"] == "Comedy|Drama|Romance"
    assert np.isnan(items.loc[4, "year"])
    assert raw.ratings["timestamp"].dtype == np.int64 and raw.ratings["timestamp"].iloc[0] == 964982703


def test_multi_character_separator(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n2::10::3::978302109\n")
    (tmp_path / "movies.dat").write_text("10::GoldenEye (1995)::Action|Adventure\n", encoding="latin-1")
    config = {
        "name": "ml-1m-like",
        "ratings": {"file": "ratings.dat", "sep": "::", "names": ["u", "i", "r", "t"], "user": "u", "item": "i",
                    "rating": "r", "timestamp": "t"},
        "items": {"file": "movies.dat", "sep": "::", "encoding": "latin-1", "names": ["id", "title", "genres"],
                  "id": "id", "features": [{"name": "genres", "kind": "multi_hot", "column": "genres"}]},
    }  # fmt: skip
    raw = load_raw(tmp_path, config)
    assert raw.ratings["rating"].tolist() == [5.0, 3.0]
    assert raw.items["genres"].tolist() == ["Action|Adventure"]


def test_parquet_ratings_are_read(tmp_path):
    write_csv_dataset(tmp_path)
    pd.read_csv(tmp_path / "ratings.csv").to_parquet(tmp_path / "ratings.parquet")
    config = load_dataset_config("movielens-csv")
    raw_config = {
        "ratings": {"file": "ratings.parquet", "user": "userId", "item": "movieId", "rating": "rating",
                    "timestamp": "timestamp", "rating_scale": [0.5, 5], "rating_step": 0.5},
        "items": {"file": "movies.csv", "header": True, "id": "movieId",
                  "features": [{"name": "genres", "kind": "multi_hot", "column": "genres"}]},
    }  # fmt: skip
    raw = load_raw(tmp_path, raw_config)
    assert raw.ratings["rating"].tolist() == load_raw(tmp_path, config).ratings["rating"].tolist()


BAD_RATINGS = {
    "non-numeric user id": ("userId,movieId,rating,timestamp\n1,1,4,1\nabc,2,3,1\n", "userId", 2, "non-numeric id 'abc' (ids that are not numbers need ratings.id_type: string"),
    "fractional item id": ("userId,movieId,rating,timestamp\n1,1,4,1\n1,2.5,3,1\n", "movieId", 2, "integer"),
    "rating above scale": ("userId,movieId,rating,timestamp\n1,1,4,1\n1,2,3,1\n2,1,7,1\n", "rating", 3, "outside"),
    "rating below scale": ("userId,movieId,rating,timestamp\n1,1,0,1\n", "rating", 1, "outside"),
    "rating off step": ("userId,movieId,rating,timestamp\n1,1,4,1\n1,2,3.3,1\n", "rating", 2, "step"),
    "empty rating": ("userId,movieId,rating,timestamp\n1,1,4,1\n1,2,,1\n", "rating", 2, "missing"),
    "NaN rating": ("userId,movieId,rating,timestamp\n1,1,NaN,1\n", "rating", 1, "missing"),
    "non-numeric timestamp": ("userId,movieId,rating,timestamp\n1,1,4,1\n1,2,3,soon\n", "timestamp", 2,
                              "non-numeric timestamp 'soon'"),
    "fractional timestamp": ("userId,movieId,rating,timestamp\n1,1,4,1\n1,2,3,9.5\n", "timestamp", 2,
                             "timestamp '9.5' is not a whole number of seconds"),
    "fractional id after an integral float": ("userId,movieId,rating,timestamp\n1.0,1,4,1\n2.5,2,3,1\n",
                                              "userId", 2, "id '2.5' is not an integer"),
    "id out of range": ("userId,movieId,rating,timestamp\n1,1,4,1\n1e30,2,3,1\n", "userId", 2,
                        "outside the 64-bit integer range"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_RATINGS))
def test_bad_ratings_name_file_column_and_row(tmp_path, case):
    text, column, row, reason = BAD_RATINGS[case]
    write_csv_dataset(tmp_path, ratings=text)
    with pytest.raises(ValueError) as err:
        load_raw(tmp_path, "movielens-csv")
    message = str(err.value)
    assert "ratings.csv" in message and f"'{column}'" in message and f"data row {row} " in message, message
    assert reason in message, message


def test_ratings_header_bom_and_integral_numbers_are_read(tmp_path):
    """Spaces around header names, a UTF-8 BOM and integers written as 7.0 or 1e3 all read as meant."""
    text = " userId , movieId,rating, timestamp\n1.0,1,4.0,900000000.0\n1e0,3,4.5,964981247\n2,2,0.5,9e8\n"
    write_csv_dataset(tmp_path, ratings=text)
    (tmp_path / "ratings.csv").write_text(text, encoding="utf-8-sig")
    raw = load_raw(tmp_path, "movielens-csv")
    assert raw.ratings[["user_id", "item_id", "timestamp"]].to_numpy().tolist() == [
        [1, 1, 900000000],
        [1, 3, 964981247],
        [2, 2, 900000000],
    ]
    (tmp_path / "u.data").write_text("1\t1\t4\t1\n", encoding="utf-8-sig")  # no header: the BOM is not data
    (tmp_path / "u.item").write_text(ML100K_ITEM)
    (tmp_path / "u.user").write_text("1|20|M|other|12345\n", encoding="utf-8-sig")
    raw = load_raw(tmp_path, "movielens-100k")
    assert raw.ratings["user_id"].tolist() == [1] and raw.users["user_id"].tolist() == [1]


def test_empty_or_unmatched_ratings_name_the_files(tmp_path, caplog):
    write_csv_dataset(tmp_path, ratings="")
    with pytest.raises(ValueError, match="ratings.csv: empty file"):
        load_raw(tmp_path, "movielens-csv")
    write_csv_dataset(tmp_path, ratings="userId,movieId,rating,timestamp\n")
    with pytest.raises(ValueError, match="ratings.csv: no ratings"):
        load_raw(tmp_path, "movielens-csv")
    write_csv_dataset(tmp_path, ratings="userId,movieId,rating,timestamp\n1,7,4,1\n")
    with pytest.raises(
        ValueError, match=r"ratings.csv: no rated item is in movies.csv \(ratings column 'movieId'"
    ):
        load_raw(tmp_path, "movielens-csv")
    (tmp_path / "u.data").write_text("1\t1\t4\t1\n2\t1\t4\t1\n")
    (tmp_path / "u.item").write_text(ML100K_ITEM)
    (tmp_path / "u.user").write_text("3|20|M|other|12345\n")
    with pytest.raises(ValueError, match=r"u.data: no rated user is in u.user \(ratings column 'user_id'"):
        load_raw(tmp_path, "movielens-100k")
    (tmp_path / "u.user").write_text("2|20|M|other|12345\n")
    with caplog.at_level(logging.WARNING):
        raw = load_raw(tmp_path, "movielens-100k")
    assert (
        raw.counts["users_without_features"] == 1
        and "1 of 2 rated users are missing from u.user" in caplog.text
    )


def test_bad_parquet_rating_names_row(tmp_path):
    write_csv_dataset(tmp_path)
    frame = pd.DataFrame({"u": [1, 2, 3], "i": [1, 2, 3], "r": [4.0, np.nan, 3.0]})
    frame.to_parquet(tmp_path / "r.parquet")
    config = {
        "ratings": {"file": "r.parquet", "user": "u", "item": "i", "rating": "r"},
        "items": {"file": "movies.csv", "header": True, "id": "movieId"},
    }
    with pytest.raises(ValueError, match=r"r.parquet: column 'r', data row 2 .*missing"):
        load_raw(tmp_path, config)


def test_wrong_field_count_names_row(tmp_path):
    (tmp_path / "u.data").write_text("1\t1\t4\t1\n1\t2\t3\n")
    (tmp_path / "u.item").write_text("1|A (1995)|01-Jan-1995||x" + "|0" * 19 + "\n")
    (tmp_path / "u.user").write_text("1|20|M|other|12345\n")
    with pytest.raises(ValueError, match=r"u.data: .*data row 2 .*expected 4 fields, got 3"):
        load_raw(tmp_path, "movielens-100k")


ML100K_ITEM = "1|A (1995)|01-Jan-1995||x" + "|0" * 19 + "\n"


@pytest.mark.parametrize(
    "where, text, row, expected, got",
    [
        ("movies.csv", "movieId,title,genres\n1,Amélie, The Fabulous 世界 (1981),Action|Comedy\n", 1, 3, 4),
        ("movies.csv", MOVIES_CSV + "5,Extra (1999),Drama,oops\n", 5, 3, 4),
        ("movies.csv", MOVIES_CSV + "5,Short (1999)\n", 5, 3, 2),
        ("u.user", "1|20|M|other|12345\n3|M\n", 2, 5, 2),
        ("u.item", ML100K_ITEM + ML100K_ITEM.replace("1|", "2|", 1).replace("\n", "|0\n"), 2, 24, 25),
    ],
    ids=["extra field in the first row", "extra field later", "missing field", "short users row",
         "extra flag"],
)  # fmt: skip
def test_table_row_with_wrong_field_count_names_row(tmp_path, where, text, row, expected, got):
    write_csv_dataset(tmp_path)
    (tmp_path / "u.data").write_text("1\t1\t4\t1\n")
    (tmp_path / "u.item").write_text(ML100K_ITEM)
    (tmp_path / "u.user").write_text("1|20|M|other|12345\n")
    (tmp_path / where).write_text(text, encoding="utf-8")
    config = "movielens-csv" if where == "movies.csv" else "movielens-100k"
    with pytest.raises(ValueError) as err:
        load_raw(tmp_path, config)
    assert str(err.value).startswith(f"{where}: column '(all)', data row {row} "), err.value
    assert f"expected {expected} fields, got {got}" in str(err.value)


def test_empty_feature_tables_name_the_file(tmp_path):
    write_csv_dataset(tmp_path, movies="movieId,title,genres\n")
    with pytest.raises(ValueError, match="movies.csv: no data rows"):
        load_raw(tmp_path, "movielens-csv")
    write_csv_dataset(tmp_path, movies="")
    with pytest.raises(ValueError, match=r"movies.csv: empty file or blank first line"):
        load_raw(tmp_path, "movielens-csv")
    (tmp_path / "u.data").write_text("1\t1\t4\t1\n")
    (tmp_path / "u.item").write_text("")
    (tmp_path / "u.user").write_text("1|20|M|other|12345\n")
    with pytest.raises(ValueError, match="u.item: no data rows"):
        load_raw(tmp_path, "movielens-100k")
    (tmp_path / "u.item").write_text(ML100K_ITEM)
    (tmp_path / "u.user").write_text("\n")
    with pytest.raises(ValueError, match="u.user: no data rows"):
        load_raw(tmp_path, "movielens-100k")


def test_missing_file_and_missing_column(tmp_path):
    write_csv_dataset(tmp_path)
    (tmp_path / "movies.csv").unlink()
    with pytest.raises(ValueError, match="movies.csv: file not found"):
        load_raw(tmp_path, "movielens-csv")
    write_csv_dataset(tmp_path, ratings="userId,movieId,timestamp\n1,1,1\n")
    with pytest.raises(ValueError, match=r"ratings.csv: column 'rating', header: missing column"):
        load_raw(tmp_path, "movielens-csv")
    write_csv_dataset(tmp_path, movies="movieId,name,genres\n1,A,Comedy\n")
    with pytest.raises(ValueError, match=r"movies.csv: column 'title', header: missing column"):
        load_raw(tmp_path, "movielens-csv")
    with pytest.raises(ValueError, match="does not exist"):
        load_raw(tmp_path / "nowhere", "movielens-csv")


def test_bad_items_and_users_tables_name_row(tmp_path):
    write_csv_dataset(tmp_path, movies=MOVIES_CSV + "x5,Bad Id (1999),Drama\n")
    with pytest.raises(ValueError, match=r"movies.csv: column 'movieId', data row 5 .*non-numeric id 'x5'"):
        load_raw(tmp_path, "movielens-csv")
    write_csv_dataset(tmp_path, movies=MOVIES_CSV + "2,Again (1999),Drama\n")
    with pytest.raises(ValueError, match=r"movies.csv: column 'movieId', data row 5 .*duplicate id 2"):
        load_raw(tmp_path, "movielens-csv")
    (tmp_path / "u.data").write_text("1\t1\t4\t1\n")
    (tmp_path / "u.item").write_text("1|A (1995)|01-Jan-1995||x" + "|0" * 19 + "\n")
    (tmp_path / "u.user").write_text("1|20|M|other|12345\n2|twenty|F|other|12345\n")
    with pytest.raises(ValueError, match=r"u.user: column 'age', data row 2 .*non-numeric value 'twenty'"):
        load_raw(tmp_path, "movielens-100k")
    (tmp_path / "u.user").write_text("1|20|M|other|12345\n")
    (tmp_path / "u.item").write_text("1|A (1995)|31-Foo-1995||x" + "|0" * 19 + "\n")
    with pytest.raises(ValueError, match=r"u.item: column 'release_date', data row 1 .*unparseable date"):
        load_raw(tmp_path, "movielens-100k")
    (tmp_path / "u.item").write_text("1|A (1995)|01-Jan-1995||x" + "|0" * 18 + "|2\n")
    with pytest.raises(ValueError, match=r"u.item: column 'g18', data row 1 .*flag must be 0 or 1"):
        load_raw(tmp_path, "movielens-100k")


def test_duplicates_keep_latest_and_unknown_items_are_dropped(tmp_path, caplog):
    ratings = (
        "userId,movieId,rating,timestamp\n"
        "1,1,2.0,100\n"  # superseded by the later rating below
        "1,2,3.0,100\n"
        "1,1,4.5,300\n"
        "1,1,1.0,200\n"  # older than 300: dropped although it comes last
        "2,99,5.0,100\n"  # item 99 is not in movies.csv
        "2,2,1.5,100\n"
    )
    write_csv_dataset(tmp_path, ratings=ratings)
    with caplog.at_level(logging.WARNING, logger="metarec.data.loaders"):
        raw = load_raw(tmp_path, "movielens-csv")
    assert raw.counts["duplicates_dropped"] == 2
    assert raw.counts["unknown_item_ratings_dropped"] == 1
    assert raw.counts["ratings_read"] == 6 and raw.counts["ratings_kept"] == 3
    kept = {(u, i): r for u, i, r in raw.ratings[["user_id", "item_id", "rating"]].itertuples(index=False)}
    assert kept == {(1, 1): 4.5, (1, 2): 3.0, (2, 2): 1.5}
    assert "2 duplicate" in caplog.text and "1 ratings of items missing" in caplog.text


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="not a shipped config"):
        load_dataset_config("no-such-dataset")
    with pytest.raises(ValueError, match=r"items: section is required"):
        parse_dataset_config(
            {"ratings": {"file": "r.csv", "header": True, "user": "u", "item": "i", "rating": "r"}}
        )
    base = {"file": "r.csv", "header": True, "user": "u", "item": "i", "rating": "r"}
    items = {"file": "i.csv", "header": True, "id": "id"}
    with pytest.raises(ValueError, match=r"ratings: unknown key\(s\) \['colour'\]"):
        parse_dataset_config({"ratings": {**base, "colour": 1}, "items": items})
    with pytest.raises(ValueError, match=r"items.features\[0\]: kind must be"):
        parse_dataset_config(
            {"ratings": base, "items": {**items, "features": [{"name": "x", "kind": "bogus"}]}}
        )
    with pytest.raises(ValueError, match=r"buckets"):
        parse_dataset_config(
            {
                "ratings": base,
                "items": {**items, "features": [{"name": "x", "kind": "hashed", "column": "x"}]},
            }
        )
    with pytest.raises(ValueError, match=r"ratings.names: column names are required"):
        parse_dataset_config({"ratings": {**base, "header": False}, "items": items})
    with pytest.raises(ValueError, match=r"ratings.sep: '\\\\s\+' looks like a regular expression"):
        parse_dataset_config({"ratings": {**base, "sep": r"\s+"}, "items": items})
    with pytest.raises(ValueError, match=r"items.sep: the separator must not be empty"):
        parse_dataset_config({"ratings": base, "items": {**items, "sep": ""}})
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("ratings: [unclosed\n")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_dataset_config(bad_yaml)


def test_load_from_gcs_prefix(tmp_path, gcs_bucket):  # noqa: F811
    from metarec import storage

    storage.upload_dir(str(write_csv_dataset(tmp_path / "data")), f"gs://{gcs_bucket}/raw")
    storage.write_bytes(f"gs://{gcs_bucket}/csv.yaml", (CONFIGS_DIR / "movielens-csv.yaml").read_bytes())
    raw = load_raw(f"gs://{gcs_bucket}/raw", f"gs://{gcs_bucket}/csv.yaml")
    assert len(raw.ratings) == 5 and len(raw.items) == 4 and raw.config.name == "movielens-csv"


@pytest.mark.parametrize("spread_ids", [False, True])
def test_duplicate_resolution_matches_a_pandas_reference(spread_ids):
    rng = np.random.default_rng(7)
    n = 4000
    user = rng.integers(0, 60, n)
    item = rng.integers(0, 50, n) * (10**9 if spread_ids else 1)  # sparse ids take the sort-based path
    timestamp = rng.integers(0, 4, n)  # many ties: the later row in the file wins
    keep, dropped = drop_duplicates_keep_latest(user, item, timestamp)
    frame = pd.DataFrame({"u": user, "i": item, "t": timestamp, "row": np.arange(n)})
    expected = np.sort(frame.sort_values(["t", "row"]).groupby(["u", "i"]).tail(1)["row"].to_numpy())
    assert np.array_equal(keep, expected) and dropped == n - len(expected)
    assert drop_duplicates_keep_latest(np.arange(5), np.zeros(5, int), np.zeros(5, int)) == (None, 0)
    values, codes = dense_codes(np.array([7, 3, 7, 10**12]))
    assert values.tolist() == [3, 7, 10**12] and codes.tolist() == [1, 0, 1, 2]


def test_csv_layout_reads_tags_text_and_display_fields(tmp_path):
    raw = load_raw(write_csv_dataset(tmp_path), "movielens-csv")
    # Stripped, empty tags dropped, tags of items missing from movies.csv dropped and counted.
    assert raw.tags.values.tolist() == [[1, 1, "pixar"], [2, 1, "Pixar"], [2, 3, "politics"]]
    assert raw.counts["tags_read"] == 4 and raw.counts["unknown_item_tags_dropped"] == 1
    items = raw.items.set_index("item_id")
    assert items.loc[3, "text"] == "American President, The (1995)"  # the text columns, joined
    assert items.loc[3, "display_title"] == "American President, The (1995)"
    assert items.loc[1, "display_genres"] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert items.loc[1, "display_year"] == 1995 and items.loc[4, "display_year"] is None


def test_movielens_100k_display_fields(ml100k_dir):
    items = load_raw(ml100k_dir, "movielens-100k").items.set_index("item_id")
    assert items.loc[1, "display_title"] == "Toy Story (1995)"
    assert items.loc[1, "display_genres"] == ["Animation", "Children's", "Comedy"]
    assert items.loc[1, "display_year"] == 1995


BAD_TAGS = {
    "non-numeric user": (
        "userId,movieId,tag\n1,1,fun\nx,2,dull\n",
        r"column 'userId', data row 2 .*non-numeric id 'x'",
    ),
    "missing column": ("userId,movieId,label\n1,1,fun\n", r"column 'tag', header: missing column"),
    "missing file": (None, r"file not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_TAGS))
def test_bad_tags_table_names_file_column_and_row(tmp_path, case):
    tags, message = BAD_TAGS[case]
    write_csv_dataset(tmp_path, tags=tags or "")
    if tags is None:
        (tmp_path / "tags.csv").unlink()
    with pytest.raises(ValueError, match=f"tags.csv: {message}"):
        load_raw(tmp_path, "movielens-csv")


def test_text_tags_and_display_config_errors_name_the_key():
    base = {"file": "r.csv", "header": True, "user": "u", "item": "i", "rating": "r"}
    items = {"file": "i.csv", "header": True, "id": "id"}

    def parse(features=(), **extra):
        return parse_dataset_config(
            {"ratings": base, "items": {**items, "features": list(features)}, **extra}
        )

    text = {"name": "text", "kind": "text", "columns": ["title"]}
    assert parse([text]).items.features[0].dim == 32 and parse([text]).items.features[0].encoder == "ngrams"
    with pytest.raises(ValueError, match=r"items.features\[0\]: a text feature needs text 'columns'"):
        parse([{"name": "text", "kind": "text"}])
    with pytest.raises(ValueError, match=r"items.features\[0\]: tags: true needs a top-level 'tags' table"):
        parse([{**text, "tags": True}])
    with pytest.raises(ValueError, match=r"items.features\[0\].dim: expected an integer >= 1"):
        parse([{**text, "dim": 0}])
    with pytest.raises(ValueError, match=r"items.features\[0\].model: a local path or gs:// URI is required"):
        parse([{**text, "encoder": "sentence"}])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['buckets'\]"):
        parse([{**text, "buckets": 8}])
    with pytest.raises(ValueError, match=r"tags.tag: the column name is required"):
        parse([text], tags={"file": "t.csv", "header": True, "user": "u", "item": "i"})
    with pytest.raises(ValueError, match=r"display\[0\]: feature 'genres' is not an item feature"):
        parse([text], display=[{"name": "genres", "feature": "genres"}])
    with pytest.raises(ValueError, match=r"display\[1\]: give either 'column'"):
        parse([text], display=[{"name": "title", "column": "title"}, {"name": "x"}])


def test_string_ids_keep_leading_zeros_and_name_bad_rows(tmp_path):
    config = {
        "ratings": {"file": "r.csv", "header": True, "user": "u", "item": "i", "rating": "r", "id_type": "string"},
        "items": {"file": "i.csv", "header": True, "id": "i"},
    }  # fmt: skip
    (tmp_path / "i.csv").write_text("i\nB00X\n01\n1\n")
    (tmp_path / "r.csv").write_text("u,i,r\n01,01,4\n1,1,3\n001,B00X,5\nu1,gone,2\n")
    raw = load_raw(tmp_path, config)
    assert raw.counts["unknown_item_ratings_dropped"] == 1
    users = raw.user_vocab[raw.ratings["user_id"]].tolist()
    assert list(zip(users, raw.item_vocab[raw.ratings["item_id"]].tolist(), strict=True)) == [
        ("01", "01"),
        ("1", "1"),
        ("001", "B00X"),
    ]
    (tmp_path / "r.csv").write_text("u,i,r\n01,01,4\n ,1,3\n")
    with pytest.raises(ValueError, match=r"r.csv: column 'u', data row 2 .*missing id"):
        load_raw(tmp_path, config)
    (tmp_path / "i.csv").write_text("i\nB00X\n01\nB00X \n")
    with pytest.raises(ValueError, match=r"i.csv: column 'i', data row 3 .*duplicate id 'B00X'"):
        load_raw(tmp_path, config)
    with pytest.raises(ValueError, match=r"ratings.id_type: expected one of"):
        load_raw(tmp_path, config | {"ratings": config["ratings"] | {"id_type": "str"}})


def test_parquet_integer_categories_with_gaps_match_request_values(tmp_path):
    from metarec.features import FeatureEncoder, fit_feature_schema

    write_csv_dataset(tmp_path)
    # pandas writes an integer column with a gap as float64: 3 is stored as 3.0.
    pd.DataFrame({"userId": [1, 2, 3], "occ": [1, None, 3]}).to_parquet(tmp_path / "users.parquet")
    raw_config = {
        "ratings": {"file": "ratings.csv", "header": True, "user": "userId", "item": "movieId", "rating": "rating",
                    "rating_scale": [0.5, 5], "rating_step": 0.5},
        "users": {"file": "users.parquet", "id": "userId",
                  "features": [{"name": "occ", "kind": "categorical", "column": "occ"}]},
        "items": {"file": "movies.csv", "header": True, "id": "movieId"},
    }  # fmt: skip
    raw = load_raw(tmp_path, raw_config)
    assert raw.users["occ"].tolist()[::2] == ["1", "3"] and pd.isna(raw.users["occ"][1])
    users = parse_dataset_config(raw_config).users.features
    schema = {"user_features": fit_feature_schema(raw.users, users), "item_features": []}
    assert schema["user_features"][0]["vocab"] == ["1", "3"]
    assert FeatureEncoder(schema).encode_user_dict({"occ": 3}).cat.tolist() == [[2]]


def test_quote_key_reads_quoted_fields_with_any_one_character_sep(tmp_path):
    import csv

    with open(tmp_path / "movies.csv", "w", newline="") as handle:
        csv.writer(handle, delimiter=";").writerows(
            [["id", "title", "genres"], [1, "Alpha; Beta (1981)", "Drama"]]
        )
    with open(tmp_path / "ratings.csv", "w", newline="") as handle:
        csv.writer(handle, delimiter=";", quoting=csv.QUOTE_ALL).writerows(
            [["u", "i", "r"], [1, 1, 4], [2, 1, 5]]
        )
    config = {
        "ratings": {"file": "ratings.csv", "sep": ";", "header": True, "user": "u", "item": "i", "rating": "r"},
        "items": {"file": "movies.csv", "sep": ";", "header": True, "id": "id",
                  "features": [{"name": "year", "kind": "numeric", "column": "title", "parse": "title_year"}]},
    }  # fmt: skip
    # Without the key a ';' file keeps today's reading (quotes are text): the split title is caught, not kept.
    with pytest.raises(
        ValueError, match=r"movies.csv: column '\(all\)', data row 1 .*expected 3 fields, got 4"
    ):
        load_raw(tmp_path, config)
    quoted = {key: value | {"quote": True} for key, value in config.items()}
    raw = load_raw(tmp_path, quoted)
    assert raw.items[["item_id", "year"]].to_numpy().tolist() == [[1, 1981]]
    assert raw.ratings["rating"].tolist() == [4, 5]
    with pytest.raises(ValueError, match=r"items.quote: quoted fields need a one-character sep"):
        parse_dataset_config(config | {"items": config["items"] | {"sep": "::", "quote": True}})
    assert (
        load_dataset_config("movielens-100k").items.quote is False
        and load_dataset_config("movielens-csv").items.quote
    )


def test_row_numbers_say_blank_lines_are_not_counted(tmp_path):
    # The bad rating is on physical line 7: after the header and two blank lines it is data row 4.
    write_csv_dataset(
        tmp_path, ratings="userId,movieId,rating,timestamp\n1,1,4,1\n\n1,2,4,1\n\n2,1,4,1\n2,2,9,1\n"
    )
    with pytest.raises(
        ValueError, match=r"data row 4 \(1-based; the header and blank lines are not counted\)"
    ):
        load_raw(tmp_path, "movielens-csv")
    write_csv_dataset(tmp_path, movies=MOVIES_CSV.replace("\n2,", "\n\n2,") + "x5,Bad Id (1999),Drama\n")
    with pytest.raises(
        ValueError, match=r"movies.csv: column 'movieId', data row 5 \(1-based; the header and blank"
    ):
        load_raw(tmp_path, "movielens-csv")


def test_multi_character_separator_rows_are_checked_like_others(tmp_path):
    (tmp_path / "movies.dat").write_text("10::GoldenEye (1995)::Action\n")
    config = {
        "ratings": {"file": "ratings.dat", "sep": "::", "names": ["u", "i", "r", "t"], "user": "u", "item": "i",
                    "rating": "r", "timestamp": "t"},
        "items": {"file": "movies.dat", "sep": "::", "names": ["id", "title", "genres"], "id": "id"},
    }  # fmt: skip
    for text, got in (("1::10::5::1::9\n", 5), ("1::10::5\n", 3)):
        (tmp_path / "ratings.dat").write_text("1::10::5::1\n\n" + text)
        with pytest.raises(
            ValueError, match=rf"ratings.dat: column '\(all\)', data row 2 .*expected 4 fields, got {got}"
        ):
            load_raw(tmp_path, config)


def test_text_invalid_in_the_encoding_names_the_line(tmp_path):
    write_csv_dataset(tmp_path, movies=MOVIES_CSV)
    (tmp_path / "movies.csv").write_bytes(MOVIES_CSV.encode() + b"5,Caf\xe9 (1999),Drama\n")
    with pytest.raises(ValueError, match=r"movies.csv: line 6 of the file .*not valid utf-8.*encoding"):
        load_raw(tmp_path, "movielens-csv")
    write_csv_dataset(tmp_path)
    # Past the first read buffers: the typed read, the shape check and the string read all meet it.
    rows = "".join(f"1,{i % 3 + 1},4,{i}\n" for i in range(20_000))
    (tmp_path / "ratings.csv").write_bytes(
        f"userId,movieId,rating,timestamp\n{rows}".encode() + b"2,1,4,1\xe9\n"
    )
    with pytest.raises(ValueError, match=r"ratings.csv: line 20002 of the file .*not valid utf-8"):
        load_raw(tmp_path, "movielens-csv")
