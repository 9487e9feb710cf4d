"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from metarec.metrics import higher_is_better, mae, ndcg_at_k, ndcg_per_user, rating_metrics, rmse


def test_mae_and_rmse_pool_real_rows_only():
    predictions = torch.tensor([[4.0, 2.0, 9.0], [3.0, 0.0, 0.0]])
    targets = torch.tensor([[5.0, 2.0, 1.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # Real rows: errors 1, 0, 2 (the 9-vs-1 padding row must be ignored).
    assert mae(predictions, targets, mask) == pytest.approx(1.0)
    assert rmse(predictions, targets, mask) == pytest.approx(math.sqrt(5.0 / 3.0))


def test_mae_without_rows_is_nan():
    assert math.isnan(mae(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2)))


def test_ndcg_hand_computed_single_user():
    # Predicted order: item 1 (r=3, gain 7), item 2 (r=1, gain 1), item 0 (r=5, gain 31).
    predictions = [0.1, 0.9, 0.5]
    targets = [5.0, 3.0, 1.0]
    assert ndcg_at_k(predictions, targets, 1) == pytest.approx(7 / 31)
    expected_3 = (7 + 1 / math.log2(3) + 31 / 2) / (31 + 7 / math.log2(3) + 1 / 2)
    assert ndcg_at_k(predictions, targets, 3) == pytest.approx(expected_3)
    # k beyond the query set scores all rows: same as k=3.
    assert ndcg_at_k(predictions, targets, 5) == pytest.approx(expected_3)


def test_ndcg_perfect_and_reversed_rankings():
    targets = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert ndcg_at_k(targets, targets, 3) == pytest.approx(1.0)
    reversed_dcg = 1 + 3 / math.log2(3) + 7 / 2
    ideal = 15 + 7 / math.log2(3) + 3 / 2
    assert ndcg_at_k(-targets, targets, 3) == pytest.approx(reversed_dcg / ideal)


def test_ndcg_padding_never_ranked_and_users_averaged():
    # User 0: padding row has the highest prediction but must not take rank 1.
    predictions = torch.tensor([[1.0, 2.0, 99.0], [2.0, 1.0, 0.0]])
    targets = torch.tensor([[2.0, 4.0, 5.0], [1.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    per_user = ndcg_per_user(predictions, targets, 1, mask)
    assert per_user[0].item() == pytest.approx(1.0)
    assert per_user[1].item() == pytest.approx(1 / 3)  # ranks r=1 (gain 1) first; ideal gain 3
    assert ndcg_at_k(predictions, targets, 1, mask) == pytest.approx((1.0 + 1 / 3) / 2)


def test_ndcg_user_with_zero_ideal_dcg_is_left_out():
    # User 1 has only zero gains (rating 0): no ranking information, excluded from the mean.
    predictions = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    targets = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    per_user = ndcg_per_user(predictions, targets, 1)
    assert math.isnan(per_user[1].item())
    assert ndcg_at_k(predictions, targets, 1) == pytest.approx(1 / 3)
    # A user without any real row is also excluded, and no informative user at all gives NaN.
    assert math.isnan(ndcg_at_k(predictions, targets, 1, torch.zeros(2, 2)))


def test_ndcg_ties_keep_query_order():
    targets = [1.0, 5.0]
    assert ndcg_at_k([3.0, 3.0], targets, 1) == pytest.approx(1 / 31)


def test_rating_metrics_bundle_and_direction():
    result = rating_metrics([[3.0, 4.0]], [[3.0, 5.0]])
    assert set(result) == {"mae", "rmse", "ndcg@1", "ndcg@3", "ndcg@5", "n_users", "n_rows"}
    assert result["mae"] == pytest.approx(0.5)
    assert result["ndcg@1"] == pytest.approx(1.0)
    assert result["n_rows"] == 2 and result["n_users"] == 1
    assert higher_is_better("ndcg@3") and not higher_is_better("mae") and not higher_is_better("rmse")
    with pytest.raises(ValueError):
        higher_is_better("precision")
    with pytest.raises(ValueError):
        mae([1.0, 2.0], [1.0])
