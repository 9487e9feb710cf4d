"""Text feature encoders: n-gram TF-IDF + SVD (default) and a pretrained sentence-embedding model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401

from metarec.data.config import FeatureSpec
from metarec.text_features import ngram_vectors, tag_texts, text_vectors

TITLES = [
    "Star Wars (1977)",
    "Return of the Jedi (1983)",
    "Star Trek: The Motion Picture (1979)",
    "Star Trek III: The Search for Spock (1984)",
    "Toy Story (1995)",
    "Toy Story 2 (1999)",
    "Batman (1989)",
    "Batman Returns (1992)",
    "Pulp Fiction (1994)",
    "",  # an item without text
    "Star Trek: First Contact (1996)",  # cold
    "Batman & Robin (1997)",  # cold
]
FIT = np.array([True] * 10 + [False] * 2)
NGRAMS = FeatureSpec(name="text", kind="text", columns=("title",), dim=4, encoder="ngrams")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_ngram_vectors_place_related_titles_together_and_are_deterministic():
    vectors, description = text_vectors(NGRAMS, TITLES, FIT)
    again, _ = text_vectors(NGRAMS, TITLES, FIT)
    assert vectors.shape == (12, 4) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, again)
    assert np.isnan(vectors[9]).all() and not np.isnan(np.delete(vectors, 9, axis=0)).any()
    assert description["encoder"] == "ngrams" and description["fitted_on_items"] == 9
    # A cold sequel lands next to its franchise, not next to an unrelated film.
    first_contact, robin = vectors[10], vectors[11]
    assert cosine(first_contact, vectors[3]) > cosine(first_contact, vectors[8])
    assert cosine(robin, vectors[7]) > cosine(robin, vectors[4])


def test_ngram_fit_sees_training_items_only():
    vectors, description = ngram_vectors(TITLES, FIT & np.array([bool(t) for t in TITLES]), dim=4)
    changed = [*TITLES[:10], "Completely Different Words Zyx (2001)", "Another Unseen Title Qwv (2002)"]
    other, other_description = ngram_vectors(changed, FIT & np.array([bool(t) for t in changed]), dim=4)
    # Cold items' text changes nothing that was fitted: vocabulary, weights, SVD, training vectors.
    assert description["vocabulary"] == other_description["vocabulary"]
    np.testing.assert_allclose(vectors[:10], other[:10], atol=1e-6)
    # An n-gram no training item has contributes nothing: a title of unseen words encodes as zeros.
    unseen, _ = ngram_vectors(["Star Wars", "Star Trek", "qqq zzz"], np.array([True, True, False]), dim=2)
    assert np.all(unseen[2] == 0)


def test_fewer_training_items_than_dims_pads_with_zeros():
    vectors, _ = ngram_vectors(
        ["Star Wars", "Star Trek", "Star Wars II"], np.array([True, True, False]), dim=8
    )
    assert vectors.shape == (3, 8) and np.all(vectors[:, 2:] == 0) and np.any(vectors[:, :2] != 0)


def test_tag_texts_keep_distinct_tags_most_applied_first():
    tags = pd.DataFrame({"item_id": [1, 1, 1, 2, 1], "tag": ["Pixar", "funny", "pixar", "dark", "zany"]})
    assert tag_texts(tags) == {1: "pixar, funny, zany", 2: "dark"}
    assert tag_texts(tags, max_tags=1) == {1: "pixar", 2: "dark"}
    assert tag_texts(tags.iloc[:0]) == {}


@pytest.fixture(scope="module")
def tiny_sentence_model(tmp_path_factory) -> Path:
    """A real sentence-transformers model, built and saved here (word embeddings + mean pooling)."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.modules import Pooling, WordEmbeddings
    from sentence_transformers.sentence_transformer.modules.tokenizer import WhitespaceTokenizer

    vocab = ["star", "wars", "trek", "toy", "story", "batman", "returns", "robin", "jedi", "pulp", "fiction"]
    vocab += [
        "the",
        "mission",
        "party",
        "letters",
        "haunting",
        "wedding",
        "planet",
        "funny",
        "scary",
        "space",
    ]
    generator = torch.Generator().manual_seed(0)
    words = WordEmbeddings(
        tokenizer=WhitespaceTokenizer(vocab=vocab, do_lower_case=True),
        embedding_weights=torch.randn(len(vocab), 16, generator=generator),
        update_embeddings=False,
    )
    model = st.SentenceTransformer(modules=[words, Pooling(16, pooling_mode="mean")], device="cpu")
    folder = tmp_path_factory.mktemp("sentence") / "model"
    model.save(str(folder))
    return folder


def test_sentence_encoder_from_a_local_folder(tiny_sentence_model):
    spec = FeatureSpec(name="text", kind="text", dim=3, encoder="sentence", model=str(tiny_sentence_model))
    titles = ["Batman", "Batman Returns", "Toy Story", "Star Wars", "", "Batman Robin", "zzz qqq"]
    fit = np.array([True, True, True, True, True, False, True])
    vectors, description = text_vectors(spec, titles, fit)
    # No text, or no word the model knows: missing (NaN), and left out of the PCA fit.
    assert vectors.shape == (7, 3) and np.isnan(vectors[[4, 6]]).all() and np.isfinite(vectors[:4]).all()
    assert description | {"model": None} == {
        "encoder": "sentence", "model": None, "embedding_dim": 16, "reduction": "pca", "fitted_on_items": 4
    }  # fmt: skip
    # PCA fitted on the training items: their vectors are centred.
    np.testing.assert_allclose(vectors[:4].mean(axis=0), 0.0, atol=1e-5)
    assert cosine(vectors[5], vectors[0]) > cosine(vectors[5], vectors[2])


def test_sentence_encoder_from_gcs(tiny_sentence_model, gcs_bucket):  # noqa: F811
    from metarec import storage

    uri = f"gs://{gcs_bucket}/models/tiny-sentence"
    storage.upload_dir(str(tiny_sentence_model), uri)
    spec = FeatureSpec(name="text", kind="text", dim=2, encoder="sentence", model=uri)
    local = FeatureSpec(name="text", kind="text", dim=2, encoder="sentence", model=str(tiny_sentence_model))
    titles = ["Batman", "Toy Story", "Star Wars", "Batman Robin"]
    fit = np.array([True, True, True, False])
    np.testing.assert_allclose(
        text_vectors(spec, titles, fit)[0], text_vectors(local, titles, fit)[0], atol=1e-6
    )


def test_sentence_encoder_missing_or_broken_model_is_a_clear_error(tmp_path):
    pytest.importorskip("sentence_transformers")
    spec = FeatureSpec(name="text", kind="text", dim=2, encoder="sentence", model=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="no such folder"):
        text_vectors(spec, ["a", "b"], np.array([True, True]))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "modules.json").write_text("not json")
    spec = FeatureSpec(name="text", kind="text", dim=2, encoder="sentence", model=str(tmp_path / "broken"))
    with pytest.raises(ValueError, match="could not be loaded"):
        text_vectors(spec, ["a", "b"], np.array([True, True]))


def test_preprocessing_with_the_sentence_encoder(tiny_sentence_model, tmp_path):
    import json

    import yaml
    from csv_release import write_csv_release

    from metarec.data.config import CONFIGS_DIR
    from metarec.preprocessing import run_preprocessing

    config = yaml.safe_load((CONFIGS_DIR / "movielens-csv.yaml").read_text())
    text = next(f for f in config["items"]["features"] if f["kind"] == "text")
    text.update(encoder="sentence", model=str(tiny_sentence_model), dim=4)
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump(config))
    source = write_csv_release(tmp_path / "raw", n_users=60, n_movies=40)
    run_preprocessing(str(source), str(tmp_path / "dataset.yaml"), None, str(tmp_path / "out"))
    schema = json.loads((tmp_path / "out" / "schema.json").read_text())
    entry = next(f for f in schema["item_features"] if f["kind"] == "text")
    assert entry["encoder"] == "sentence" and entry["model"] == str(tiny_sentence_model) and entry["dim"] == 4
    vectors = np.stack(pd.read_parquet(tmp_path / "out" / "items.parquet")["text_vector"].to_numpy())
    assert vectors.shape == (40, 4) and np.isfinite(vectors).all() and vectors.std(axis=0).min() > 0
