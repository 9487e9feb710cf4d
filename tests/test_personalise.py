"""One user's personalisation: the fast and generic loops agree, windows become support sets, states
round-trip through the store's blob and are refused across model versions."""

from __future__ import annotations

import pytest
import torch
from test_fast_adapt import USER_TERMS, random_model
from test_model import N_ITEMS

from metarec.features import EncodedFeatures
from metarec.meta import Adapter, AdaptSettings
from metarec.personalise import Personaliser, support_from_window
from metarec.state import Rating
from metarec.state.blob import (
    MAX_CARRIED,
    STATE_MAGIC,
    carried_features,
    decode_features,
    decode_state,
    encode_state,
)


def _user():
    return EncodedFeatures(
        torch.tensor([[1, 2]]), torch.tensor([[0.3]]), torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    )


def test_fast_and_generic_paths_agree_and_adaptation_moves_scores():
    model = random_model(**USER_TERMS["bias_factors_prior"])
    settings = AdaptSettings.from_dict(mode="head", inner_lr=0.3)
    fast = Personaliser(Adapter(model, settings, fast=True))
    generic = Personaliser(Adapter(model, settings, fast=False))
    assert fast.adapter.fast is not None and generic.adapter.fast is None
    items, ratings = torch.tensor([3, 7, 11]), torch.tensor([5.0, 1.0, 4.0])
    everything = torch.arange(N_ITEMS)
    scores = [p.score(_user(), p.adapt(_user(), items, ratings, 5), everything) for p in (fast, generic)]
    assert torch.allclose(scores[0], scores[1], atol=1e-5)
    prior = fast.score(_user(), None, everything)
    assert (scores[0] - prior).abs().max() > 1e-3


@pytest.mark.parametrize("fast", [True, False])
def test_adapt_many_is_one_batched_pass_that_matches_each_user_alone(fast):
    model = random_model(**USER_TERMS["bias_factors_prior"])
    personaliser = Personaliser(Adapter(model, AdaptSettings.from_dict(mode="head", inner_lr=0.3), fast=fast))
    users = [_user(), EncodedFeatures(torch.tensor([[0, 1]]), torch.tensor([[-0.2]]), torch.zeros(1, 4))]
    supports = [([3, 7, 11, 2, 9], [5.0, 1.0, 4.0, 2.0, 3.0]), ([4], [1.0])]
    calls = []
    adapt = personaliser.adapter.adapt
    personaliser.adapter.adapt = lambda *a, **k: calls.append(1) or adapt(*a, **k)
    together = personaliser.adapt_many(users, supports, 5)
    personaliser.adapter.adapt = adapt
    assert len(calls) == 1 and len(together) == 2
    for user, (items, ratings), state in zip(users, supports, together, strict=True):
        alone = personaliser.adapt(user, torch.tensor(items), torch.tensor(ratings), 5)
        assert set(state) == set(alone)
        for name, tensor in alone.items():
            assert state[name].shape == tensor.shape
            assert torch.allclose(state[name], tensor, atol=1e-6), name
        # Each user's state may view the batch's tensors, but its stored blob holds that user alone.
        assert len(encode_state(state, "v1", user)) == len(encode_state(alone, "v1", user))
        back = decode_state(encode_state(state, "v1", user), "v1", torch.device("cpu"))["params"]
        assert all(torch.equal(back[name], state[name]) for name in state)
    assert personaliser.adapt_many([], [], 5) == []


def test_window_keeps_the_latest_rating_per_known_item():
    window = [Rating("a", 1.0), Rating("b", 2.0), Rating("gone", 5.0), Rating("a", 4.0)]
    items, ratings = support_from_window(window, {"a": 0, "b": 1})
    assert items == [1, 0] and ratings == [2.0, 4.0]


def test_state_round_trips_and_is_refused_by_another_model_version():
    state = {"user_bias": torch.tensor([0.5]), "decoder.4.weight": torch.randn(1, 1, 8)}
    blob = encode_state(state, "v1", _user())
    document = decode_state(blob, "v1", torch.device("cpu"))
    back = document["params"]
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert all(torch.equal(a, b) for a, b in zip(document["features"], _user(), strict=True))
    assert decode_state(encode_state(state, "v1"), "v1", torch.device("cpu"))["features"] is None
    assert decode_state(blob, "v2", torch.device("cpu")) is None
    assert decode_state(b"not a torch file", "v1", torch.device("cpu")) is None


def test_state_blobs_are_compact_raw_tensors_and_older_torch_save_blobs_still_read():
    import io

    state = {
        "user_bias": torch.tensor([0.5]),
        "decoder.4.weight": torch.randn(1, 1, 8),
        "half": torch.randn(1, 3).bfloat16(),
        "flags": torch.tensor([[True, False]]),
        "none": torch.zeros(1, 0),
        "scalar": torch.tensor(2.5),
        "sliced": torch.randn(1, 9).T[3:4],  # "contiguous" with odd strides
    }
    blob = encode_state(state, "v1", _user())
    assert blob.startswith(STATE_MAGIC)
    document = decode_state(blob, "v1", torch.device("cpu"))
    for name, tensor in state.items():
        assert document["params"][name].dtype == tensor.dtype and torch.equal(
            document["params"][name], tensor
        )
    assert all(torch.equal(a, b) for a, b in zip(document["features"], _user(), strict=True))
    # A stale state is read for its features only.
    features_only = decode_state(blob, "v1", torch.device("cpu"), params=False)
    assert features_only["params"] == {}
    assert all(torch.equal(a, b) for a, b in zip(features_only["features"], _user(), strict=True))
    assert decode_state(blob[:-1], "v1", torch.device("cpu")) is None  # truncated
    assert decode_state(blob[:-1], "v1", torch.device("cpu"), params=False) is None
    assert decode_state(blob + b"x", "v1", torch.device("cpu")) is None
    # A blob of the previous format (torch.save of the same document) is still served.
    buffer = io.BytesIO()
    torch.save({"model_version": "v1", "params": state, "features": list(_user())}, buffer)
    older = decode_state(buffer.getvalue(), "v1", torch.device("cpu"))
    assert all(torch.equal(older["params"][k], state[k]) for k in state)
    assert decode_state(buffer.getvalue(), "v2", torch.device("cpu")) is None


def test_features_of_other_encodings_are_carried_through_blobs_and_read_by_their_encoding():
    """A model writing over a blob whose features it cannot read (another encoding, key "k1") keeps them
    verbatim, so the model of that encoding still reads them (a rolling update, a rollback); its own
    state and features read as before, at most MAX_CARRIED encodings are kept, newest first."""
    state = {"user_bias": torch.tensor([0.5]), "w": torch.randn(1, 3)}
    theirs = EncodedFeatures(
        torch.tensor([[4, 5]]), torch.tensor([[-1.5]]), torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    )
    first = encode_state(state, "old", theirs, "k1")
    assert carried_features(first, "k1") == []  # the writer's own encoding needs no carry
    blob = encode_state(state, "new", _user(), "k2", carried_features(first, "k2"))
    cpu = torch.device("cpu")
    kept = decode_features(blob, "old", cpu, "k1")
    assert kept is not None and all(torch.equal(a, b) for a, b in zip(kept, theirs, strict=True))
    document = decode_state(blob, "new", cpu)  # the writer's own state and features are untouched
    assert all(torch.equal(document["params"][k], state[k]) for k in state)
    assert all(torch.equal(a, b) for a, b in zip(document["features"], _user(), strict=True))
    assert decode_state(blob, "new", cpu, params=False)["features"] is not None
    assert decode_features(blob, "other", cpu, "k3") is None
    # Back on the old model: it writes its own features again and carries the new model's along.
    back = encode_state(state, "old", theirs, "k1", carried_features(blob, "k1"))
    assert [c.features_key for c in carried_features(back, None)] == ["k1", "k2"]
    assert all(
        torch.equal(a, b) for a, b in zip(decode_features(back, "new", cpu, "k2"), _user(), strict=True)
    )
    # A chain of encodings keeps the newest MAX_CARRIED others.
    for n in range(3, 10):
        blob = encode_state(state, f"m{n}", _user(), f"k{n}", carried_features(blob, f"k{n}"))
    assert [c.features_key for c in carried_features(blob, "k9")] == ["k8", "k7", "k6", "k5"][:MAX_CARRIED]
    assert carried_features(b"not a blob", "k1") == [] and carried_features(None, "k1") == []
    assert carried_features(blob[:-1], None) == []  # truncated: nothing of unknown meaning is carried
