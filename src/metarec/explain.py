"""Exact explanations of an adapted score: which of the user's ratings moved it, and the feature prior.

In adapt mode ``"head"`` the inner loop adapts only parameters that enter an item's logit linearly
(the last decoder layer, the user bias, the user factors), and every inner step moves them by a sum
of per-support-row terms:

* SGD on the head: the support MSE's gradient is a sum over rows, so row i's share of a step is
  ``-lr * grad_i``.
* The damped Gauss-Newton step of the user terms (:func:`metarec.meta.user_terms.user_newton_step`):
  ``-C^-1 (g + 2 prior (theta - theta_0))``; ``C`` depends only on the current predictions, so the step
  is linear in ``g = sum_i g_i`` and in ``theta - theta_0``, which is itself the sum of the rows'
  earlier shares. Row i's share is ``-C^-1 (g_i + 2 prior A_i)`` with ``A_i`` its accumulated share.

Tracking each row's accumulated share ``A_i`` through every step therefore splits the total move
exactly: ``theta_final - theta_0 = sum_i A_i``, and an item's logit change is ``sum_i phi . A_i``. The
curvature ``C`` and the predictions at which each step is taken are those of the real loop (all rows
together), so a row's share is its contribution *given the other rows*, not the effect of deleting it.

Scores are ratings, ``rating_min + span * sigmoid(logit)``: each logit share is scaled by the secant
slope ``(adapted - prior) / (logit change)`` of that item, which keeps signs and makes the shares sum
to the rating change exactly.

The un-adapted (prior) score is split over feature groups of the decoder input (each user feature, each
item feature, the item id with its learned bias and factors) by exact Shapley values of the score itself
(rating scale: each group's average score change when revealed, over all orders) against a
baseline of an anonymous user and an unknown item with no features (every group at its "missing"
encoding, the id at the cold fallback row): ``baseline + sum(shares) = prior``.

Everything runs in float64 on a CPU copy of the model so the sums hold to ~1e-9; the scores agree with the
float32 serving path to ~1e-5.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import grad, vmap

from metarec.features import EncodedFeatures
from metarec.meta import Adapter, AdaptSettings
from metarec.meta.user_terms import user_design, user_newton_step
from metarec.model import USER_PARAMETERS, PreferenceModel, inner_learning_rates

EXPLAIN_MODE = "head"
MAX_SHAPLEY_GROUPS = 12  # 2^12 decoder evaluations per item; more groups are merged per entity


@dataclass
class AdaptExplanation:
    """One user's adapted scores and their exact decomposition.

    Attributes:
        prior: Float64[K] scores of the un-adapted model.
        scores: Float64[K] adapted scores (= prior + contributions.sum(1)).
        contributions: Float64[K, S] rating-scale share of each support row in each item's change.
        logit_contributions: Float64[K, S] the same shares on the logit scale (exactly additive).
    """

    prior: torch.Tensor
    scores: torch.Tensor
    contributions: torch.Tensor
    logit_contributions: torch.Tensor


@dataclass
class PriorExplanation:
    """The prior scores split over feature groups.

    Attributes:
        baseline: the score of an anonymous user for an unknown item without features.
        groups: group names (user features, item features, ``item_id``).
        shares: Float64[K, G] rating-scale Shapley share of each group (baseline + sum = prior).
        prior: Float64[K] the prior scores explained.
    """

    baseline: float
    groups: list[str]
    shares: torch.Tensor
    prior: torch.Tensor


class Explainer:
    """Explains the adapted scores of one model (build once per model; holds a float64 copy).

    Args:
        model: the trained model.
        mode: its adapt mode; only ``"head"`` is exactly decomposable.
        inner_lr: the inner learning rate of the adaptation to explain.
        schema: the preprocessing schema (names the feature groups); None names them by position.

    Raises:
        ValueError: an adapt mode other than ``"head"``.
    """

    def __init__(
        self, model: PreferenceModel, mode: str, inner_lr: float, schema: dict[str, Any] | None = None
    ):
        if mode != EXPLAIN_MODE:
            raise ValueError(
                f"exact explanations need adapt mode {EXPLAIN_MODE!r} (scores linear in the adapted "
                f"parameters); this model adapts in mode {mode!r}"
            )
        self.model = copy.deepcopy(model).cpu().double().eval()  # float64 on the CPU, whatever serves
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.params = dict(self.model.named_parameters())
        self.adapter = Adapter(self.model, AdaptSettings.from_dict(mode=mode, inner_lr=inner_lr), self.params)
        self.rates = inner_learning_rates(self.model, self.adapter.adapted_names, inner_lr, self.params)
        self.user_names = [name for name in USER_PARAMETERS if name in self.adapter.adapted_names]
        self.newton = self.model.user_bias_prior is not None and bool(self.user_names)
        self.user_blocks = embedding_blocks((schema or {}).get("user_features"), self.model.user_dims, "user")
        self.item_blocks = embedding_blocks((schema or {}).get("item_features"), self.model.item_dims, "item")

    # ------------------------------------------------------------------------------ adaptation

    def _inputs(self, user: tuple[torch.Tensor, ...], items: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cat, num, multi = (tensor.reshape(1, -1) for tensor in user)
        inputs = self.adapter.inputs(EncodedFeatures(cat, num.double(), multi.double()), items.reshape(1, -1))
        return tuple(tensor[0] for tensor in inputs)

    def _logits(self, adapted: dict[str, torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ratings = self.adapter.predict(adapted, inputs)
        low, high = self.model.rating_min, self.model.rating_max
        # A logit beyond ~37 rounds the rating to the scale's end, where the inverse is infinite: cap it
        # at +-27.6 (1e-12 of the span from either end), far beyond any trained model's scores.
        margin = (high - low) * 1e-12
        ratings = ratings.clamp(low + margin, high - margin)
        return torch.log(ratings - low) - torch.log(high - ratings)

    def adapt(
        self,
        user: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        support_items: torch.Tensor,
        support_ratings: torch.Tensor,
        items: torch.Tensor,
        steps: int,
    ) -> AdaptExplanation:
        """Runs the inner loop on one user's support rows, tracking each row's share of every step.

        Args:
            user: the user's encoded features ``(cat[C], num[D], multi[M])``.
            support_items: Long[S] rated items.
            support_ratings: Float[S] their ratings.
            items: Long[K] items to explain.
            steps: inner steps (as the served adaptation).

        Returns:
            The decomposition of ``items``' adapted scores over the support rows.
        """
        support = self._inputs(user, support_items)
        targets = self._inputs(user, items)
        ratings = support_ratings.double()
        n_rows = int(support_items.shape[0])
        start = self.adapter.initial()
        shares = {
            name: torch.zeros(n_rows, *tensor.shape, dtype=tensor.dtype) for name, tensor in start.items()
        }
        one_hot = torch.eye(n_rows, dtype=torch.float64)
        # The loss of row i alone (mask = e_i) is n times its term in the mean over the n rows.
        row_grad = vmap(grad(self.adapter.loss), in_dims=(None, None, None, 0))
        with torch.no_grad():
            for _ in range(steps):
                current = {name: start[name] + shares[name].sum(0) for name in start}
                gradients = {
                    name: g / n_rows for name, g in row_grad(current, support, ratings, one_hot).items()
                }
                moves = {name: -self.rates[name] * gradients[name] for name in start}
                if self.newton:
                    moves.update(self._newton_moves(current, support, start, shares, gradients, n_rows))
                for name in start:
                    shares[name] = shares[name] + moves[name]
            final = {name: start[name] + shares[name].sum(0) for name in start}
            prior_logits = self._logits(start, targets)
            final_logits = self._logits(final, targets)
            # Logits are affine in the adapted parameters: row i's share is the logit at start + A_i.
            per_row = vmap(self._logits, in_dims=(0, None))(
                {name: start[name] + shares[name] for name in start}, targets
            )
            logit_shares = (per_row - prior_logits).T  # [K, S]
            prior, scores = self.model.to_rating(prior_logits), self.model.to_rating(final_logits)
            scale = _secant(self.model, prior_logits, logit_shares.sum(1), scores - prior)
        return AdaptExplanation(prior, scores, logit_shares * scale.unsqueeze(1), logit_shares)

    def _newton_moves(self, current, support, start, shares, gradients, n_rows) -> dict[str, torch.Tensor]:
        """Each row's share of one Gauss-Newton step of the user terms (the step is linear in them)."""
        predictions = self.adapter.predict(current, support)
        design = user_design(self.model, predictions, self.adapter.item_factor_rows(current, support))
        rows = (n_rows, n_rows)
        mine = {name: start[name] + shares[name] for name in self.user_names}
        stepped = user_newton_step(
            self.model, predictions.expand(rows), design.expand(*rows, design.shape[-1]),
            torch.ones(rows, dtype=torch.float64), mine, start,
            {name: gradients[name] for name in self.user_names},
        )  # fmt: skip
        return {name: stepped[name] - mine[name] for name in self.user_names}

    # ----------------------------------------------------------------------------- feature prior

    def prior(
        self, user: tuple[torch.Tensor, torch.Tensor, torch.Tensor], items: torch.Tensor
    ) -> PriorExplanation:
        """Splits the un-adapted scores of ``items`` over feature groups by exact Shapley values.

        Args:
            user: the user's encoded features ``(cat[C], num[D], multi[M])``.
            items: Long[K] items.

        Returns:
            Baseline score and each group's share per item.
        """
        model, encoder = self.model, self.model.encoder
        cat, num, multi = (
            user[0].reshape(1, -1),
            user[1].reshape(1, -1).double(),
            user[2].reshape(1, -1).double(),
        )
        with torch.no_grad():
            user_vec = encoder.user(cat, num, multi)[0]
            user_base = encoder.user(torch.zeros_like(cat), torch.zeros_like(num), torch.zeros_like(multi))[0]
            item_vec = encoder.item(
                encoder.item_cat[items], encoder.item_num[items], encoder.item_multi[items]
            )
            item_base = encoder.item(
                torch.zeros_like(encoder.item_cat[items]), torch.zeros_like(encoder.item_num[items]),
                torch.zeros_like(encoder.item_multi[items]),
            )  # fmt: skip
            # The content terms (item bias and factors read from the features) switch with the features.
            content = (model.content_design(items), model.content_rows(
                torch.zeros_like(encoder.item_cat[items]), torch.zeros_like(encoder.item_num[items]),
                torch.zeros_like(encoder.item_multi[items]),
            ))  # fmt: skip
            groups, columns, content_columns = self._groups(user_vec.shape[0], item_vec.shape[1])
            n_groups = len(groups)
            coalitions = torch.tensor(list(itertools.product([0, 1], repeat=n_groups)), dtype=torch.bool)
            logits = torch.stack([self._coalition_logits(c, columns, content_columns, user_vec, user_base, item_vec,
                                                         item_base, content, items) for c in coalitions])  # fmt: skip
            # The game is the prior *score* (rating scale), as documented: Shapley values of the logits
            # rescaled by a secant only add up the same way, and differ from each group's average
            # rating change (by up to ~0.06 in tests/test_explain.py's random model).
            scores = model.to_rating(logits)  # [2^G, K]
            shares = _shapley(coalitions, scores)  # [K, G]; sums to prior - baseline (efficiency)
        # The empty coalition (the same for every item) and the full one.
        return PriorExplanation(float(scores[0, 0]), groups, shares, scores[-1])

    def _groups(self, user_width: int, item_width: int) -> tuple[list[str], list, list]:
        """Group names; per group, the decoder-input columns it switches (``"item_id"`` for the id) and the
        content-design columns it switches (empty for user groups and the id)."""
        names, columns, content_columns = [], [], []
        user_blocks, item_blocks = self.user_blocks, self.item_blocks
        content_blocks = self.model.content_blocks()
        if len(user_blocks) + len(item_blocks) + 1 > MAX_SHAPLEY_GROUPS:
            user_blocks = ["user features"] if user_blocks else []
            item_blocks = ["item features"] if item_blocks else []
            content_blocks = [slice(0, self.model.content_width())] if content_blocks else []
        for blocks, offset, total, item_side in (
            (user_blocks, 0, user_width, False),
            (item_blocks, user_width, item_width, True),
        ):
            step = total // len(blocks) if blocks else 0
            for position, name in enumerate(blocks):
                names.append(name)
                columns.append(torch.arange(offset + position * step, offset + (position + 1) * step))
                # By side, not by offset: without user features the item blocks start at column 0.
                content_columns.append(content_blocks[position] if item_side else slice(0, 0))
        names.append("item_id")
        columns.append("item_id")
        content_columns.append(slice(0, 0))
        return names, columns, content_columns

    def _coalition_logits(self, coalition, columns, content_columns, user_vec, user_base, item_vec, item_base,
                          content, items):  # fmt: skip
        model = self.model
        warm = model.encoder.item_warm_idx[items]
        rows = torch.cat([user_base.expand(len(warm), -1), item_base], dim=1)
        actual = torch.cat([user_vec.expand(len(warm), -1), item_vec], dim=1)
        content_actual, content_now = content[0], content[1].clone()
        warm_now = torch.zeros_like(warm)
        for present, cols, content_cols in zip(coalition.tolist(), columns, content_columns, strict=True):
            if not present:
                continue
            if isinstance(cols, str):
                warm_now = warm
            else:
                rows[:, cols] = actual[:, cols]
                content_now[:, content_cols] = content_actual[:, content_cols]
        rows = torch.cat([rows, model.encoder.item_id(warm_now)], dim=1)
        logits = model.decoder(rows).squeeze(-1)
        logits = logits + model.item_offset(items, warm_idx=warm_now, content=content_now)
        factor_rows = model.item_factor_rows(items, warm_idx=warm_now, content=content_now)
        return model.user_offset(logits, factor_rows=factor_rows)


def embedding_blocks(features: list[dict[str, Any]] | None, dims, entity: str) -> list[str]:
    """Names of the blocks :class:`metarec.model.FeatureEmbedder` concatenates, in its order.

    One block per categorical/hashed feature, then one for all multi-hot features, then one for all
    numeric features (each block is one embedding wide).

    Args:
        features: the schema's feature list of the entity (None: name blocks by position).
        dims: the entity's ``FeatureDims``.
        entity: ``"user"`` or ``"item"`` (prefix of positional names).

    Returns:
        Block names.
    """
    if features is None:
        blocks = [f"{entity}_cat{slot}" for slot in range(len(dims.cat_sizes))]
        blocks += [f"{entity}_multi"] * (dims.n_multi > 0) + [f"{entity}_numeric"] * (dims.n_num > 0)
        return blocks
    blocks = [f["name"] for f in features if f["kind"] in ("categorical", "hashed")]
    multi = [f["name"] for f in features if f["kind"] == "multi_hot"]
    numeric = [f["name"] for f in features if f["kind"] not in ("categorical", "hashed", "multi_hot")]
    return blocks + ["+".join(multi)] * bool(multi) + ["+".join(numeric)] * bool(numeric)


def _shapley(coalitions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Exact Shapley values: Bool[2^G, G] coalitions (all of them), Float[2^G, K] values -> Float[K, G]."""
    n_groups = coalitions.shape[1]
    index = {tuple(c.tolist()): row for row, c in enumerate(coalitions)}
    shares = values.new_zeros(values.shape[1], n_groups)
    for row, coalition in enumerate(coalitions.tolist()):
        size = sum(coalition)
        for group in range(n_groups):
            if coalition[group]:
                continue
            weight = math.factorial(size) * math.factorial(n_groups - size - 1) / math.factorial(n_groups)
            joined = list(coalition)
            joined[group] = 1
            shares[:, group] += weight * (values[index[tuple(joined)]] - values[row])
    return shares


def _secant(
    model: PreferenceModel, start: torch.Tensor, logit_change: torch.Tensor, rating_change: torch.Tensor
):
    """Rating change per unit of logit change (the sigmoid's slope at ``start`` where the change is ~0)."""
    span = model.rating_max - model.rating_min
    probability = torch.sigmoid(start)
    slope = span * probability * (1 - probability)
    tiny = logit_change.abs() < 1e-9
    return torch.where(
        tiny, slope, rating_change / torch.where(tiny, torch.ones_like(logit_change), logit_change)
    )


def explanation_documents(
    explainer: Explainer,
    user: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    support_items: list[int],
    support_ratings: list[float],
    items: list[int],
    steps: int,
    item_ids: list[str],
    top: int = 5,
) -> list[dict[str, Any]]:
    """The ``explanation`` of each returned item, as the answers carry it (see docs/explanations.md).

    Args:
        explainer: the model's explainer.
        user: the user's encoded features ``(cat[C], num[D], multi[M])``.
        support_items: the item indices the user's state was adapted on (empty: the prior alone).
        support_ratings: their ratings.
        items: item indices to explain.
        steps: inner steps of the adaptation.
        item_ids: raw item id of each item index.
        top: most ratings listed by name (the rest are summed in ``other_ratings``).

    Returns:
        One document per item: ``prior``, ``from_ratings``, ``ratings`` [{item_id, rating,
        contribution}], ``other_ratings``, ``prior_features`` {baseline, shares}, ``score``.
    """
    targets = torch.tensor(items, dtype=torch.long)
    prior = explainer.prior(user, targets)
    if support_items:
        adapted = explainer.adapt(
            user,
            torch.tensor(support_items),
            torch.tensor(support_ratings, dtype=torch.float64),
            targets,
            steps,
        )
        scores, contributions = adapted.scores, adapted.contributions
    else:
        scores, contributions = prior.prior, prior.prior.new_zeros(len(items), 0)
    documents = []
    for row in range(len(items)):
        shares = contributions[row]
        order = torch.argsort(shares.abs(), descending=True, stable=True)[:top].tolist()
        listed = [
            {
                "item_id": item_ids[support_items[i]],
                "rating": support_ratings[i],
                "contribution": float(shares[i]),
            }
            for i in order
        ]
        documents.append(
            {
                "score": float(scores[row]),
                "prior": float(prior.prior[row]),
                "from_ratings": float(shares.sum()),
                "ratings": listed,
                "other_ratings": float(shares.sum() - sum(entry["contribution"] for entry in listed)),
                "prior_features": {
                    "baseline": prior.baseline,
                    "shares": dict(zip(prior.groups, prior.shares[row].tolist(), strict=True)),
                },
            }
        )
    return documents
