"""Vectorised meta-learners against a per-task reference loop, first vs second order, padding, Reptile."""

from __future__ import annotations

import pytest
import torch
from test_model import N_ITEMS, adapt, make_model, predict, user_inputs

from metarec.features import EncodedFeatures
from metarec.meta import Adapter, AdaptSettings, MetaLearner, masked_mse
from metarec.meta.reference import reference_meta_gradient
from metarec.model import adapted_parameter_names
from metarec.tasks import TaskBatch


def random_batch(model, n_tasks=6, n_support=9, n_query=5, seed=1) -> TaskBatch:
    """Tasks with between 2 and n_support real support rows and between 2 and n_query real query rows."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cat, num, multi = user_inputs(model, batch=n_tasks)

    def rows(width):
        lengths = torch.randint(2, width + 1, (n_tasks, 1), generator=generator)
        mask = (torch.arange(width)[None] < lengths).float()
        items = torch.randint(0, N_ITEMS, (n_tasks, width), generator=generator) * mask.long()
        ratings = torch.randint(1, 6, (n_tasks, width), generator=generator).float() * mask
        return items, ratings, mask

    support, query = rows(n_support), rows(n_query)
    return TaskBatch(cat, num, multi, *support, *query)


def assert_grads_close(actual, expected, atol=2e-6):
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=1e-4, msg=name)


def maml_matching_the_loop(model, batch, mode, atol=2e-6):
    """The vmapped MAML meta-gradient (3 inner steps, lr 0.5), checked against the per-task loop."""
    learner = MetaLearner(model, "maml", inner_steps=3, inner_lr=0.5, adapt_mode=mode)
    loss, grads = learner.meta_gradient(batch)
    ref_loss, ref_grads = reference_meta_gradient(model, batch, 3, 0.5, mode)
    torch.testing.assert_close(loss, ref_loss)
    assert_grads_close(grads, ref_grads, atol=atol)
    return grads


@pytest.mark.parametrize("mode", ["decision", "head", "all"])
def test_vmapped_maml_equals_per_task_loop(mode):
    model = make_model()
    batch = random_batch(model)
    grads = maml_matching_the_loop(model, batch, mode)
    # Every trainable parameter gets a gradient, embeddings included (outer loop reaches them).
    assert set(grads) == {name for name, _ in model.named_parameters()}
    assert grads["encoder.user.cat.0.weight"].abs().sum() > 0


@pytest.mark.parametrize("mode", ["decision", "all"])
def test_fomaml_equals_first_order_loop_and_differs_from_maml(mode):
    model = make_model()
    batch = random_batch(model)
    _, first = MetaLearner(model, "fomaml", inner_steps=3, inner_lr=0.5, adapt_mode=mode).meta_gradient(batch)
    _, ref_first = reference_meta_gradient(model, batch, 3, 0.5, mode, first_order=True)
    assert_grads_close(first, ref_first)
    _, second = MetaLearner(model, "maml", inner_steps=3, inner_lr=0.5, adapt_mode=mode).meta_gradient(batch)
    # Second-order terms (the Hessian of the support loss) are non-zero for this non-linear model.
    difference = max(float((first[name] - second[name]).abs().max()) for name in first)
    assert difference > 1e-4


def test_first_and_second_order_agree_without_inner_steps():
    model = make_model()
    batch = random_batch(model)
    _, first = MetaLearner(model, "fomaml", inner_steps=0, inner_lr=0.5).meta_gradient(batch)
    _, second = MetaLearner(model, "maml", inner_steps=0, inner_lr=0.5).meta_gradient(batch)
    assert_grads_close(first, second, atol=1e-7)
    # ... and both are then the plain query-loss gradient of the un-adapted model.
    _, plain = reference_meta_gradient(model, batch, 0, 0.5)
    assert_grads_close(first, plain)


def test_padding_changes_nothing():
    model = make_model()
    batch = random_batch(model, n_tasks=4)

    def padded(tensor, extra, fill):
        return torch.cat([tensor, torch.full((tensor.shape[0], extra), fill, dtype=tensor.dtype)], dim=1)

    # Padding rows hold real-looking items and ratings: only the mask may make them inert.
    wide = TaskBatch(
        batch.user_cat, batch.user_num, batch.user_multi,
        padded(batch.support_items, 7, 3), padded(batch.support_ratings, 7, 5.0), padded(batch.support_mask, 7, 0.0),
        padded(batch.query_items, 4, 2), padded(batch.query_ratings, 4, 1.0), padded(batch.query_mask, 4, 0.0),
    )  # fmt: skip
    for method in ("maml", "fomaml", "reptile"):
        learner = MetaLearner(model, method, inner_steps=2, inner_lr=0.3)
        loss, grads = learner.meta_gradient(batch)
        wide_loss, wide_grads = learner.meta_gradient(wide)
        torch.testing.assert_close(wide_loss, loss)
        assert_grads_close(wide_grads, grads, atol=1e-6)
    # Each task alone, trimmed to its real rows, adapts to the same parameters as in the padded batch.
    adapted = adapt(model, wide, 2, 0.3, "decision")
    for task in range(len(batch)):
        n_support = int(batch.support_mask[task].sum())
        alone = batch.select(slice(task, task + 1))
        alone.support_items = alone.support_items[:, :n_support]
        alone.support_ratings = alone.support_ratings[:, :n_support]
        alone.support_mask = alone.support_mask[:, :n_support]
        single = adapt(model, alone, 2, 0.3, "decision")
        for name in single:
            torch.testing.assert_close(single[name][0], adapted[name][task], atol=1e-6, rtol=1e-5)


def test_adapt_reduces_support_loss_and_is_detached_for_serving():
    model = make_model()
    batch = random_batch(model, n_tasks=5)
    adapted = adapt(model, batch, 10, 0.05, "decision")  # no graph even with autograd on
    assert all(not tensor.requires_grad and tensor.shape[0] == 5 for tensor in adapted.values())
    users = (batch.user_cat, batch.user_num, batch.user_multi)
    before = model(*users, batch.support_items)
    after = predict(model, adapted, *users, batch.support_items, "decision")
    loss_before = torch.stack(
        [masked_mse(before[t], batch.support_ratings[t], batch.support_mask[t]) for t in range(5)]
    )
    loss_after = torch.stack(
        [masked_mse(after[t], batch.support_ratings[t], batch.support_mask[t]) for t in range(5)]
    )
    assert torch.all(loss_after < loss_before)
    # Zero steps: the shared parameters, expanded per task; predictions equal the plain model's.
    unchanged = adapt(model, batch, 0, 0.5, "head")
    torch.testing.assert_close(predict(model, unchanged, *users, batch.query_items, "head"),
                               model(*users, batch.query_items))  # fmt: skip


def test_reptile_direction_is_the_task_gradient_after_one_step():
    model = make_model()
    batch = random_batch(model, n_tasks=4)
    learner = MetaLearner(model, "reptile", inner_steps=1, inner_lr=0.05, adapt_mode="decision")
    _, grads = learner.meta_gradient(batch)
    # One SGD step: (params - adapted) / lr is the gradient of the task loss on all its rows at params.
    expected = {
        name: torch.zeros_like(p) for name, p in model.named_parameters() if name.startswith("decoder.")
    }
    for task in range(len(batch)):
        items = torch.cat([batch.support_items[task], batch.query_items[task]])
        ratings = torch.cat([batch.support_ratings[task], batch.query_ratings[task]])
        mask = torch.cat([batch.support_mask[task], batch.query_mask[task]])
        prediction = model(batch.user_cat[task], batch.user_num[task], batch.user_multi[task], items)
        task_grads = torch.autograd.grad(
            masked_mse(prediction, ratings, mask), [model.get_parameter(n) for n in expected]
        )
        for name, gradient in zip(expected, task_grads, strict=True):
            expected[name] += gradient / len(batch)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], atol=1e-5, rtol=1e-3)
    # Non-adapted parameters still learn (first-order gradient of the post-adaptation loss).
    assert grads["encoder.item_id.weight"].abs().sum() > 0


def test_reptile_direction_is_the_mean_move_per_step_after_several_steps():
    # With one step the move and the gradient coincide whatever the scale; three steps check that the
    # move is divided by steps * lr (a missing factor would triple the update).
    model = make_model()
    batch = random_batch(model, n_tasks=4)
    steps, lr = 3, 0.05
    _, grads = MetaLearner(
        model, "reptile", inner_steps=steps, inner_lr=lr, adapt_mode="decision"
    ).meta_gradient(batch)
    whole = TaskBatch(
        batch.user_cat, batch.user_num, batch.user_multi,
        torch.cat([batch.support_items, batch.query_items], dim=1),
        torch.cat([batch.support_ratings, batch.query_ratings], dim=1),
        torch.cat([batch.support_mask, batch.query_mask], dim=1),
        batch.query_items, batch.query_ratings, batch.query_mask,
    )  # fmt: skip
    adapted = adapt(model, whole, steps, lr, "decision")
    for name, moved in adapted.items():
        expected = (model.get_parameter(name).detach() - moved).sum(0) / (steps * lr * len(batch))
        torch.testing.assert_close(grads[name], expected, atol=1e-5, rtol=1e-4, msg=name)


def test_shards_with_global_total_sum_to_the_full_batch_gradient():
    model = make_model()
    batch = random_batch(model, n_tasks=7)
    learner = MetaLearner(model, "maml", inner_steps=2, inner_lr=0.3)
    loss, grads = learner.meta_gradient(batch)
    parts = [learner.meta_gradient(batch.select(part), total_tasks=7) for part in (slice(0, 3), slice(3, 7))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], loss)
    assert_grads_close({name: parts[0][1][name] + parts[1][1][name] for name in grads}, grads)


def test_unknown_method_or_mode_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="method"):
        MetaLearner(model, "protonet")
    with pytest.raises(ValueError, match="adapt mode"):
        MetaLearner(model, "maml", adapt_mode="everything")


def test_l1_outer_loss_is_the_query_mae_gradient():
    model = make_model()
    batch = random_batch(model, n_tasks=4)
    loss, grads = MetaLearner(model, "maml", inner_steps=0, outer_loss="l1").meta_gradient(batch)
    users = (batch.user_cat, batch.user_num, batch.user_multi)
    errors = (model(*users, batch.query_items) - batch.query_ratings).abs() * batch.query_mask
    expected_loss = (errors.sum(1) / batch.query_mask.sum(1)).mean()
    expected = torch.autograd.grad(expected_loss, list(model.parameters()))
    torch.testing.assert_close(loss, expected_loss.detach())
    for (name, _), gradient in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(grads[name], gradient, atol=1e-6, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="outer loss"):
        MetaLearner(model, "maml", outer_loss="huber")


def test_learned_inner_learning_rates_match_the_loop_and_get_meta_gradients():
    model = make_model(learn_inner_lr=True)
    with torch.no_grad():
        for index, scale in enumerate(model.inner_lr_log.values()):
            scale.fill_(0.3 * index - 0.5)
    assert not any(name.startswith("inner_lr_log") for name in adapted_parameter_names(model, "all"))
    batch = random_batch(model)
    loss, grads = MetaLearner(model, "maml", inner_steps=3, inner_lr=0.5).meta_gradient(batch)
    ref_loss, ref_grads = reference_meta_gradient(model, batch, 3, 0.5)
    torch.testing.assert_close(loss, ref_loss)
    assert_grads_close(grads, ref_grads)
    assert all(grads[f"inner_lr_log.{key}"].abs() > 0 for key in model.inner_lr_log)
    # The scales change adaptation: zeroing them gives a different result.
    before = adapt(model, batch, 3, 0.5, "decision")
    with torch.no_grad():
        for scale in model.inner_lr_log.values():
            scale.zero_()
    after = adapt(model, batch, 3, 0.5, "decision")
    assert not torch.allclose(before["decoder.0.weight"], after["decoder.0.weight"])


def test_first_order_adapt_keeps_the_identity_path():
    model = make_model()
    batch = random_batch(model, n_tasks=3)
    adapter = Adapter(model, AdaptSettings("head", 2, 0.3))
    users = EncodedFeatures(batch.user_cat, batch.user_num, batch.user_multi)
    inputs = adapter.inputs(users, batch.support_items)
    adapted = adapter.adapt_inputs(inputs, batch.support_ratings, batch.support_mask, first_order=True)
    weight = model.get_parameter("decoder.4.weight")
    (gradient,) = torch.autograd.grad(adapted["decoder.4.weight"].sum(), [weight])
    torch.testing.assert_close(gradient, torch.full_like(weight, 3.0))  # d(sum over 3 tasks)/d(start) = 3


@pytest.mark.parametrize("mode", ["decision", "head", "all"])
def test_user_bias_moves_during_adaptation_and_matches_the_loop(mode):
    model = make_model(user_bias=True, user_bias_lr=3.0)
    batch = random_batch(model)
    grads = maml_matching_the_loop(model, batch, mode)
    assert grads["user_bias"].abs() > 0
    adapted = adapt(model, batch, 3, 0.5, mode)
    assert adapted["user_bias"].shape == (len(batch),)
    assert bool((adapted["user_bias"] != 0).all())


@pytest.mark.parametrize("mode", ["decision", "all"])
def test_user_bias_gauss_newton_steps_match_the_loop_and_fit_the_rating_level(mode):
    model = make_model(user_bias=True, user_bias_prior=2.0)
    batch = random_batch(model)
    maml_matching_the_loop(model, batch, mode, atol=1e-5)
    # Bias-only adaptation (lr 0): the MAP steps move the mean support residual towards 0.
    shifted = TaskBatch(**{**batch.__dict__, "support_ratings": batch.support_mask * 4.5})
    before = predict(
        model,
        adapt(model, shifted, 0, 0.0, "head"),
        shifted.user_cat,
        shifted.user_num,
        shifted.user_multi,
        shifted.support_items,
        "head",
    )
    adapted = adapt(model, shifted, 5, 0.0, "head")
    after = predict(
        model, adapted, shifted.user_cat, shifted.user_num, shifted.user_multi, shifted.support_items, "head"
    )
    mask = shifted.support_mask
    residual_before = (((shifted.support_ratings - before) * mask).sum(1) / mask.sum(1)).abs()
    residual_after = (((shifted.support_ratings - after) * mask).sum(1) / mask.sum(1)).abs()
    assert bool((residual_after < 0.75 * residual_before).all())  # shrunk towards the prior: not to 0


@pytest.mark.parametrize("mode", ["decision", "head", "all"])
@pytest.mark.parametrize("prior", [None, 3.0])
def test_user_factors_match_the_loop_and_get_meta_gradients(mode, prior):
    model = make_model(
        user_bias=True, user_bias_prior=prior, user_factors=4, user_factor_prior=prior and 2 * prior
    )
    with torch.no_grad():  # a non-zero prior mean, so that the prior term is exercised
        model.user_factors.normal_(std=0.3)
    batch = random_batch(model)
    grads = maml_matching_the_loop(model, batch, mode, atol=1e-5)
    assert grads["user_factors"].abs().sum() > 0
    assert grads["item_factors.weight"].abs().sum() > 0
    adapted = adapt(model, batch, 3, 0.5, mode)
    assert adapted["user_factors"].shape == (len(batch), 4)
    assert bool((adapted["user_factors"] != model.user_factors.detach()).any(dim=1).all())


def test_user_terms_gauss_newton_steps_reach_the_map_fit():
    """With the decoder frozen (lr 0), repeated Gauss-Newton steps on bias and factors converge to the
    minimum of support MSE + prior: the objective's gradient in the user terms vanishes there."""
    model = make_model(user_bias=True, user_bias_prior=2.0, user_factors=3, user_factor_prior=5.0)
    with torch.no_grad():
        model.item_factors.weight.normal_(std=0.5)
    batch = random_batch(model)
    adapted = adapt(model, batch, 25, 0.0, "head")
    for task in range(len(batch)):
        bias = adapted["user_bias"][task].clone().requires_grad_(True)
        factors = adapted["user_factors"][task].clone().requires_grad_(True)
        params = {**dict(model.named_parameters()), "user_bias": bias, "user_factors": factors}
        items = batch.support_items[task]
        inputs = (batch.user_cat[task], batch.user_num[task], batch.user_multi[task], items)
        predictions = torch.func.functional_call(model, params, inputs)
        mask = batch.support_mask[task]
        count = mask.sum()
        objective = masked_mse(predictions, batch.support_ratings[task], mask)
        objective = objective + 2.0 / count * (bias - model.user_bias.detach()) ** 2
        objective = objective + 5.0 / count * ((factors - model.user_factors.detach()) ** 2).sum()
        gradients = torch.autograd.grad(objective, [bias, factors])
        assert max(float(g.abs().max()) for g in gradients) < 1e-4, task
        # ... and adaptation did move away from the prior mean.
        assert float((factors.detach() - model.user_factors.detach()).abs().max()) > 1e-3


@pytest.mark.parametrize("method", ["maml", "reptile"])
@pytest.mark.parametrize("mode", ["decision", "head"])
def test_id_dropout_shows_hidden_rows_as_cold_items(method, mode):
    import copy

    model = make_model(user_bias=True, user_bias_prior=2.0, user_factors=3)
    batch = random_batch(model)
    learner = MetaLearner(model, method, inner_steps=3, inner_lr=0.5, adapt_mode=mode, id_dropout=0.5)
    learner._hidden_ids = lambda tasks, total, n_rows, device: torch.ones(total, n_rows, dtype=torch.bool)[
        tasks
    ]
    loss, grads = learner.meta_gradient(batch)
    # Every id hidden = the same model with a catalogue of cold items only.
    cold = copy.deepcopy(model)
    cold.encoder.item_warm_idx.zero_()
    expected_loss, expected = MetaLearner(
        cold, method, inner_steps=3, inner_lr=0.5, adapt_mode=mode
    ).meta_gradient(batch)
    torch.testing.assert_close(loss, expected_loss)
    assert_grads_close(grads, expected)
    assert float(grads["item_bias.weight"][1:].abs().max()) == 0.0  # no warm row learns from hidden rows
    assert float(grads["item_bias.weight"][0].abs().max()) > 0.0
    # A real draw hides about the requested share of rows.
    drawn = MetaLearner(model, method, adapt_mode=mode, id_dropout=0.3)._hidden_ids(
        slice(0, 200), 200, 50, torch.device("cpu")
    )
    assert 0.27 < float(drawn.float().mean()) < 0.33
    with pytest.raises(ValueError, match="id_dropout"):
        MetaLearner(model, method, adapt_mode="all", id_dropout=0.3)


def test_id_dropout_masks_come_from_the_checkpointed_cpu_generator():
    # Checkpoints save the CPU generator only: a mask drawn by a CUDA generator would restart from the
    # seed after a GPU run resumes. The meta device stands in for the GPU (no CUDA here).
    model = make_model()
    learner = MetaLearner(model, "maml", id_dropout=0.3)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    hidden = learner._hidden_ids(slice(0, 4), 4, 10, torch.device("meta"))
    assert hidden.device.type == "meta"
    assert not torch.equal(torch.get_rng_state(), before)
