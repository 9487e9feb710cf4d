"""Peer references (scikit-surprise, LightFM) under the evaluator's protocol, on the tiny synthetic data."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("surprise", reason="peer references need scikit-surprise: pip install '.[bench]'")
pytest.importorskip("lightfm", reason="the LightFM peer needs lightfm-next: pip install '.[bench]'")

from metarec import peers  # noqa: E402
from metarec.evaluation import run_evaluation  # noqa: E402
from metarec.peers import RetrainedPeer, fit_peers, resolve_peers  # noqa: E402
from metarec.tasks import Preprocessed, scenario_tasks  # noqa: E402

# First grid point of each peer, except a two-point grid for the KNN peer to exercise the tuning.
FAST_PEERS = {
    "surprise_svdpp": {"n_factors": [4], "n_epochs": [5]},
    "surprise_knn": {"k": [40, 10]},
    "lightfm": {"no_components": [8], "epochs": [5]},
}


@pytest.fixture(scope="module")
def pre_dir(tmp_path_factory):
    from metarec.preprocessing import run_preprocessing

    root = tmp_path_factory.mktemp("peers")
    run_preprocessing("synthetic:tiny", None, None, str(root / "pre"))
    return root / "pre"


@pytest.fixture(scope="module")
def pre(pre_dir):
    return Preprocessed.load(pre_dir)


def _first_point(name: str) -> dict:
    return {key: values[0] for key, values in resolve_peers({name: FAST_PEERS[name]})[name].items()}


def test_resolve_peers_names_unknown_peers_and_keys():
    assert resolve_peers([]) == {}
    assert resolve_peers(None) == {}
    assert resolve_peers(["surprise_knn"])["surprise_knn"] == peers.DEFAULT_GRIDS["surprise_knn"]
    assert resolve_peers({"lightfm": {"epochs": 3}})["lightfm"]["epochs"] == [3]
    with pytest.raises(ValueError, match="unknown peer 'svd'"):
        resolve_peers(["svd"])
    with pytest.raises(ValueError, match=r"unknown keys \['depth'\] for peer 'lightfm'"):
        resolve_peers({"lightfm": {"depth": [2]}})


def test_missing_package_is_a_clear_error(pre, monkeypatch):
    monkeypatch.setattr(peers, "missing_packages", lambda names: ["surprise"])
    with pytest.raises(ValueError, match=r"needs \['scikit-surprise'\], from the 'bench' extra"):
        fit_peers(pre, ["surprise_knn"], None, seed=0)


@pytest.mark.parametrize("name", peers.PEER_NAMES)
def test_one_retrain_per_support_context(pre, name):
    peer = RetrainedPeer(name, _first_point(name), pre, seed=0)
    _, warm = scenario_tasks(pre, "warm")
    _, item_cold = scenario_tasks(pre, "item_cold")
    _, user_cold = scenario_tasks(pre, "user_cold")
    # Train users' support rows are the training rows: no extra user, one base fit for both scenarios.
    for batch in (warm, item_cold):
        predictions = peer.predict(batch)
        assert predictions.shape == batch.query_items.shape
        assert peer.retrains == 1
    first = peer.predict(user_cold)
    assert peer.retrains == 2  # the test users' support rows: one retrain
    assert torch.equal(peer.predict(user_cold), first)  # the same scenario again reuses that fit
    assert peer.retrains == 2
    _, three_shot = scenario_tasks(pre, "user_cold", kshot=3)
    peer.predict(three_shot)
    assert peer.retrains == 3  # another support set (K = 3): another retrain
    real = user_cold.query_mask > 0
    assert bool(((first[real] >= pre.rating_min) & (first[real] <= pre.rating_max)).all())


@pytest.mark.parametrize("name", peers.PEER_NAMES)
def test_new_users_are_learned_from_their_support_ratings(pre, name):
    """The same test users rating everything 5 get higher predictions than when rating everything 1."""
    _, batch = scenario_tasks(pre, "user_cold")
    high = replace(batch, support_ratings=torch.where(batch.support_mask > 0, 5.0, 0.0))
    low = replace(batch, support_ratings=torch.where(batch.support_mask > 0, 1.0, 0.0))
    peer = RetrainedPeer(name, _first_point(name), pre, seed=0)
    real = batch.query_mask > 0
    assert float(peer.predict(high)[real].mean()) > float(peer.predict(low)[real].mean()) + 0.2


def test_lightfm_scores_cold_items_from_their_features(pre):
    _, batch = scenario_tasks(pre, "item_cold")
    predictions = RetrainedPeer("lightfm", _first_point("lightfm"), pre, seed=0).predict(batch)
    spread = [float(predictions[t][batch.query_mask[t] > 0].std()) for t in range(len(batch))
              if int(batch.query_mask[t].sum()) > 1]  # fmt: skip
    assert spread and max(spread) > 0.0  # cold items of one user are told apart


@pytest.mark.slow
def test_evaluation_labels_peers_as_references_and_keeps_per_user_parts(pre_dir, tmp_path):
    config = {"baselines": ["global_mean", "item_user_bias"], "peers": FAST_PEERS, "per_user": True,
              "kshots": [1, 3]}  # fmt: skip
    document = run_evaluation(str(pre_dir), {}, config, str(tmp_path))
    for name in peers.PEER_NAMES:
        entry = document["methods"][name]
        assert entry["kind"] == "reference" and entry["reference"] is True
        assert entry["retrains"] >= 4  # base, user_cold, user_item_cold, one per K
        assert "retrain" in entry["cost"]
        for scenario in document["scenarios"].values():
            assert math.isfinite(scenario[name]["mae"])
        assert set(document["kshot"]["user_cold"][name]) == {"1", "3"}
    assert [p["k"] for p in document["methods"]["surprise_knn"]["grid_val_mae"]] == [40, 10]
    assert document["methods"]["surprise_knn"]["tuning_retrains"] == 2
    report = (tmp_path / "report.md").read_text()
    assert "| surprise_svdpp | reference |" in report
    assert "retrained from scratch" in report
    # The per-user parts give back the pooled metrics of the document.
    for scenario, parts in document["per_user"].items():
        rows = parts["n_rows"]
        assert len(parts["users"]) == len(rows)
        for method, per_user in parts["methods"].items():
            pooled = sum(per_user["abs_err"]) / sum(rows)
            assert pooled == pytest.approx(document["scenarios"][scenario][method]["mae"], abs=1e-5)
            informative = [v for v in per_user["ndcg@3"] if v is not None]
            assert sum(informative) / len(informative) == pytest.approx(
                document["scenarios"][scenario][method]["ndcg@3"], abs=1e-5
            )


def test_evaluation_has_no_peers_or_per_user_parts_by_default(pre_dir, tmp_path):
    document = run_evaluation(str(pre_dir), {}, {"baselines": ["global_mean"], "kshots": [1]}, str(tmp_path))
    assert set(document["methods"]) == {"global_mean"}
    assert "per_user" not in document
    assert "reference" not in (tmp_path / "report.md").read_text()


def test_lightfm_bins_are_fitted_on_train_users_and_warm_items_only(pre):
    """Changing the numeric features of validation/test users or cold items leaves the bins unchanged."""
    from metarec.features import EncodedFeatures
    from metarec.peers import _LightFMPeer

    heldout = torch.from_numpy(pre.user_split != 0)
    cold = pre.item_warm_idx == 0
    assert bool(heldout.any()) and bool(cold.any())
    assert pre.user_features.num.shape[1] > 0 and pre.item_features.num.shape[1] > 0
    changed = copy.copy(pre)
    user_num = pre.user_features.num.clone()
    user_num[heldout] += 100.0  # far outside the training users' range: would move every quantile
    item_num = pre.item_features.num.clone()
    item_num[cold] -= 100.0
    changed.user_features = EncodedFeatures(pre.user_features.cat, user_num, pre.user_features.multi)
    changed.item_features = EncodedFeatures(pre.item_features.cat, item_num, pre.item_features.multi)
    before = _LightFMPeer(_first_point("lightfm"), pre, seed=0)
    after = _LightFMPeer(_first_point("lightfm"), changed, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(before.user_edges, after.user_edges, strict=True))
    warm = torch.nonzero(~cold).squeeze(-1).numpy()
    assert (before.item_matrix[warm] != after.item_matrix[warm]).nnz == 0


def test_a_new_user_with_a_train_users_support_set_is_not_that_train_user(pre):
    """A test user whose support rows equal a train user's whole support set (likely at K = 1) is
    retrained as a new user from its own features, never scored as the train user."""
    users, items, ratings = pre.training_rows()
    counts = torch.bincount(users)
    train_user = int(torch.nonzero(counts > 0)[0])
    rows = users == train_user
    test_user = int(pre.split_users("test")[0])
    assert not torch.equal(pre.user_features.cat[test_user], pre.user_features.cat[train_user])
    own = pre.tasks_for_users(np.array([train_user]))
    own = replace(own, support_items=items[rows][None], support_ratings=ratings[rows][None],
                  support_mask=torch.ones(1, int(rows.sum())))  # fmt: skip
    impostor = pre.tasks_for_users(np.array([test_user]))
    impostor = replace(
        own, user_cat=impostor.user_cat, user_num=impostor.user_num, user_multi=impostor.user_multi
    )
    peer = RetrainedPeer("lightfm", _first_point("lightfm"), pre, seed=0)
    as_train_user = peer.predict(own)
    assert peer.retrains == 1  # the train user itself: the base fit
    as_new_user = peer.predict(impostor)
    assert peer.retrains == 2  # another user: retrained with its support rows as a new user
    assert not torch.equal(as_new_user, as_train_user)
