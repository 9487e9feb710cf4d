"""The autograd-free serving adaptation equals the generic torch.func inner loop, case by case."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_model import N_ITEMS, N_WARM, adapt, predict, user_inputs

from metarec.features import EncodedFeatures, FeatureDims
from metarec.meta import Adapter, AdaptSettings
from metarec.meta.fast_adapt import FastAdapter, supports_fast_path
from metarec.model import PreferenceModel
from metarec.tasks import TaskBatch

ATOL = 1e-5
LR = 0.3
# Per-user terms: none, the bias and/or latent factors, by SGD or by the Gauss-Newton step with priors.
USER_TERMS = {
    "none": {},
    "bias_sgd": {"user_bias": True, "user_bias_lr": 5.0},
    "bias_prior": {"user_bias": True, "user_bias_prior": 2.0},
    "factors_sgd": {"user_factors": 3, "user_bias_lr": 5.0},
    "one_factor_prior": {"user_factors": 1, "user_bias_prior": 2.0},
    "bias_factors_sgd": {"user_bias": True, "user_factors": 3, "user_bias_lr": 5.0},
    "bias_factors_prior": {
        "user_bias": True,
        "user_factors": 3,
        "user_bias_prior": 2.0,
        "user_factor_prior": 6.0,
    },
    # Cold and warm items with their own content-derived item bias and factors (the training default).
    "bias_factors_prior_content": {
        "user_bias": True,
        "user_factors": 3,
        "user_bias_prior": 2.0,
        "item_content": True,
    },
}


def random_model(hidden=(16, 8), seed=0, user_dims=None, **kwargs) -> PreferenceModel:
    """A small model whose every parameter is random (biases and inner-lr scales non-zero too);
    ``user_dims`` None: two categorical, one numeric and four multi-hot user features."""
    torch.manual_seed(seed)
    user_dims = FeatureDims([3, 5], 1, 4) if user_dims is None else user_dims
    item_dims = FeatureDims([7], 2, 6)
    catalogue = EncodedFeatures(
        cat=torch.randint(0, 7, (N_ITEMS, 1)),
        num=torch.randn(N_ITEMS, 2),
        multi=(torch.rand(N_ITEMS, 6) < 0.3).float(),
    )
    warm = torch.cat([torch.arange(1, N_WARM + 1), torch.zeros(N_ITEMS - N_WARM, dtype=torch.long)])
    model = PreferenceModel(
        user_dims, item_dims, N_WARM, catalogue, warm, embed_dim=8, hidden=hidden, **kwargs
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = 0.5 if name.startswith(("inner_lr_log.", "item_bias.", "user_", "item_factors")) else 0.1
            parameter.add_(scale * torch.randn_like(parameter))
    return model.eval()


def padded_batch(model, lengths=(1, 4, 7, 2), n_query=6, seed=1) -> TaskBatch:
    """Tasks with different support lengths; padding rows hold random items and out-of-range ratings."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_tasks, width = len(lengths), max(lengths)
    cat, num, multi = user_inputs(model, batch=n_tasks)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).float()
    items = torch.randint(0, N_ITEMS, (n_tasks, width), generator=generator)
    ratings = torch.randint(1, 6, (n_tasks, width), generator=generator).float()
    # A padding row that leaked into the loss would pull hard: rating 40 is far outside [1, 5].
    ratings = torch.where(mask > 0, ratings, torch.full_like(ratings, 40.0))
    query_items = torch.randint(0, N_ITEMS, (n_tasks, n_query), generator=generator)
    query = (query_items, torch.zeros(n_tasks, n_query), torch.ones(n_tasks, n_query))
    return TaskBatch(cat, num, multi, items, ratings, mask, *query)


def generic(model, batch, steps, mode, items):
    adapted = adapt(model, batch, steps, LR, mode)
    return adapted, predict(model, adapted, batch.user_cat, batch.user_num, batch.user_multi, items, mode)


def fast_adapter(model, mode, steps) -> Adapter:
    adapter = Adapter(model, AdaptSettings(mode, steps, LR), fast=True)
    assert adapter.fast is not None
    return adapter


def users_of(batch) -> EncodedFeatures:
    return EncodedFeatures(batch.user_cat, batch.user_num, batch.user_multi)


def fast_adapt_and_score(model, mode, batch, steps, items):
    """The fast path's state and its scores of ``items`` (Long[T, N])."""
    adapter = fast_adapter(model, mode, steps)
    users = users_of(batch)
    state = adapter.adapt(users, batch.support_items, batch.support_ratings, batch.support_mask)
    return state, adapter.score(users, state, items)


# (learn_inner_lr, item_bias): each on and off.
OPTIONS = [(False, True), (True, False), (True, True)]
CASES = [
    (mode, terms, *options, steps)
    for mode, terms, options, steps in itertools.product(["decision", "head"], USER_TERMS, OPTIONS, [0, 1, 5])
]


@pytest.mark.parametrize(("mode", "user_terms", "learn_inner_lr", "item_bias", "steps"), CASES)
def test_fast_path_equals_generic_adapt_and_predict(mode, user_terms, learn_inner_lr, item_bias, steps):
    model = random_model(item_bias=item_bias, learn_inner_lr=learn_inner_lr, **USER_TERMS[user_terms])
    assert supports_fast_path(model, mode)
    batch = padded_batch(model)
    items = torch.cat([batch.support_items, batch.query_items], dim=1)
    expected_params, expected = generic(model, batch, steps, mode, items)

    adapted, scores = fast_adapt_and_score(model, mode, batch, steps, items)
    assert set(adapted) == set(expected_params)
    for name, tensor in expected_params.items():
        # Relative too: a Gauss-Newton step on a nearly saturated task can move a factor far (~100).
        expected_tensor = tensor.expand_as(adapted[name])
        torch.testing.assert_close(adapted[name], expected_tensor, atol=ATOL, rtol=ATOL, msg=name)
    torch.testing.assert_close(scores, expected, atol=ATOL, rtol=0)
    adapter = fast_adapter(model, mode, steps)
    before = adapter.score(users_of(batch), adapter.prior_state(len(batch)), batch.support_items)
    unadapted = model(batch.user_cat, batch.user_num, batch.user_multi, batch.support_items).detach()
    torch.testing.assert_close(before, unadapted, atol=ATOL, rtol=0)
    if steps > 0:
        # The comparison is not vacuous: adaptation moved the predictions well beyond the tolerance.
        n_support = batch.support_items.shape[1]
        assert float((scores[:, :n_support] - unadapted).abs().max()) > 1e-2


@pytest.mark.parametrize("hidden", [(), (12,), (16, 8, 4)])
@pytest.mark.parametrize("mode", ["decision", "head"])
def test_fast_path_handles_any_decoder_depth(hidden, mode):
    model = random_model(hidden=hidden, learn_inner_lr=True, **USER_TERMS["bias_factors_prior"])
    batch = padded_batch(model, lengths=(3, 5))
    items = torch.cat([batch.support_items, batch.query_items], dim=1)
    _, expected = generic(model, batch, 3, mode, items)
    _, scores = fast_adapt_and_score(model, mode, batch, 3, items)
    torch.testing.assert_close(scores, expected, atol=ATOL, rtol=0)


def test_user_bias_prior_takes_the_gauss_newton_step_not_sgd():
    """Same weights with and without a prior: the fast path must follow the generic path's choice."""
    with_prior = random_model(**USER_TERMS["bias_prior"])
    without = random_model(user_bias=True)
    without.load_state_dict(with_prior.state_dict())
    batch = padded_batch(with_prior)
    biases = {}
    for name, model in (("prior", with_prior), ("sgd", without)):
        fast, _ = fast_adapt_and_score(model, "decision", batch, 1, batch.query_items)
        biases[name] = fast["user_bias"]
    assert float((biases["prior"] - biases["sgd"]).abs().min()) > 1e-3


def test_mode_all_and_unknown_parameters_fall_back():
    model = random_model()
    assert not supports_fast_path(model, "all")
    with pytest.raises(ValueError, match="does not support"):
        FastAdapter(model, "all")
    assert Adapter(model, AdaptSettings("all"), fast=True).fast is None
    # A parameter whose role the fast path does not know (e.g. a future per-user term) disables it.
    model.register_parameter("user_embedding", torch.nn.Parameter(torch.zeros(4)))
    assert not supports_fast_path(model, "decision")


def test_fast_path_results_are_ordinary_tensors_a_caller_may_update():
    """The fast path computes in inference mode; what it hands out must still take in-place updates
    (callers mask scores, e.g. ``scores[rated] = -inf``), as the generic path's results do."""
    model = random_model(**USER_TERMS["bias_factors_prior_content"])
    batch = padded_batch(model)
    state, scores = fast_adapt_and_score(model, "head", batch, 3, batch.query_items)
    for tensor in [scores, *state.values()]:
        assert not tensor.is_inference()
    scores[:, 0] = -float("inf")
    state["user_bias"].add_(1.0)
    assert torch.isinf(scores[:, 0]).all()


@pytest.mark.parametrize("hidden", [(), (12,), (16, 8, 4)])
@pytest.mark.parametrize("mode", ["decision", "head"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "generic"])
def test_score_catalogue_equals_scoring_every_item_index(hidden, mode, fast):
    """score_catalogue reads the fast path's cached catalogue rows in place (no per-request gather) and
    runs the fixed prefix's ReLUs in place: the same values as scoring every index, and the cache is
    left as it was (a second call, and scoring by index afterwards, give them again)."""
    model = random_model(hidden=hidden, **USER_TERMS["bias_factors_prior_content"])
    batch = padded_batch(model)
    adapter = Adapter(model, AdaptSettings(mode, 3, LR), fast=fast)
    assert (adapter.fast is not None) == fast
    users = users_of(batch)
    every = torch.arange(N_ITEMS).expand(len(batch), -1)
    adapted = adapter.adapt(users, batch.support_items, batch.support_ratings, batch.support_mask)
    for state in (adapter.prior_state(len(batch)), adapted):
        catalogue = adapter.score_catalogue(users, state)
        expected = adapter.score(users, state, every)
        assert catalogue.shape == (len(batch), N_ITEMS)
        torch.testing.assert_close(catalogue, expected, atol=0, rtol=0)
        torch.testing.assert_close(adapter.score_catalogue(users, state), expected, atol=0, rtol=0)
        torch.testing.assert_close(adapter.score(users, state, every), expected, atol=0, rtol=0)
