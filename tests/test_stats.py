"""Per-user metric parts and the paired bootstrap over users."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarec.features import EncodedFeatures
from metarec.metrics import mae, ndcg_at_k
from metarec.stats import paired_bootstrap, per_user_parts, query_rows, render_ci_markdown
from metarec.tasks import build_task_batch


def _batch(n_users: int, rng: np.random.Generator):
    """Users with 2-7 query ratings each (ragged, so padding is exercised)."""
    queries = []
    for _ in range(n_users):
        q = int(rng.integers(2, 8))
        queries.append((list(range(q)), rng.integers(1, 6, q).astype(float).tolist()))
    features = EncodedFeatures(torch.zeros(n_users, 0, dtype=torch.long), torch.zeros(n_users, 0),
                               torch.zeros(n_users, 0))  # fmt: skip
    return build_task_batch(features, [([1], [4.0])] * n_users, queries)


def _entry(batch, predictions: dict[str, torch.Tensor]) -> dict:
    return {
        "n_rows": query_rows(batch),
        "methods": {m: per_user_parts(p, batch) for m, p in predictions.items()},
    }


def test_per_user_parts_give_back_the_pooled_metrics():
    rng = np.random.default_rng(0)
    batch = _batch(30, rng)
    predictions = batch.query_ratings + torch.as_tensor(rng.normal(0, 0.8, batch.query_ratings.shape)).float()
    parts = per_user_parts(predictions, batch)
    rows = query_rows(batch)
    assert sum(parts["abs_err"]) / sum(rows) == pytest.approx(
        mae(predictions, batch.query_ratings, batch.query_mask)
    )
    informative = [v for v in parts["ndcg@3"] if v is not None]
    assert np.mean(informative) == pytest.approx(
        ndcg_at_k(predictions, batch.query_ratings, 3, batch.query_mask)
    )


def test_identical_methods_have_a_zero_interval():
    rng = np.random.default_rng(1)
    batch = _batch(40, rng)
    noisy = batch.query_ratings + torch.as_tensor(rng.normal(0, 1, batch.query_ratings.shape)).float()
    result = paired_bootstrap([_entry(batch, {"a": noisy, "b": noisy.clone()})], "a", "b", "mae", samples=200)
    assert result["diff"] == 0.0 and result["ci95"] == [0.0, 0.0] and result["includes_zero"]


def test_a_clearly_better_method_excludes_zero_and_a_coin_flip_does_not():
    rng = np.random.default_rng(2)
    seeds = []
    for _ in range(2):  # two seeds, each with its own users
        batch = _batch(60, rng)
        shape = batch.query_ratings.shape
        truth = batch.query_ratings
        good = truth + torch.as_tensor(rng.normal(0, 0.3, shape)).float()
        bad = truth + torch.as_tensor(rng.normal(0, 1.2, shape)).float()
        twin = truth + torch.as_tensor(rng.normal(0, 0.3, shape)).float()
        seeds.append(_entry(batch, {"good": good, "bad": bad, "twin": twin}))
    better = paired_bootstrap(seeds, "good", "bad", "mae", samples=500)
    assert better["ci95"][1] < 0 and not better["includes_zero"]
    ranking = paired_bootstrap(seeds, "good", "bad", "ndcg@3", samples=500)
    assert ranking["ci95"][0] > 0 and not ranking["includes_zero"]
    same = paired_bootstrap(seeds, "good", "twin", "mae", samples=500)
    assert same["includes_zero"]
    lo, hi = same["ci95"]
    assert lo <= same["diff"] <= hi
    text = render_ci_markdown({"user_cold": {"mae": {"meta": "good", "other": "twin", **same}}})
    assert "| user_cold | mae | good | twin |" in text and "| YES |" in text


def test_paired_bootstrap_refuses_unpaired_inputs():
    rng = np.random.default_rng(3)
    batch, other = _batch(5, rng), _batch(6, rng)
    entry = _entry(batch, {"a": batch.query_ratings})
    entry["methods"]["b"] = per_user_parts(other.query_ratings, other)
    with pytest.raises(ValueError, match="same users"):
        paired_bootstrap([entry], "a", "b", "mae")
    with pytest.raises(ValueError, match="'c' missing"):
        paired_bootstrap([entry], "a", "c", "mae")
