"""Explanations are exact: the support rows' shares sum to the adapted score's change, the feature
groups' Shapley shares sum to the prior, and the scores explained are the ones adaptation serves."""

from __future__ import annotations

import collections
import copy
import itertools
import json
import math

import pytest
import torch
from test_fast_adapt import USER_TERMS, random_model
from test_model import N_ITEMS

from metarec.explain import Explainer, _shapley, embedding_blocks, explanation_documents
from metarec.features import EncodedFeatures, FeatureDims
from metarec.meta import Adapter, AdaptSettings

LR = 0.3
EXACT = 1e-9  # float64 sums
SERVED = 2e-5  # float64 explanation vs the float32 served scores


def one_user(model, n_support=6, seed=3):
    generator = torch.Generator().manual_seed(seed)
    user = (
        torch.tensor([1, 4]),
        torch.randn(1, generator=generator),
        (torch.rand(4, generator=generator) < 0.5).float(),
    )
    items = torch.randperm(N_ITEMS, generator=generator)[:n_support]
    ratings = torch.randint(1, 6, (n_support,), generator=generator).float()
    return user, items, ratings


def served_scores(model, user, items, ratings, targets, steps):
    """What serving computes: the generic inner loop of the one adapt/score API (float32)."""
    adapter = Adapter(model, AdaptSettings.from_dict(mode="head", inner_lr=LR))
    users = EncodedFeatures(*(tensor[None] for tensor in user))
    state = adapter.adapt(users, items[None], ratings[None], torch.ones(1, len(items)), steps)
    return adapter.score(users, state, targets[None])[0]


@pytest.mark.parametrize(
    "terms", ["bias_factors_prior", "bias_factors_prior_content", "bias_prior", "bias_factors_sgd", "none"]
)
@pytest.mark.parametrize("steps", [0, 1, 5])
def test_support_shares_sum_to_the_served_change(terms, steps):
    model = random_model(**USER_TERMS[terms])
    user, items, ratings = one_user(model)
    targets = torch.arange(N_ITEMS)
    explanation = Explainer(model, "head", LR).adapt(user, items, ratings, targets, steps)
    served = served_scores(model, user, items, ratings, targets, steps)
    assert torch.allclose(explanation.scores.float(), served, atol=SERVED)
    prior = model(*user, targets)
    assert torch.allclose(explanation.prior.float(), prior, atol=SERVED)
    change = explanation.scores - explanation.prior
    assert torch.allclose(explanation.contributions.sum(1), change, atol=EXACT, rtol=0)
    assert explanation.contributions.shape == (N_ITEMS, len(items))
    if steps == 0:
        # Zero up to float64 rounding: the rows' logits come from a vmapped pass and the prior's from a
        # plain one, whose kernels may round differently (exactly 0 on some CPUs, ~1e-16 on others).
        assert explanation.contributions.abs().max() <= EXACT
    else:
        assert change.abs().max() > 1e-3  # the adaptation moved something, so the check above bites
        # Shares keep the sign of the logit shares (the secant slope is positive).
        same = (explanation.contributions * explanation.logit_contributions) >= 0
        assert bool(same.all())


def test_one_rating_owns_the_whole_change():
    model = random_model(**USER_TERMS["bias_factors_prior"])
    user, items, ratings = one_user(model, n_support=1)
    explanation = Explainer(model, "head", LR).adapt(user, items, ratings, torch.arange(N_ITEMS), 5)
    assert torch.allclose(explanation.contributions[:, 0], explanation.scores - explanation.prior, atol=EXACT)


def test_a_high_rating_pulls_its_own_score_up():
    """A rating above the prediction raises that item's score, and its own row is why."""
    model = random_model(**USER_TERMS["bias_factors_prior"])
    user, items, _ = one_user(model, n_support=4)
    ratings = torch.tensor([5.0, 1.0, 1.0, 1.0])
    explanation = Explainer(model, "head", LR).adapt(user, items, ratings, items, 5)
    assert explanation.contributions[0, 0] > 0
    assert explanation.contributions[0, 1:].max() < explanation.contributions[0, 0]


def test_a_gauss_newton_step_is_split_by_each_rows_own_residual():
    """Only the user bias moves (head lr 0), by one Gauss-Newton step ``-C^-1 sum_i g_i``: row i's share
    is ``-C^-1 g_i``, proportional to ``slope_i * (r_i - p_i)``. The sum check alone would also pass
    with the step spread evenly over the rows."""
    model = random_model(**USER_TERMS["bias_prior"])
    user, items, _ = one_user(model, n_support=4)
    ratings = torch.tensor([5.0, 1.0, 5.0, 4.0])
    explanation = Explainer(model, "head", 0.0).adapt(user, items, ratings, torch.arange(N_ITEMS), 1)
    predictions = model(*user, items).double()
    low, high = model.rating_min, model.rating_max
    residual = (predictions - low) * (high - predictions) / (high - low) * (ratings.double() - predictions)
    assert residual.sum().abs() > 0.1 and bool((residual.sign() != residual[0].sign()).any())
    shares = explanation.logit_contributions
    expected = residual / residual.sum() * shares.sum(1, keepdim=True)
    torch.testing.assert_close(shares, expected, rtol=1e-4, atol=1e-9)


def test_shapley_values_of_a_known_game():
    """v(S) = sum of w over S, plus 6 when all three groups are present: the Shapley values are
    w_i + 6 / 3 = (3, 4, 5) for w = (1, 2, 3); another weighting of the coalitions (Banzhaf: w_i + 1.5)
    would fail the prior test's sum check, and test_prior_shares_average_the_rating_change_over_all_orders
    checks the values themselves on a model."""
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    coalitions = torch.tensor(list(itertools.product([0, 1], repeat=3)), dtype=torch.bool)
    values = (coalitions.double() @ weights + 6.0 * coalitions.all(1)).unsqueeze(1)  # [2^G, K=1]
    expected = torch.tensor([[3.0, 4.0, 5.0]], dtype=torch.float64)
    torch.testing.assert_close(_shapley(coalitions, values), expected)


@pytest.mark.parametrize("terms", ["bias_factors_prior", "bias_factors_prior_content"])
def test_prior_shares_sum_to_the_prior_score(terms):
    model = random_model(**USER_TERMS[terms])
    user, _, _ = one_user(model)
    targets = torch.arange(N_ITEMS)
    schema = {
        "user_features": [{"name": "gender", "kind": "categorical"}, {"name": "zip", "kind": "hashed"},
                          {"name": "age", "kind": "numeric"}, {"name": "hobbies", "kind": "multi_hot"}],
        "item_features": [{"name": "decade", "kind": "categorical"}, {"name": "genres", "kind": "multi_hot"},
                          {"name": "year", "kind": "numeric"}, {"name": "length", "kind": "numeric"}],
    }  # fmt: skip
    explanation = Explainer(model, "head", LR, schema).prior(user, targets)
    assert explanation.groups == [
        "gender",
        "zip",
        "hobbies",
        "age",
        "decade",
        "genres",
        "year+length",
        "item_id",
    ]
    assert torch.allclose(explanation.prior.float(), model(*user, targets), atol=SERVED)
    total = explanation.baseline + explanation.shares.sum(1)
    assert torch.allclose(total, explanation.prior, atol=EXACT, rtol=0)
    # Cold items (no learned id) get no share from the id: their id is the baseline's.
    cold = model.encoder.item_warm_idx == 0
    assert bool(cold.any()) and explanation.shares[cold, -1].abs().max() < EXACT
    assert explanation.shares[~cold, -1].abs().max() > 1e-4


def test_only_head_mode_is_exact():
    with pytest.raises(ValueError, match="adapt mode 'head'"):
        Explainer(random_model(), "decision", LR)


def test_block_names_follow_the_embedder_order():
    dims = FeatureDims([3, 5], 2, 4)
    assert embedding_blocks(None, dims, "user") == ["user_cat0", "user_cat1", "user_multi", "user_numeric"]


def test_documents_add_up_and_name_the_top_ratings():
    model = random_model(**USER_TERMS["bias_factors_prior"])
    user, items, ratings = one_user(model, n_support=8)
    explainer = Explainer(model, "head", LR)
    ids = [f"item{n}" for n in range(N_ITEMS)]
    documents = explanation_documents(
        explainer, user, items.tolist(), ratings.tolist(), [0, 5], 5, ids, top=3
    )
    for document in documents:
        assert len(document["ratings"]) == 3
        named = sum(entry["contribution"] for entry in document["ratings"])
        assert abs(document["from_ratings"] - named - document["other_ratings"]) < EXACT
        assert abs(document["score"] - document["prior"] - document["from_ratings"]) < EXACT
        features = document["prior_features"]
        assert abs(features["baseline"] + sum(features["shares"].values()) - document["prior"]) < EXACT
        magnitudes = [abs(entry["contribution"]) for entry in document["ratings"]]
        assert magnitudes == sorted(magnitudes, reverse=True)
        assert {entry["item_id"] for entry in document["ratings"]} <= {ids[i] for i in items.tolist()}
    prior_only = explanation_documents(explainer, user, [], [], [0], 5, ids)
    assert prior_only[0]["ratings"] == [] and prior_only[0]["score"] == prior_only[0]["prior"]


def test_prior_without_user_features_switches_the_item_content_terms():
    """A data set without a user file has no user features (user embedding width 0): the item groups'
    decoder columns start at 0, and the groups took no content columns, so the full coalition kept the
    content bias/factors at their baseline and the explained prior missed the model's (by ~2.0 here)."""
    model = random_model(
        user_dims=FeatureDims([], 0, 0),
        user_bias=True,
        user_factors=3,
        user_bias_prior=2.0,
        item_content=True,
    )
    with torch.no_grad():  # content terms large enough that leaving them out shows
        for name, parameter in model.named_parameters():
            if "content" in name:
                parameter.add_(0.5 * torch.randn_like(parameter))
    user = (torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0))
    targets = torch.arange(N_ITEMS)
    explanation = Explainer(model, "head", LR).prior(user, targets)
    assert explanation.groups == ["item_cat0", "item_multi", "item_numeric", "item_id"]
    assert torch.allclose(explanation.prior.float(), model(*user, targets), atol=SERVED)
    total = explanation.baseline + explanation.shares.sum(1)
    assert torch.allclose(total, explanation.prior, atol=EXACT, rtol=0)


def test_prior_shares_average_the_rating_change_over_all_orders():
    """docs/explanations.md: a group's share is the average change of the prior *score* when the group is
    revealed, over all orders of revealing the groups. The shares were the logits' Shapley values rescaled
    by one secant per item: they add up the same way but differ (by up to ~0.06 rating points here). The
    coalition values come from the model's own forward pass on a copy with the hidden groups' encodings
    zeroed (the "missing" encoding; the id at the cold row), not from the explainer."""
    model = random_model(**USER_TERMS["bias_factors_prior_content"])
    user, _, _ = one_user(model)
    targets = torch.arange(N_ITEMS)
    explanation = Explainer(model, "head", LR).prior(user, targets)
    groups = explanation.groups
    assert groups == ["user_cat0", "user_cat1", "user_multi", "user_numeric", "item_cat0", "item_multi",
                      "item_numeric", "item_id"]  # fmt: skip

    def value(shown: frozenset) -> torch.Tensor:
        copy_ = copy.deepcopy(model)
        encoder = copy_.encoder
        cat, num, multi = (tensor.clone() for tensor in user)
        for slot in (0, 1):
            if f"user_cat{slot}" not in shown:
                cat[slot] = 0
        num = num if "user_numeric" in shown else torch.zeros_like(num)
        multi = multi if "user_multi" in shown else torch.zeros_like(multi)
        for name, buffer in (("item_cat0", encoder.item_cat), ("item_numeric", encoder.item_num),
                             ("item_multi", encoder.item_multi), ("item_id", encoder.item_warm_idx)):  # fmt: skip
            if name not in shown:
                buffer.zero_()
        with torch.no_grad():
            return copy_.double()(cat, num.double(), multi.double(), targets)

    values = {frozenset(s): value(frozenset(s)) for n in range(9) for s in itertools.combinations(groups, n)}
    assert torch.allclose(values[frozenset(groups)], explanation.prior, atol=EXACT, rtol=0)
    assert torch.allclose(values[frozenset()], torch.full_like(explanation.prior, explanation.baseline))
    # Count, over every order, which group is revealed after which coalition; then average the changes.
    counts: collections.Counter = collections.Counter()
    for order in itertools.permutations(groups):
        for position, group in enumerate(order):
            counts[frozenset(order[:position]), group] += 1
    n_orders = math.factorial(len(groups))
    expected = torch.zeros(N_ITEMS, len(groups), dtype=torch.float64)
    for (before, group), count in counts.items():
        change = values[before | {group}] - values[before]
        expected[:, groups.index(group)] += count / n_orders * change
    torch.testing.assert_close(explanation.shares, expected, atol=1e-9, rtol=0)


def test_a_saturated_score_is_explained_with_finite_numbers():
    """A prior logit beyond ~37 rounds the float64 rating to the scale's end, where inverting the sigmoid
    gave inf and NaN shares: a document strict JSON cannot hold."""
    model = random_model(**USER_TERMS["bias_factors_prior"])
    with torch.no_grad():
        model.decoder[-1].bias.add_(40.0)
    user, items, ratings = one_user(model, n_support=8)
    ids = [f"item{n}" for n in range(N_ITEMS)]
    documents = explanation_documents(
        Explainer(model, "head", LR), user, items.tolist(), ratings.tolist(), [0, 5], 5, ids, top=3
    )
    json.dumps(documents, allow_nan=False)  # raises on NaN / inf
    for document in documents:
        assert abs(document["score"] - document["prior"] - document["from_ratings"]) < 1e-6
