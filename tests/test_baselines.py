"""Baselines on small hand-made data sets whose generating model is known."""

from __future__ import annotations

import pytest
import torch

from metarec.baselines import GlobalMean, ItemUserBias, MFFoldIn
from metarec.tasks import TaskBatch


def _task_batch(support_items, support_ratings, query_items, query_ratings=None) -> TaskBatch:
    """One task per row; every row real (no padding) unless the rating is NaN."""
    support_items = torch.tensor(support_items, dtype=torch.long)
    support_ratings = torch.tensor(support_ratings, dtype=torch.float32)
    query_items = torch.tensor(query_items, dtype=torch.long)
    query_ratings = torch.zeros(query_items.shape) if query_ratings is None else torch.tensor(query_ratings)
    n_tasks = support_items.shape[0]
    support_mask = (~torch.isnan(support_ratings)).float()
    return TaskBatch(
        user_cat=torch.zeros(n_tasks, 1, dtype=torch.long),
        user_num=torch.zeros(n_tasks, 1),
        user_multi=torch.zeros(n_tasks, 1),
        support_items=support_items,
        support_ratings=torch.nan_to_num(support_ratings),
        support_mask=support_mask,
        query_items=query_items,
        query_ratings=query_ratings.float(),
        query_mask=torch.ones(query_items.shape),
    )


def _full_matrix(ratings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_users, n_items = ratings.shape
    users = torch.arange(n_users).repeat_interleave(n_items)
    items = torch.arange(n_items).repeat(n_users)
    return users, items, ratings.reshape(-1)


def test_global_mean_predicts_training_mean_everywhere():
    baseline = GlobalMean().fit([0, 0, 1], [0, 1, 1], [1.0, 4.0, 4.0], n_items=3)
    predictions = baseline.predict(_task_batch([[0]], [[5.0]], [[0, 2]]))
    assert torch.allclose(predictions, torch.tensor([[3.0, 3.0]]))


def test_item_user_bias_recovers_known_biases():
    generator = torch.Generator().manual_seed(0)
    item_bias = torch.randn(20, generator=generator, dtype=torch.float64) * 0.5
    user_bias = torch.randn(40, generator=generator, dtype=torch.float64) * 0.3
    item_bias -= item_bias.mean()
    user_bias -= user_bias.mean()
    ratings = 3.0 + user_bias[:, None] + item_bias[None, :]
    baseline = ItemUserBias(item_reg=1e-6, user_reg=1e-6).fit(*_full_matrix(ratings), n_items=22)
    assert baseline.global_mean == pytest.approx(3.0)
    assert torch.allclose(baseline.item_bias[:20], item_bias, atol=1e-3)
    # Items 20 and 21 were never rated: no bias.
    assert torch.all(baseline.item_bias[20:] == 0)

    # A new user 0.7 above average: their bias comes from the support set alone.
    support_items = [[0, 1, 2, 3, 4]]
    support = [[float(3.0 + 0.7 + item_bias[i]) for i in support_items[0]]]
    predictions = baseline.predict(_task_batch(support_items, support, [[5, 6, 21]]))
    expected = torch.tensor([[3.7 + item_bias[5], 3.7 + item_bias[6], 3.7]], dtype=torch.float32)
    assert torch.allclose(predictions, expected, atol=1e-3)


def test_item_user_bias_shrinks_small_support_sets():
    ratings = torch.full((10, 5), 3.0, dtype=torch.float64)
    baseline = ItemUserBias(item_reg=1.0, user_reg=1.0).fit(*_full_matrix(ratings), n_items=5)
    # One 5-star rating with user_reg=1: bias (5-3)/(1+1) = 1, not 2.
    predictions = baseline.predict(_task_batch([[0]], [[5.0]], [[1]]))
    assert predictions[0, 0].item() == pytest.approx(4.0, abs=1e-4)


def test_mf_foldin_recovers_a_user_following_the_factor_model():
    generator = torch.Generator().manual_seed(1)
    user_vectors = torch.randn(60, 2, generator=generator, dtype=torch.float64)
    item_vectors = torch.randn(30, 2, generator=generator, dtype=torch.float64)
    item_bias = torch.randn(30, generator=generator, dtype=torch.float64) * 0.3
    ratings = 3.0 + item_bias[None, :] + user_vectors @ item_vectors.T
    baseline = MFFoldIn(
        factors=2, reg=1e-3, bias_reg=1e-3, iterations=60, seed=0, rating_min=-50, rating_max=50
    )
    baseline.fit(*_full_matrix(ratings), n_items=31)

    new_user = torch.tensor([0.8, -1.1], dtype=torch.float64)
    truth = 3.0 + item_bias + item_vectors @ new_user
    support_items = list(range(10))
    query_items = list(range(10, 30))
    batch = _task_batch([support_items], [truth[support_items].tolist()], [query_items + [30]])
    predictions = baseline.predict(batch)[0].double()
    assert torch.allclose(predictions[:20], truth[query_items], atol=0.05)

    # Item 30 was never rated: no factors, so it falls back to mean + the folded-in user bias.
    user_factors, user_bias = baseline.fold_in(batch)
    assert torch.all(baseline.item_factors[30] == 0)
    assert predictions[20].item() == pytest.approx(baseline.global_mean + user_bias[0].item(), abs=1e-5)


def test_mf_foldin_ignores_padding_and_clips_to_scale():
    ratings = torch.tensor([[1.0, 5.0, 3.0], [2.0, 4.0, 3.0], [1.0, 5.0, 4.0]], dtype=torch.float64)
    baseline = MFFoldIn(factors=2, reg=0.1, seed=0).fit(*_full_matrix(ratings), n_items=3)
    padded = _task_batch([[0, 1]], [[1.0, float("nan")]], [[0, 1, 2]])
    unpadded = _task_batch([[0]], [[1.0]], [[0, 1, 2]])
    assert torch.allclose(baseline.predict(padded), baseline.predict(unpadded))
    assert baseline.predict(padded).min() >= 1.0 and baseline.predict(padded).max() <= 5.0
    # Seeded: refitting gives identical factors.
    again = MFFoldIn(factors=2, reg=0.1, seed=0).fit(*_full_matrix(ratings), n_items=3)
    assert torch.equal(again.item_factors, baseline.item_factors)


def _tiny_preference_model(n_items: int, seed: int = 0):
    from metarec.features import EncodedFeatures, FeatureDims
    from metarec.model import PreferenceModel

    torch.manual_seed(seed)
    genres = torch.zeros(n_items, 2)
    genres[torch.arange(n_items), torch.arange(n_items) % 2] = 1.0
    catalogue = EncodedFeatures(
        cat=torch.zeros(n_items, 0, dtype=torch.long), num=torch.zeros(n_items, 0), multi=genres
    )
    return PreferenceModel(
        FeatureDims([3], 0, 0),
        FeatureDims([], 0, 2),
        n_items,
        catalogue,
        torch.arange(1, n_items + 1),
        embed_dim=4,
        hidden=(8,),
    )


def _tiny_user_features(n_users: int):
    from metarec.features import EncodedFeatures

    return EncodedFeatures(
        cat=(torch.arange(n_users) % 3)[:, None], num=torch.zeros(n_users, 0), multi=torch.zeros(n_users, 0)
    )


ITEM_EFFECTS = torch.tensor([-1.5, -1.0, -0.5, 0.5, 1.0, 1.5])


@pytest.fixture(scope="module")
def trained_global_model():
    from metarec.baselines import GlobalModel

    ratings = (3.0 + ITEM_EFFECTS[None, :]).expand(30, 6).clone()
    model = _tiny_preference_model(6)
    baseline = GlobalModel(model, _tiny_user_features(30), epochs=40, lr=0.05, batch_size=60, seed=0)
    return baseline.fit(*_full_matrix(ratings), n_items=6)


@pytest.mark.slow
def test_global_model_learns_item_effects_without_adapting(trained_global_model):
    baseline = trained_global_model
    assert baseline.history[-1]["train_mse"] < 0.05 < baseline.history[0]["train_mse"]
    # A user with opposite tastes gets the same predictions: the global model ignores the support set.
    items = [[0, 1, 2, 3, 4, 5]]
    liked = baseline.predict(_task_batch([[0]], [[5.0]], items))
    disliked = baseline.predict(_task_batch([[0]], [[1.0]], items))
    assert torch.equal(liked, disliked)
    assert torch.allclose(liked[0], 3.0 + ITEM_EFFECTS, atol=0.3)


@pytest.mark.slow
def test_finetune_moves_predictions_towards_the_support_set(trained_global_model):
    from metarec.baselines import Finetune

    baseline = trained_global_model
    before = {name: tensor.clone() for name, tensor in baseline.model.state_dict().items()}
    # A new user who rates every item one star above the crowd.
    support_items, query_items = [[0, 1, 2]], [[3, 4]]
    support = [[float(4.0 + ITEM_EFFECTS[i]) for i in support_items[0]]]
    batch = _task_batch(support_items, support, query_items)
    unadapted = baseline.predict(batch)
    finetuned = Finetune(baseline.model, steps=20, lr=0.05, mode="all").predict(batch)
    assert torch.all(finetuned > unadapted + 0.2)
    # Zero steps is exactly the global model; the shared model's weights are never modified.
    assert torch.allclose(Finetune(baseline.model, steps=0, lr=0.05).predict(batch), unadapted, atol=1e-6)
    after = baseline.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
