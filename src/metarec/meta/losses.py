"""Masked losses of the inner loop (MSE) and of the meta-update (MSE or L1) over padded task rows."""

from __future__ import annotations

import torch


def masked_mse(predictions: torch.Tensor, ratings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the real rows only (padding rows have mask 0 and weigh nothing).

    Args:
        predictions: Float[N] predicted ratings.
        ratings: Float[N] true ratings.
        mask: Float[N] 1 for real rows, 0 for padding.

    Returns:
        Scalar loss (0 when there is no real row).
    """
    return ((predictions - ratings) ** 2 * mask).sum() / mask.sum().clamp(min=1.0)


def masked_mae(predictions: torch.Tensor, ratings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the real rows only (see :func:`masked_mse`)."""
    return ((predictions - ratings).abs() * mask).sum() / mask.sum().clamp(min=1.0)


OUTER_LOSSES = {"mse": masked_mse, "l1": masked_mae}
