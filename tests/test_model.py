"""PreferenceModel: shapes, rating range, catalogue buffers, adapted parameter sets, save / load."""

from __future__ import annotations

import json

import pytest
import torch

from metarec.features import EncodedFeatures, FeatureDims
from metarec.model import PreferenceModel, adapted_parameter_names

N_ITEMS, N_WARM = 30, 20


def make_model(user_dims=None, item_dims=None, **kwargs) -> PreferenceModel:
    torch.manual_seed(0)
    user_dims = user_dims or FeatureDims([3, 5], 1, 4)
    item_dims = item_dims or FeatureDims([7], 2, 6)
    catalogue = EncodedFeatures(
        cat=torch.randint(0, 7, (N_ITEMS, len(item_dims.cat_sizes))),
        num=torch.randn(N_ITEMS, item_dims.n_num),
        multi=(torch.rand(N_ITEMS, item_dims.n_multi) < 0.3).float(),
    )
    warm = torch.cat([torch.arange(1, N_WARM + 1), torch.zeros(N_ITEMS - N_WARM, dtype=torch.long)])
    return PreferenceModel(
        user_dims, item_dims, N_WARM, catalogue, warm, embed_dim=8, hidden=(16, 8), **kwargs
    )


def adapt(model: PreferenceModel, batch, steps: int, lr: float, mode: str, fast: bool = False):
    """A batch's tasks adapted on their support rows with :class:`metarec.meta.Adapter` (a UserState)."""
    from metarec.meta import Adapter, AdaptSettings

    adapter = Adapter(model, AdaptSettings(mode, steps, lr), fast=fast)
    users = EncodedFeatures(batch.user_cat, batch.user_num, batch.user_multi)
    return adapter.adapt(users, batch.support_items, batch.support_ratings, batch.support_mask)


def predict(model: PreferenceModel, state, cat, num, multi, items, mode: str, fast: bool = False):
    """Scores ``items`` (Long[T, N]) with each task's state (:meth:`metarec.meta.Adapter.score`)."""
    from metarec.meta import Adapter, AdaptSettings

    adapter = Adapter(model, AdaptSettings(mode), fast=fast)
    return adapter.score(EncodedFeatures(cat, num, multi), state, items)


def user_inputs(model: PreferenceModel, batch: int | None = None):
    shape = () if batch is None else (batch,)
    cat = torch.stack([torch.randint(0, size, shape) for size in model.user_dims.cat_sizes], dim=-1)
    return cat, torch.randn(*shape, model.user_dims.n_num), torch.rand(*shape, model.user_dims.n_multi)


def test_forward_one_user_and_batch_agree_and_stay_in_range():
    model = make_model(rating_min=1.0, rating_max=5.0)
    cat, num, multi = user_inputs(model, batch=3)
    items = torch.randint(0, N_ITEMS, (3, 11))
    batched = model(cat, num, multi, items)
    assert batched.shape == (3, 11)
    for user in range(3):
        single = model(cat[user], num[user], multi[user], items[user])
        torch.testing.assert_close(single, batched[user])
    with torch.no_grad():
        model.decoder[-1].bias.fill_(50.0)
        high = model(cat, num, multi, items)
        model.decoder[-1].bias.fill_(-50.0)
        low = model(cat, num, multi, items)
    assert torch.all(high <= 5.0) and torch.all(high > 4.99)
    assert torch.all(low >= 1.0) and torch.all(low < 1.01)


def test_init_output_sets_the_starting_prediction():
    model = make_model()
    with torch.no_grad():
        model.decoder[-1].weight.zero_()
    model.init_output(3.7)
    cat, num, multi = user_inputs(model)
    torch.testing.assert_close(model(cat, num, multi, torch.arange(5)), torch.full((5,), 3.7))


def test_catalogue_is_buffers_and_cold_items_share_the_unknown_id_row():
    model = make_model()
    buffers = dict(model.named_buffers())
    assert {"encoder.item_cat", "encoder.item_num", "encoder.item_multi", "encoder.item_warm_idx"} <= set(
        buffers
    )
    assert not any("item_cat" in name for name, _ in model.named_parameters())
    # Two cold items with identical features get identical predictions: both use id row 0.
    with torch.no_grad():
        for name in ("item_cat", "item_num", "item_multi"):
            buffers[f"encoder.{name}"][N_ITEMS - 1] = buffers[f"encoder.{name}"][N_ITEMS - 2]
    cat, num, multi = user_inputs(model)
    prediction = model(cat, num, multi, torch.tensor([N_ITEMS - 2, N_ITEMS - 1]))
    assert prediction[0] == prediction[1]
    # Changing the unknown-id row moves cold items only.
    before = model(cat, num, multi, torch.tensor([0, N_ITEMS - 1]))
    with torch.no_grad():
        model.encoder.item_id.weight[0] += 1.0
    after = model(cat, num, multi, torch.tensor([0, N_ITEMS - 1]))
    assert after[0] == before[0] and after[1] != before[1]


def test_zero_width_blocks_get_no_layer():
    model = make_model(user_dims=FeatureDims([4], 0, 0), item_dims=FeatureDims([], 0, 3))
    assert model.encoder.user.num is None and model.encoder.user.multi is None
    assert model.encoder.item.num is None and model.encoder.item.multi is not None
    cat, num, multi = user_inputs(model, batch=2)
    assert model(cat, num, multi, torch.randint(0, N_ITEMS, (2, 4))).shape == (2, 4)


def test_a_model_without_user_features_adapts():
    from metarec.tasks import TaskBatch

    model = make_model(user_dims=FeatureDims([], 0, 0))
    assert model.encoder.user.out_dim == 0
    items = torch.randint(0, N_ITEMS, (3, 6))
    empty_long, empty = torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0)
    batch = TaskBatch(empty_long, empty, empty, items, torch.full((3, 6), 4.0), torch.ones(3, 6),
                      items, torch.full((3, 6), 4.0), torch.ones(3, 6))  # fmt: skip
    adapted = adapt(model, batch, 3, 0.1, "decision")
    assert predict(model, adapted, empty_long, empty, empty, items, "decision").shape == (3, 6)


def test_adapted_parameter_names_per_mode():
    model = make_model()
    every = [name for name, _ in model.named_parameters()]
    assert adapted_parameter_names(model, "all") == every
    decision = adapted_parameter_names(model, "decision")
    assert decision == [name for name in every if name.startswith("decoder.")]
    assert len(decision) == 6  # three linear layers, weight + bias
    head = adapted_parameter_names(model, "head")
    assert head == ["decoder.4.weight", "decoder.4.bias"]
    assert model.get_parameter(head[0]).shape == (1, 8)
    with pytest.raises(ValueError, match="adapt mode"):
        adapted_parameter_names(model, "embeddings")


def test_save_and_from_dir_roundtrip(tmp_path):
    model = make_model()
    model.save(tmp_path, {"method": "maml", "adapt": {"mode": "head", "inner_steps": 3, "inner_lr": 0.2}})
    document = json.loads((tmp_path / "model.json").read_text())
    assert document["method"] == "maml" and document["adapt"]["inner_steps"] == 3
    assert document["config"] == model.config()
    json.dumps(model.config())  # serialisable
    loaded = PreferenceModel.from_dir(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    cat, num, multi = user_inputs(model)
    items = torch.arange(N_ITEMS)
    torch.testing.assert_close(loaded(cat, num, multi, items), model(cat, num, multi, items), rtol=0, atol=0)


def test_user_bias_is_adapted_in_every_mode_and_roundtrips(tmp_path):
    model = make_model(user_bias=True, user_bias_lr=4.0, user_bias_prior=3.0)
    assert model.get_parameter("user_bias").shape == ()
    for mode in ("all", "decision", "head"):
        assert "user_bias" in adapted_parameter_names(model, mode)
    assert "user_bias" not in adapted_parameter_names(make_model(), "all")
    # The bias shifts every logit of the user.
    cat, num, multi = user_inputs(model)
    items = torch.arange(N_ITEMS)
    before = model(cat, num, multi, items)
    with torch.no_grad():
        model.user_bias.fill_(0.5)
    assert bool((model(cat, num, multi, items) > before).all())
    model.save(tmp_path)
    loaded = PreferenceModel.from_dir(tmp_path)
    assert loaded.config() == model.config() and loaded.config()["user_bias_prior"] == 3.0
    torch.testing.assert_close(loaded(cat, num, multi, items), model(cat, num, multi, items), rtol=0, atol=0)


def test_user_factors_add_an_interaction_term_adapted_in_every_mode(tmp_path):
    model = make_model(user_bias=True, user_bias_prior=3.0, user_factors=4, user_factor_prior=6.0)
    for mode in ("all", "decision", "head"):
        names = adapted_parameter_names(model, mode)
        assert "user_factors" in names and ("item_factors.weight" in names) == (mode == "all")
    cat, num, multi = user_inputs(model)
    items = torch.arange(N_ITEMS)
    before = model(cat, num, multi, items)  # the prior mean starts at 0: no interaction yet
    with torch.no_grad():
        model.user_factors.copy_(torch.tensor([1.0, -1.0, 0.5, 0.0]))
    after = model(cat, num, multi, items)
    # The logit moved by user_factors . item_factors[warm index] (row 0 for cold items).
    expected_shift = model.item_factor_rows(items) @ model.user_factors
    torch.testing.assert_close(
        torch.logit((after - 1.0) / 4.0) - torch.logit((before - 1.0) / 4.0),
        expected_shift,
        atol=1e-4,
        rtol=1e-4,
    )
    cold = model.encoder.item_warm_idx[items] == 0
    torch.testing.assert_close(
        model.item_factor_rows(items)[cold], model.item_factors.weight[0].expand(int(cold.sum()), 4)
    )
    model.save(tmp_path)
    loaded = PreferenceModel.from_dir(tmp_path)
    assert loaded.config()["user_factors"] == 4 and loaded.config()["user_factor_prior"] == 6.0
    torch.testing.assert_close(loaded(cat, num, multi, items), after, rtol=0, atol=0)
