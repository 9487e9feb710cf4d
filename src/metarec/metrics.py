"""Rating-prediction and ranking metrics on padded per-user query sets.

All functions take ``[U, Q]`` tensors (one row per user, padded to Q query rows) and a mask of the
same shape (1 = real row). MAE and RMSE pool every real query row (as MeLU and most cold-start papers
report them); nDCG@k ranks the items *within* each user's query set by predicted rating, uses the gain
``2^r - 1`` and a ``log2(rank + 1)`` discount, and averages over users.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DEFAULT_NDCG_KS = (1, 3, 5)
# The metric registry: every metric a scenario reports (evaluation, report tables, summaries, model
# cards), and the subset each K-shot point keeps. Other modules import these, never repeat them.
METRIC_NAMES = ("mae", "rmse", *(f"ndcg@{k}" for k in DEFAULT_NDCG_KS))
KSHOT_METRICS = ("mae", "rmse", "ndcg@3")


def _as_float_tensor(values) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    return tensor.to(torch.float64)


def _prepare(predictions, targets, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Converts inputs to float64 ``[U, Q]`` tensors and checks their shapes agree."""
    predictions = _as_float_tensor(predictions)
    targets = _as_float_tensor(targets)
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ")
    mask = torch.ones_like(targets) if mask is None else _as_float_tensor(mask)
    if mask.shape != targets.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match targets {tuple(targets.shape)}")
    if predictions.dim() == 1:
        # A single user's query set.
        predictions, targets, mask = predictions[None], targets[None], mask[None]
    if predictions.dim() != 2:
        raise ValueError(f"expected [U, Q] or [Q] tensors, got {predictions.dim()} dimensions")
    return predictions, targets, (mask > 0).to(torch.float64)


def mae(predictions, targets, mask=None) -> float:
    """Mean absolute error over all real query rows.

    Args:
        predictions: Predicted ratings, ``[U, Q]`` or ``[Q]`` (tensor, array or nested list).
        targets: True ratings, same shape.
        mask: 1 for a real row, 0 for padding; None means every row is real.

    Returns:
        The MAE as a float; NaN when there is no real row.
    """
    predictions, targets, mask = _prepare(predictions, targets, mask)
    n_rows = mask.sum()
    if n_rows == 0:
        return math.nan
    return float(((predictions - targets).abs() * mask).sum() / n_rows)


def rmse(predictions, targets, mask=None) -> float:
    """Root mean squared error over all real query rows.

    Args:
        predictions: Predicted ratings, ``[U, Q]`` or ``[Q]``.
        targets: True ratings, same shape.
        mask: 1 for a real row, 0 for padding; None means every row is real.

    Returns:
        The RMSE as a float; NaN when there is no real row.
    """
    predictions, targets, mask = _prepare(predictions, targets, mask)
    n_rows = mask.sum()
    if n_rows == 0:
        return math.nan
    return float(torch.sqrt((((predictions - targets) ** 2) * mask).sum() / n_rows))


def ndcg_per_user(predictions, targets, k: int, mask=None) -> torch.Tensor:
    """nDCG@k of each user's query set, ranked by prediction within that set.

    Ties in the predictions keep the query-set order (stable sort), so a result never depends on
    the sort implementation. Users with no real row, or whose ideal DCG is 0 (every gain is 0),
    carry no ranking information and get NaN; :func:`ndcg_at_k` leaves them out of the average.

    Args:
        predictions: Predicted ratings, ``[U, Q]`` or ``[Q]``.
        targets: True ratings, same shape; the gain of a rating r is ``2^r - 1``.
        k: Cut-off (>= 1); a query set shorter than k is scored on all its rows.
        mask: 1 for a real row, 0 for padding; None means every row is real.

    Returns:
        Float64 tensor ``[U]`` of nDCG@k values in [0, 1], NaN for users without information.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    predictions, targets, mask = _prepare(predictions, targets, mask)
    n_users, n_rows = targets.shape
    if n_rows == 0:
        return torch.full((n_users,), math.nan, dtype=torch.float64)
    cutoff = min(k, n_rows)
    gains = (torch.pow(2.0, targets) - 1.0) * mask
    discounts = 1.0 / torch.log2(torch.arange(2, cutoff + 2, dtype=torch.float64))

    # Padding rows must sort last in the predicted ranking, whatever their (meaningless) prediction.
    ranked_scores = predictions.masked_fill(mask == 0, -math.inf)
    predicted_order = torch.argsort(ranked_scores, dim=1, descending=True, stable=True)[:, :cutoff]
    dcg = (torch.gather(gains, 1, predicted_order) * discounts).sum(dim=1)
    ideal_gains = torch.sort(gains, dim=1, descending=True).values[:, :cutoff]
    ideal_dcg = (ideal_gains * discounts).sum(dim=1)

    has_information = ideal_dcg > 0
    result = torch.full((n_users,), math.nan, dtype=torch.float64)
    result[has_information] = dcg[has_information] / ideal_dcg[has_information]
    return result


def ndcg_at_k(predictions, targets, k: int, mask=None) -> float:
    """nDCG@k averaged over users (see :func:`ndcg_per_user`).

    Args:
        predictions: Predicted ratings, ``[U, Q]`` or ``[Q]``.
        targets: True ratings, same shape.
        k: Cut-off (>= 1).
        mask: 1 for a real row, 0 for padding; None means every row is real.

    Returns:
        Mean nDCG@k over the users whose ideal DCG is positive; NaN when there is none.
    """
    per_user = ndcg_per_user(predictions, targets, k, mask)
    informative = per_user[~torch.isnan(per_user)]
    if informative.numel() == 0:
        return math.nan
    return float(informative.mean())


def rating_metrics(predictions, targets, mask=None, ks: Sequence[int] = DEFAULT_NDCG_KS) -> dict[str, float]:
    """All evaluation metrics of one method on one set of query sets.

    Args:
        predictions: Predicted ratings, ``[U, Q]`` or ``[Q]``.
        targets: True ratings, same shape.
        mask: 1 for a real row, 0 for padding; None means every row is real.
        ks: nDCG cut-offs.

    Returns:
        ``{"mae", "rmse", "ndcg@<k>" for k in ks, "n_users", "n_rows"}``; ``n_users`` counts users
        with at least one real query row.
    """
    predictions_t, targets_t, mask_t = _prepare(predictions, targets, mask)
    result = {"mae": mae(predictions_t, targets_t, mask_t), "rmse": rmse(predictions_t, targets_t, mask_t)}
    for k in ks:
        result[f"ndcg@{k}"] = ndcg_at_k(predictions_t, targets_t, k, mask_t)
    result["n_users"] = int((mask_t.sum(dim=1) > 0).sum())
    result["n_rows"] = int(mask_t.sum())
    return result


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (nDCG) or worse (MAE, RMSE).

    Args:
        metric: Metric name such as ``"ndcg@3"``, ``"mae"`` or ``"rmse"``.

    Returns:
        True for nDCG metrics, False for error metrics.

    Raises:
        ValueError: For an unknown metric name.
    """
    if metric.startswith("ndcg@"):
        return True
    if metric in ("mae", "rmse"):
        return False
    raise ValueError(f"unknown metric {metric!r}; expected mae, rmse or ndcg@<k>")
