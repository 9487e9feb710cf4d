"""Model initialisation for meta-training: the architecture from the settings, the item side from data.

Before any meta-step the output starts at the global mean rating, the item bias at each warm item's
shrunk mean offset, and (with ``item_factor_init``) the item factors and bias at a biased matrix
factorisation of the train users' support rows, so meta-training refines a model that already ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from metarec.baselines import MFFoldIn
from metarec.model import PreferenceModel, logit

if TYPE_CHECKING:
    from metarec.tasks import Preprocessed
    from metarec.training import TrainSettings


def build_model(pre: Preprocessed, settings: TrainSettings) -> PreferenceModel:
    """Builds a fresh model for a preprocessed data set, initialised from the train users' rows.

    Args:
        pre: the loaded preprocessing output.
        settings: the training settings (architecture and the ``item_*_init`` keys).

    Returns:
        The model, its output starting at the training mean rating.
    """
    schema = pre.schema
    model = PreferenceModel(
        pre.encoder.user_dims,
        pre.encoder.item_dims,
        int(schema["n_warm_items"]),
        pre.item_features,
        pre.item_warm_idx,
        settings.model_config(float(schema["rating_min"]), float(schema["rating_max"])),
    )
    model.init_output(float(schema.get("global_mean", (model.rating_min + model.rating_max) / 2)))
    if model.item_bias is not None and settings.item_bias_init:
        init_item_bias(model, pre, settings.item_bias_shrink)
    if model.item_factors is not None and settings.item_factor_init:
        init_item_factors(model, pre, settings.item_factor_init_reg, settings.seed,
                          with_item_bias=settings.item_bias_init)  # fmt: skip
    if settings.item_content:
        init_item_content(model, pre, settings.item_content_reg)
    return model


def init_item_content(model: PreferenceModel, pre: Preprocessed, reg: float) -> None:
    """Starts the content terms at a ridge fit of the warm items' id rows on their features.

    Each item-side table (item bias, item factors) is regressed on :meth:`PreferenceModel.content_design`
    over the warm items, weighting each by its training rows (``n / (n + 10)``: a rarely rated item's
    row is mostly noise). The fit's intercept becomes row 0 (what a cold item adds to its content
    terms) and each warm item's id row keeps only its residual, so every warm item predicts exactly
    what it did before, while a cold item gets the bias and factors its features predict.

    Args:
        model: the model (its content layers, id tables and row 0 are overwritten).
        pre: the loaded ``Preprocessed``.
        reg: the ridge penalty, in weighted items.
    """
    _, items, _ = pre.training_rows()
    warm_of_item = pre.item_warm_idx.long()
    counts = torch.bincount(items.long(), minlength=model.n_items).double()
    is_warm = (warm_of_item > 0) & (counts > 0)
    warm_items = torch.nonzero(is_warm).squeeze(-1)
    rows = warm_of_item[warm_items]
    weights = counts[warm_items] / (counts[warm_items] + 10.0)
    with torch.no_grad():
        design = model.content_design(warm_items).double()
        design = torch.cat([design, torch.ones(len(warm_items), 1, dtype=torch.float64)], dim=1)
        penalty = torch.full((design.shape[1],), float(reg), dtype=torch.float64)
        penalty[-1] = 1e-6  # the intercept is not shrunk
        gram = design.T @ (design * weights[:, None]) + torch.diag(penalty)
        for layer, table in (
            (model.item_bias_content, model.item_bias),
            (model.item_factors_content, model.item_factors),
        ):
            if layer is None:
                continue
            targets = table.weight[rows].double()
            solution = torch.linalg.solve(gram, design.T @ (targets * weights[:, None]))
            layer.weight.copy_(solution[:-1].T.to(layer.weight.dtype))
            fitted = design[:, :-1] @ solution[:-1]
            table.weight[rows] = (targets - fitted).to(table.weight.dtype)
            table.weight[0] = solution[-1].to(table.weight.dtype)


def init_item_factors(
    model: PreferenceModel, pre: Preprocessed, reg: float, seed: int, with_item_bias: bool = True
) -> None:
    """Starts the item factors (and the item bias) from a biased MF of the train users' support rows.

    The ALS fit is the MF fold-in baseline's (``metarec.baselines.MFFoldIn``) with the model's factor
    width. Its rating-space terms are divided by the slope of the model's scaled sigmoid at the global
    mean, so that, before any meta-step, the model's logit terms move a prediction near the mean as
    much as the MF terms do.

    Args:
        model: the model (its item factors, and item bias when present, are overwritten).
        pre: the loaded ``Preprocessed``.
        reg: the ALS ridge penalty.
        seed: the ALS initialisation seed.
        with_item_bias: also start the item bias from the fit's item biases (fitted jointly with the
            factors, so they replace the shrunk means of :func:`init_item_bias`).
    """
    users, items, ratings = pre.training_rows()
    mf = MFFoldIn(factors=model.n_user_factors, reg=reg, seed=seed).fit(users, items, ratings, model.n_items)
    span = model.rating_max - model.rating_min
    fraction = min(max((mf.global_mean - model.rating_min) / span, 0.05), 0.95)
    slope = span * fraction * (1.0 - fraction)
    warm = pre.item_warm_idx.long()
    is_warm = warm > 0
    with torch.no_grad():
        table = torch.zeros_like(model.item_factors.weight)
        table[warm[is_warm]] = (mf.item_factors[is_warm] / slope).to(table.dtype)
        model.item_factors.weight.copy_(table)
        if model.item_bias is not None and with_item_bias:
            bias = torch.zeros_like(model.item_bias.weight)
            bias[warm[is_warm], 0] = (mf.item_bias[is_warm] / slope).to(bias.dtype)
            model.item_bias.weight.copy_(bias)


def init_item_bias(model: PreferenceModel, pre: Preprocessed, shrink: float) -> None:
    """Starts the item-bias table at each warm item's shrunk mean offset, in logit space.

    Uses only what meta-training sees: the train users' support rows. An item's offset is
    ``sum(rating - mean) / (count + shrink)`` (the item-bias baseline's estimate), mapped through the
    model's scaled sigmoid around the global mean so that, before any meta-step, the model predicts
    about ``mean + offset`` for the item.

    Args:
        model: the model (its item bias is overwritten).
        pre: the loaded ``Preprocessed``.
        shrink: pseudo-count of ratings at the global mean.
    """
    _, items, ratings = pre.training_rows()
    ratings = ratings.double()  # sums in float64 below
    warm = pre.item_warm_idx[items]
    mean = float(pre.schema.get("global_mean", ratings.mean().item() if len(ratings) else 3.0))
    size = model.item_bias.weight.shape[0]
    sums = torch.zeros(size, dtype=torch.float64).index_add_(0, warm, ratings - mean)
    counts = torch.zeros(size, dtype=torch.float64).index_add_(0, warm, torch.ones_like(ratings))
    offsets = sums / (counts + shrink)
    span = model.rating_max - model.rating_min
    base = logit((mean - model.rating_min) / span)
    table = torch.tensor([logit((mean + float(o) - model.rating_min) / span) - base for o in offsets])
    table[0] = 0.0  # the cold-item row
    with torch.no_grad():
        model.item_bias.weight.copy_(table.to(model.item_bias.weight.dtype).unsqueeze(-1))
