"""A platform team's own data set through a new config alone: the layout mistakes and data shapes that
used to fail deep inside a reader (or silently corrupt the tables) fail early, naming the key or the
file, column and row."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metarec.data.config import parse_dataset_config
from metarec.data.loaders import load_raw
from metarec.preprocessing import run_preprocessing

CONFIG = {
    "name": "shop",
    "ratings": {"file": "ratings.csv", "header": True, "user": "member", "item": "sku", "rating": "score",
                "timestamp": "when", "rating_scale": [0.5, 5.0], "rating_step": 0.5, "id_type": "string"},
    "items": {"file": "items.csv", "header": True, "id": "sku",
              "features": [{"name": "cats", "kind": "multi_hot", "column": "cats", "sep": ";"},
                           {"name": "text", "kind": "text", "columns": ["title"], "dim": 4}]},
}  # fmt: skip


def write_shop(root: Path, n_users: int = 40, n_items: int = 30, cats: list[str] | None = None) -> Path:
    """Unicode string ids with spaces, half stars, no users table, ';'-separated categories."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = [
        (f"user ü {u}", f"SKU-ä {i:03d}", float(rng.integers(1, 11)) / 2, 1_500_000_000 + 100 * u + int(i))
        for u in range(n_users)
        for i in rng.choice(n_items, 20, replace=False)
    ]
    pd.DataFrame(rows, columns=["member", "sku", "score", "when"]).to_csv(root / "ratings.csv", index=False)
    cats = cats or [("Garden;Kitchen, Dining" if i % 2 else "Tools") for i in range(n_items)]
    titles = [f"Widget {i}, deluxe" for i in range(n_items)]
    pd.DataFrame({"sku": [f"SKU-ä {i:03d}" for i in range(n_items)], "title": titles, "cats": cats}).to_csv(
        root / "items.csv", index=False
    )
    return root


def with_(path: list, value) -> dict:
    """CONFIG with one key set (path of keys and list indices)."""
    config = copy.deepcopy(CONFIG)
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return config


def test_the_shop_layout_preprocesses_from_its_config_alone(tmp_path):
    root = write_shop(tmp_path / "raw")
    summary = run_preprocessing(
        str(root), _write(tmp_path, CONFIG), {"item_split": "count"}, str(tmp_path / "out")
    )
    assert summary["n_users"] == 40 and summary["n_items"] == 30
    schema = json.loads((tmp_path / "out" / "schema.json").read_text())
    assert schema["item_features"][0]["vocab"] == ["Garden", "Kitchen, Dining", "Tools"]


def _write(tmp_path: Path, config: dict) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (["ratings", "item"], "member", r"ratings.item: column 'member' is already ratings.user"),
        (["ratings", "timestamp"], "score", r"ratings.timestamp: column 'score' is already ratings.rating"),
        (["ratings", "rating_scale"], ["one", "five"], r"ratings.rating_scale: expected a number, got 'one'"),
        (["ratings", "rating_step"], "half", r"ratings.rating_step: expected a number, got 'half'"),
        (["ratings", "rating_step"], None, r"ratings.rating_step: expected a number, got None"),
        (["ratings", "encoding"], "klingon", r"ratings.encoding: unknown text encoding 'klingon'"),
        (["items", "features"], "cats", r"items.features: expected a list of features, got 'cats'"),
        (["items", "features", 0, "column"], ["cats"], r"items.features\[0\].column: expected a column name"),
        (["items", "features", 0, "sep"], "", r"items.features\[0\].sep: expected a non-empty separator"),
        (["items", "features", 1, "columns"], "title", r"items.features\[1\].columns: expected a list"),
        # the header names the columns; the names were ignored without a word
        (["items", "names"], ["sku", "title", "cats"], r"items.names: only a CSV without a header row"),
    ],
)
def test_layout_mistakes_name_the_key_before_any_file_is_read(tmp_path, path, value, expected):
    # Each used to pass the config and then fail in a reader: a pyarrow KeyError ("Field exists 2
    # times"), a bare float() error, "unknown text encoding" without the key, "unhashable type: 'list'",
    # "empty separator", or a string read as a list of its characters.
    with pytest.raises(ValueError, match=f"dataset config .*cfg.yaml: {expected}"):
        load_raw(tmp_path / "no-data-needed", _write(tmp_path, with_(path, value)))


def test_names_given_as_one_string_are_refused():
    config = with_(["ratings", "header"], False)
    config["ratings"]["names"] = "member,sku,score,when"
    with pytest.raises(ValueError, match=r"ratings.names: expected a list of column names"):
        parse_dataset_config(config)


@pytest.mark.parametrize(
    ("section", "name"),
    [
        ("items", "item_id"),
        ("items", "is_cold"),
        ("items", "warm_idx"),
        ("items", "release"),
        ("items", "display_title"),
        ("items", "text_vector"),
        ("users", "user_split"),
        ("users", "user_id"),
    ],
)
def test_feature_names_metarec_writes_itself_are_refused(section, name):
    # An item feature named is_cold replaced items.parquet's cold flags with its text, and one named
    # release took the parsed release years instead of its own values, without a word.
    config = copy.deepcopy(CONFIG)
    feature = {"name": name, "kind": "categorical", "column": "title"}
    if section == "users":
        config["users"] = {"file": "users.csv", "header": True, "id": "member", "features": [feature]}
    else:
        config["items"]["features"].append(feature)
    with pytest.raises(ValueError, match=rf"{section}.features\[\d\]: feature name '{name}' is a column"):
        parse_dataset_config(config)


def test_a_label_holding_the_internal_separator_names_the_row(tmp_path):
    # With sep ";" the label "Sci|Fi" used to become the two labels "Sci" and "Fi".
    root = write_shop(tmp_path / "raw", cats=["Tools"] * 5 + ["Sci|Fi;Toys"] + ["Tools"] * 24)
    with pytest.raises(ValueError, match=r"items.csv: column 'cats', data row 6 .*label with a '\|'"):
        load_raw(root, _write(tmp_path, CONFIG))
    labels = with_(["items", "features", 0], {"name": "cats", "kind": "multi_hot", "columns": ["title"],
                                              "labels": ["Sci|Fi"]})  # fmt: skip
    with pytest.raises(ValueError, match=r"items.features\[0\].labels: a label must not contain '\|'"):
        parse_dataset_config(labels)


def test_parquet_datetime_timestamps_are_unix_seconds(tmp_path):
    root = write_shop(tmp_path / "raw")
    ratings = pd.read_csv(root / "ratings.csv")
    expected = ratings["when"].to_numpy()
    ratings["when"] = pd.to_datetime(ratings["when"], unit="s")  # what pandas users write to Parquet
    ratings.to_parquet(root / "ratings.parquet")
    config = with_(["ratings", "file"], "ratings.parquet")
    raw = load_raw(root, _write(tmp_path, config))
    np.testing.assert_array_equal(raw.ratings["timestamp"].to_numpy(), expected)


def test_iso_dates_in_a_csv_timestamp_column_say_what_is_expected(tmp_path):
    root = write_shop(tmp_path / "raw")
    ratings = pd.read_csv(root / "ratings.csv")
    ratings["when"] = pd.to_datetime(ratings["when"], unit="s").dt.strftime("%Y-%m-%dT%H:%M:%S")
    ratings.to_csv(root / "ratings.csv", index=False)
    with pytest.raises(ValueError, match=r"ratings.csv: column 'when', data row 1 .* must hold unix seconds"):
        load_raw(root, _write(tmp_path, CONFIG))


def test_too_few_users_for_the_split_fail_at_preprocessing(tmp_path):
    # Four users and fractions [0.7, 0.1, 0.2] left no validation user: preprocessing, training and
    # evaluation (NaN scores) all ran, and only model selection failed.
    root = write_shop(tmp_path / "raw", n_users=4)
    config = _write(tmp_path, CONFIG)
    settings = {"item_split": "count", "cold_max_ratings": 0}  # no cold items: every user is a task
    with pytest.raises(
        ValueError, match=r"split_fractions=\[0.7, 0.1, 0.2\] of the 4 task users leave no val"
    ):
        run_preprocessing(str(root), config, settings, str(tmp_path / "out"))
    # Fractions that ask for no validation users are honoured.
    settings["split_fractions"] = [0.75, 0, 0.25]
    summary = run_preprocessing(str(root), config, settings, str(tmp_path / "out"))
    assert summary["users_per_split"] == {"train": 3, "val": 0, "test": 1}
