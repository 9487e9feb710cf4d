"""FeatureEncoder: fitting on training rows, encoding frames and request dicts, OOV and missing values."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from metarec.data.config import load_dataset_config
from metarec.features import FeatureEncoder, stable_hash_bucket

USER_SPECS = load_dataset_config("movielens-100k").users.features
CSV_ITEM_SPECS = load_dataset_config("movielens-csv").items.features
ITEM_SPECS = tuple(spec for spec in CSV_ITEM_SPECS if spec.kind != "text")
TEXT_SPEC = next(spec for spec in CSV_ITEM_SPECS if spec.kind == "text")

TRAIN_USERS = pd.DataFrame(
    {
        "age": [20.0, 30.0, 40.0, np.nan],
        "gender": ["M", "F", "M", None],
        "occupation": ["student", "none", "writer", "student"],
        "zip": ["85711", "94043", None, "12345"],
    }
)
WARM_ITEMS = pd.DataFrame({"genres": ["Comedy|Drama", "Action", ""], "year": [1990.0, 1995.0, 2000.0]})


@pytest.fixture
def encoder() -> FeatureEncoder:
    return FeatureEncoder.fit(TRAIN_USERS, WARM_ITEMS, USER_SPECS, ITEM_SPECS)


def test_fit_builds_vocabularies_and_statistics_from_training_rows(encoder):
    users = {f["name"]: f for f in encoder.schema["user_features"]}
    assert users["gender"]["vocab"] == ["F", "M"]
    assert users["occupation"]["vocab"] == ["none", "student", "writer"]  # "none" is a value, not missing
    assert users["age"]["mean"] == pytest.approx(30.0) and users["age"]["std"] == pytest.approx(
        np.std([20, 30, 40])
    )
    assert users["zip"] == {"name": "zip", "kind": "hashed", "buckets": 64}
    items = {f["name"]: f for f in encoder.schema["item_features"]}
    assert items["genres"]["vocab"] == ["Action", "Comedy", "Drama"]
    assert encoder.user_dims.cat_sizes == [3, 4, 65] and encoder.user_dims.n_num == 1
    assert (
        encoder.item_dims.cat_sizes == [] and encoder.item_dims.n_multi == 3 and encoder.item_dims.n_num == 1
    )


def test_schema_round_trip_encodes_identically(encoder):
    reloaded = FeatureEncoder(json.loads(json.dumps(encoder.schema)))
    frame = TRAIN_USERS.assign(gender=["M", "X", None, "F"])
    a, b = encoder.encode_users(frame), reloaded.encode_users(frame)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert FeatureEncoder(encoder.schema).user_dims == encoder.user_dims


def test_encode_users_oov_missing_and_standardisation(encoder):
    frame = pd.DataFrame(
        {"age": [30.0, 45.0, None], "gender": ["F", "X", None], "occupation": ["writer", "pilot", "none"],
         "zip": ["85711", None, "94043"]}
    )  # fmt: skip
    encoded = encoder.encode_users(frame)
    assert encoded.cat.dtype == torch.long and encoded.num.dtype == torch.float32
    assert encoded.cat[:, 0].tolist() == [1, 0, 0]  # F -> 1, unknown X -> 0, missing -> 0
    assert encoded.cat[:, 1].tolist() == [3, 0, 1]  # writer, OOV pilot, none
    # zip: a stable crc32 hash (same in every process, unlike hash()); literal values guard against changes.
    assert encoded.cat[:, 2].tolist() == [21, 0, 46]
    assert stable_hash_bucket("85711", 64) == 21
    std = np.std([20, 30, 40])
    assert encoded.num[:, 0].tolist() == pytest.approx([0.0, 15 / std, 0.0])


def test_missing_columns_encode_as_missing(encoder):
    encoded = encoder.encode_users(pd.DataFrame({"gender": ["M", "F"]}))
    assert encoded.cat.tolist() == [[2, 0, 0], [1, 0, 0]]
    assert encoded.num.tolist() == [[0.0], [0.0]]


def test_encode_items_multi_hot_from_string_or_list(encoder):
    encoded = encoder.encode_items(pd.DataFrame({"genres": ["Drama|Action|Western", ["Comedy"], None]}))
    assert encoded.multi.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    assert encoded.num.tolist() == [[0.0], [0.0], [0.0]]  # year absent -> missing -> 0


def test_encode_user_dict(encoder):
    one = encoder.encode_user_dict({"age": 25, "gender": "F", "zip": 85711})
    assert one.cat.shape == (1, 3) and one.num.shape == (1, 1) and one.multi.shape == (1, 0)
    assert one.cat.tolist() == [[1, 0, 21]]  # the integer zip hashes like the string "85711"
    assert encoder.encode_user_dict({}).cat.tolist() == [[0, 0, 0]]
    with pytest.raises(ValueError, match=r"unknown user feature 'favourite_colour'"):
        encoder.encode_user_dict({"favourite_colour": "blue"})
    with pytest.raises(ValueError, match=r"user feature 'age' \(numeric\) must be a number"):
        encoder.encode_user_dict({"age": "old"})
    with pytest.raises(ValueError, match=r"user feature 'gender' \(categorical\)"):
        encoder.encode_user_dict({"gender": ["F"]})
    with pytest.raises(ValueError, match="must be a JSON object"):
        encoder.encode_user_dict(["F"])


def test_encode_item_dict_rejects_bad_multi_hot(encoder):
    assert encoder.encode_item_dict({"genres": ["Action"]}).multi.tolist() == [[1, 0, 0]]
    with pytest.raises(ValueError, match=r"item feature 'genres' \(multi_hot\)"):
        encoder.encode_item_dict({"genres": 3})


def test_no_user_features():
    encoder = FeatureEncoder.fit(None, WARM_ITEMS, (), ITEM_SPECS)
    encoded = encoder.encode_users(pd.DataFrame(index=range(4)))
    assert encoded.cat.shape == (4, 0) and encoded.num.shape == (4, 0) and encoded.multi.shape == (4, 0)
    with pytest.raises(ValueError, match="unknown user feature 'age'"):
        encoder.encode_user_dict({"age": 3})


def _text_encoder(vectors: list) -> FeatureEncoder:
    warm = WARM_ITEMS.assign(text=["a", "b", "c"], text_vector=vectors)
    return FeatureEncoder.fit(None, warm, (), (*ITEM_SPECS, TEXT_SPEC), {"text": {"encoder": "ngrams"}})


def test_text_vectors_join_the_numeric_block_standardised_on_training_items():
    dim = TEXT_SPEC.dim
    rng = np.random.default_rng(0)
    vectors = [rng.normal(3.0, 2.0, dim), rng.normal(3.0, 2.0, dim), None]  # the third item has no text
    encoder = _text_encoder(vectors)
    entry = encoder.schema["item_features"][-1]
    assert entry["kind"] == "text" and entry["dim"] == dim and entry["vector_column"] == "text_vector"
    assert entry["encoder"] == "ngrams" and entry["sources"] == {"columns": ["title"], "tags": True}
    stacked = np.stack(vectors[:2])
    assert entry["mean"] == pytest.approx(stacked.mean(axis=0).tolist())
    assert encoder.item_dims.n_num == 1 + dim and encoder.item_dims.n_multi == 3

    frame = pd.DataFrame({"genres": ["Action"] * 3, "year": [1995.0] * 3, "text_vector": vectors})
    num = encoder.encode_items(frame).num
    expected = (stacked - stacked.mean(axis=0)) / stacked.std(axis=0)
    assert torch.allclose(num[:2, 1:], torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    assert torch.equal(num[2, 1:], torch.zeros(dim))  # missing text = the training mean
    # The raw text column is not an input: only the stored vectors are.
    assert torch.equal(encoder.encode_items(frame.assign(text=["x", "y", "z"])).num, num)


def test_text_feature_in_a_request_must_be_its_vector():
    encoder = _text_encoder([np.ones(TEXT_SPEC.dim), np.zeros(TEXT_SPEC.dim), None])
    one = encoder.encode_item_dict({"text": [1.0] * TEXT_SPEC.dim})
    assert one.num.shape == (1, 1 + TEXT_SPEC.dim)
    with pytest.raises(ValueError, match=r"item feature 'text' \(text\) must be its encoded vector"):
        encoder.encode_item_dict({"text": "Toy Story"})
    with pytest.raises(ValueError, match="32 numbers"):
        encoder.encode_item_dict({"text": [1.0, 2.0]})
