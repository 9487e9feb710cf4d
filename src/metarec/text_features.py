"""Dense vectors from item text (titles, tags) for the ``text`` feature kind.

Two encoders, both fitted on TRAINING (warm) items only and applied to every item:

- ``ngrams`` (default, no download): hashed word unigrams and bigrams plus character 3-5-grams within
  words, TF-IDF weighted with document frequencies of the training items, then a truncated SVD (latent
  semantic analysis) fitted on the training items reduces them to ``dim`` numbers.
- ``sentence``: a pretrained sentence-transformers model read from a local folder or ``gs://`` prefix
  (never from a hub at run time); its embeddings are reduced to ``dim`` numbers by a PCA fitted on the
  training items.

The vectors are computed once, at preprocessing, and stored per item in ``items.parquet``: the catalogue
is fixed when a model is packaged, so serving never runs (or ships) a text encoder.
"""

from __future__ import annotations

import contextlib
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

BUCKETS = 1 << 20  # hash space of the n-grams; collisions are rare at catalogue sizes
MIN_DF = 2  # an n-gram must occur in two training items to say anything shared between items
CHAR_NGRAMS = (3, 4, 5)
MAX_TAGS_PER_ITEM = 50
_WORD = re.compile(r"[^\W_]+")


def tag_texts(tags: pd.DataFrame, max_tags: int = MAX_TAGS_PER_ITEM) -> dict[int, str]:
    """Joins each item's tags into one text, most often applied first.

    Args:
        tags: ``item_id`` and ``tag`` per applied tag (already restricted to the tags allowed).
        max_tags: most distinct tags kept per item.

    Returns:
        item id -> ``"tag one, tag two, ..."`` (distinct lower-cased tags).
    """
    if tags.empty:
        return {}
    frame = pd.DataFrame({"item_id": tags["item_id"].to_numpy(), "tag": tags["tag"].str.lower().to_numpy()})
    counts = frame.groupby(["item_id", "tag"]).size().reset_index(name="n")
    counts = counts.sort_values(["item_id", "n", "tag"], ascending=[True, False, True], kind="stable")
    return {
        int(item): ", ".join(group["tag"].head(max_tags))
        for item, group in counts.groupby("item_id", sort=False)
    }


def _ngrams(text: str) -> list[str]:
    words = _WORD.findall(text.lower())
    grams = [f"w {w}" for w in words] + [f"b {a} {b}" for a, b in zip(words, words[1:], strict=False)]
    for word in words:
        padded = f"<{word}>"
        grams += [f"c {padded[i : i + n]}" for n in CHAR_NGRAMS for i in range(len(padded) - n + 1)]
    return grams


def _hashed_counts(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, bucket, count) triplets of the hashed n-gram counts of each text."""
    rows: list[int] = []
    cols: list[int] = []
    for row, text in enumerate(texts):
        buckets = [zlib.crc32(gram.encode("utf-8")) % BUCKETS for gram in _ngrams(text)]
        rows += [row] * len(buckets)
        cols += buckets
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    key = np.asarray(rows, np.int64) * BUCKETS + np.asarray(cols, np.int64)
    unique, counts = np.unique(key, return_counts=True)
    return unique // BUCKETS, unique % BUCKETS, counts.astype(np.float64)


def _sparse(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    index = torch.from_numpy(np.stack([rows, cols]).astype(np.int64))
    values_t = torch.from_numpy(values.astype(np.float32))
    return torch.sparse_coo_tensor(index, values_t, shape, check_invariants=True).coalesce()


def _top_components(matrix: torch.Tensor, q: int, seed: int) -> torch.Tensor:
    """Right singular vectors [columns, q] of ``matrix`` (sparse or dense), signs fixed deterministically."""
    q = min(q, *matrix.shape)
    if q < 1:
        return torch.zeros(matrix.shape[1], 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, components = torch.svd_lowrank(matrix, q=q, niter=6)
    # An SVD is unique only up to the sign of each component: make the largest loading positive.
    largest = components.abs().argmax(dim=0)
    signs = torch.sign(components[largest, torch.arange(components.shape[1])])
    return components * torch.where(signs == 0, 1.0, signs)


def _pad(vectors: torch.Tensor, dim: int) -> np.ndarray:
    out = np.zeros((vectors.shape[0], dim), dtype=np.float32)
    out[:, : vectors.shape[1]] = vectors.numpy()
    return out


def ngram_vectors(
    texts: Sequence[str], fit_rows: np.ndarray, dim: int, seed: int = 0
) -> tuple[np.ndarray, dict]:
    """TF-IDF of hashed n-grams reduced by a truncated SVD, both fitted on ``fit_rows`` only.

    Args:
        texts: one text per item.
        fit_rows: boolean mask of the training items the weights and the SVD are fitted on.
        dim: output width (zero-padded when the training items span fewer dimensions).
        seed: seed of the randomised SVD.

    Returns:
        ``(vectors float32 [N, dim], description)``; the description (n-gram settings, vocabulary
        size) goes into schema.json.
    """
    n = len(texts)
    rows, cols, counts = _hashed_counts(texts)
    in_fit = fit_rows[rows] if rows.size else np.zeros(0, bool)
    used, df = np.unique(cols[in_fit], return_counts=True)
    keep_cols = used[df >= MIN_DF]
    df = df[df >= MIN_DF]
    n_fit = int(fit_rows.sum())
    idf = np.log((1.0 + n_fit) / (1.0 + df)) + 1.0
    position = np.searchsorted(keep_cols, cols)
    known = np.zeros(cols.size, dtype=bool)
    if keep_cols.size:
        known = keep_cols[np.minimum(position, keep_cols.size - 1)] == cols
    rows, position, counts = rows[known], position[known], counts[known]
    weights = (1.0 + np.log(counts)) * idf[position]
    norms = np.sqrt(np.bincount(rows, weights=weights**2, minlength=n))
    weights = weights / norms[rows]
    matrix = _sparse(rows, position, weights, (n, int(keep_cols.size)))
    fit_index = torch.from_numpy(np.flatnonzero(fit_rows))
    fit_matrix = matrix.index_select(0, fit_index).coalesce()
    components = _top_components(fit_matrix, dim, seed)
    vectors = _pad(torch.sparse.mm(matrix, components), dim)
    description = {
        "encoder": "ngrams",
        "ngrams": {
            "words": [1, 2],
            "chars_within_words": list(CHAR_NGRAMS),
            "buckets": BUCKETS,
            "min_df": MIN_DF,
        },
        "weighting": "tfidf (sublinear tf, smoothed idf, l2 rows)",
        "reduction": "truncated svd",
        "vocabulary": int(keep_cols.size),
    }
    return vectors, description


@contextlib.contextmanager
def _local_model(uri: str) -> Iterator[Path]:
    if uri.startswith("gs://"):
        from metarec import storage  # lazy: only gs:// models need the storage client

        with storage.local_copy(uri) as local_dir:
            yield Path(local_dir)
        return
    path = Path(uri)
    if not path.is_dir():
        raise ValueError(f"sentence-embedding model {uri!r}: no such folder (a local path or gs:// prefix)")
    yield path


def sentence_vectors(
    texts: Sequence[str], fit_rows: np.ndarray, dim: int, model_uri: str, seed: int = 0
) -> tuple[np.ndarray, dict]:
    """Sentence-transformers embeddings reduced by a PCA fitted on ``fit_rows`` only.

    Args:
        texts: one text per item.
        fit_rows: boolean mask of the training items the PCA is fitted on.
        dim: output width.
        model_uri: local folder or ``gs://`` prefix of a saved sentence-transformers model.
        seed: seed of the randomised SVD behind the PCA.

    Returns:
        ``(vectors float32 [N, dim], description)``.

    Raises:
        ValueError: the model folder is missing or cannot be loaded.
        ImportError: sentence-transformers is not installed (``pip install metarec[text]``).
    """
    from sentence_transformers import SentenceTransformer  # optional dependency, only for this encoder

    # Never reach a model hub: the model must be entirely in the folder.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _local_model(model_uri) as folder:
        try:
            model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        except Exception as exc:  # the library raises many types for a bad folder
            raise ValueError(f"sentence-embedding model {model_uri!r} could not be loaded: {exc}") from exc
        embeddings = model.encode(
            list(texts), batch_size=64, convert_to_numpy=True, normalize_embeddings=True
        )
    embeddings = np.asarray(embeddings, dtype=np.float32)
    # A text with no token the model knows pools to zeros (or NaN): such an item has no usable text.
    unusable = ~np.isfinite(embeddings).all(axis=1)
    unusable |= np.abs(np.nan_to_num(embeddings)).sum(axis=1) == 0
    fit_rows = fit_rows & ~unusable
    embeddings = torch.from_numpy(np.where(unusable[:, None], 0.0, embeddings).astype(np.float32))
    fit = embeddings[torch.from_numpy(np.flatnonzero(fit_rows))]
    mean = fit.mean(dim=0, keepdim=True) if len(fit) else torch.zeros(1, embeddings.shape[1])
    components = _top_components(fit - mean, dim, seed)
    vectors = _pad((embeddings - mean) @ components, dim)
    vectors[unusable] = np.nan
    description = {
        "encoder": "sentence",
        "model": model_uri,
        "embedding_dim": int(embeddings.shape[1]),
        "reduction": "pca",
        "fitted_on_items": int(fit_rows.sum()),
    }
    return vectors, description


def text_vectors(
    spec: Any, texts: Sequence[str], fit_rows: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, dict]:
    """Encodes one text feature for every item (see :func:`ngram_vectors` / :func:`sentence_vectors`).

    Args:
        spec: the text FeatureSpec (``encoder``, ``dim``, ``model``).
        texts: one text per item ("" when the item has none).
        fit_rows: boolean mask of the training items encoders are fitted on.
        seed: seed of the randomised SVD.

    Returns:
        ``(vectors float32 [N, dim], description)``; items without text get NaN rows (missing).
    """
    fit_rows = np.asarray(fit_rows, dtype=bool)
    has_text = np.array([bool(t and t.strip()) for t in texts])
    if spec.encoder == "sentence":
        vectors, description = sentence_vectors(texts, fit_rows & has_text, spec.dim, spec.model, seed)
    else:
        vectors, description = ngram_vectors(texts, fit_rows & has_text, spec.dim, seed)
    vectors[~has_text] = np.nan
    description.setdefault("fitted_on_items", int((fit_rows & has_text).sum()))
    return vectors, description
