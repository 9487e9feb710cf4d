"""Cold-start evaluation end to end on the tiny synthetic data set, and seed aggregation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from metarec.evaluation import DEFAULTS, SCENARIOS, aggregate_seeds, run_evaluation
from metarec.report import render_markdown

# Small grids and a short global-model run keep the end-to-end test to a few seconds.
FAST_EVALUATION = {
    "item_user_bias": {"item_reg": [5.0, 1.0], "user_reg": [2.0]},
    "mf_foldin": {
        "factors": [4],
        "reg": [5.0],
        "foldin_reg_scale": [1.0, 0.3],
        "foldin_bias_reg": [2.0],
        "iterations": 5,
    },
    "global_model": {"epochs": 2, "batch_size": 512},
    "finetune": {"steps": [2], "lr": [0.01]},
}
TINY_TRAINING = {
    "meta_steps": 3,
    "meta_batch": 4,
    "inner_steps": 1,
    "embed_dim": 4,
    "hidden": [8],
    "val_every": 0,
    "checkpoint_every": 0,
}
METRICS = ("mae", "rmse", "ndcg@1", "ndcg@3", "ndcg@5")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from metarec.preprocessing import run_preprocessing
    from metarec.training import run_meta_training

    root = tmp_path_factory.mktemp("evaluation")
    run_preprocessing("synthetic:tiny", None, None, str(root / "pre"))
    run_meta_training(str(root / "pre"), "maml", TINY_TRAINING, str(root / "maml"))
    document = run_evaluation(
        str(root / "pre"), {"maml": str(root / "maml")}, FAST_EVALUATION, str(root / "out")
    )
    return root, document


@pytest.mark.slow
def test_document_has_every_scenario_method_and_metric(evaluated):
    root, document = evaluated
    expected_methods = {
        "maml",
        "global_mean",
        "item_user_bias",
        "mf_foldin",
        "global_model",
        "finetune",
        "fitted_start",
    }
    assert set(document["scenarios"]) == set(SCENARIOS)
    for scenario in SCENARIOS:
        assert set(document["scenarios"][scenario]) == expected_methods
        for method, scores in document["scenarios"][scenario].items():
            for metric in METRICS:
                assert math.isfinite(scores[metric]), (scenario, method, metric)
                assert scores[f"{metric}_std"] == 0.0
            assert 0.0 <= scores["ndcg@3"] <= 1.0
            assert scores["mae"] <= scores["rmse"] + 1e-9
    # Every method is also scored on the validation users, where every choice among them is made.
    assert set(document["validation"]) == {"user_cold", "user_item_cold"}
    for scores in document["validation"].values():
        assert set(scores) == expected_methods
    from metarec.tasks import Preprocessed, scenario_tasks

    val_users, _ = scenario_tasks(Preprocessed.load(str(root / "pre")), "user_cold", users_split="val")
    assert document["validation"]["user_cold"]["maml"]["n_users"] == len(val_users) > 0
    assert document["methods"]["maml"]["kind"] == "meta"
    assert document["methods"]["maml"]["model_dir"] == str(root / "maml")
    assert document["methods"]["mf_foldin"]["kind"] == "baseline"
    assert document["best_meta"] == "maml"
    assert document["best_baseline"] in expected_methods - {"maml"}
    assert document["seeds"] == [0]
    # Sanity check of the fitted baselines: per-item and per-user offsets beat one constant on warm users.
    warm = document["scenarios"]["warm"]
    assert warm["item_user_bias"]["mae"] < warm["global_mean"]["mae"]


@pytest.mark.slow
def test_kshot_curves_and_files_written(evaluated):
    root, document = evaluated
    curves = document["kshot"]["user_cold"]
    kshots = json.loads((root / "pre" / "schema.json").read_text())["tasks"]["kshots"]
    assert set(curves["maml"]) == {str(k) for k in kshots}
    assert set(curves) == set(document["scenarios"]["user_cold"])
    # A baseline that reads the support set must score differently as K grows (K is really applied).
    bias_curve = [curves["item_user_bias"][str(k)]["mae"] for k in kshots]
    assert len(set(bias_curve)) > 1
    out = root / "out"
    on_disk = json.loads((out / "evaluation.json").read_text())
    assert on_disk["scenarios"]["user_cold"]["maml"]["mae"] == pytest.approx(
        document["scenarios"]["user_cold"]["maml"]["mae"]
    )
    report = (out / "report.md").read_text()
    assert "![K-shot curves](kshot.png)" in report
    for scenario_heading in ("User cold-start", "Warm", "Item cold-start", "User and item cold-start"):
        assert scenario_heading in report
    assert (out / "kshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_config_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="bogus"):
        run_evaluation(str(tmp_path), {}, {"bogus": 1}, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="nope"):
        run_evaluation(str(tmp_path), {}, {"mf_foldin": {"nope": 1}}, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="scenarios"):
        run_evaluation(str(tmp_path), {}, {"scenarios": ["lukewarm"]}, str(tmp_path / "out"))
    assert "finetune" in DEFAULTS["baselines"]


def _seed_document(seed: int, maml_mae: float, mf_mae: float, maml_ndcg: float, mf_ndcg: float) -> dict:
    scores = {
        "maml": {"mae": maml_mae, "ndcg@3": maml_ndcg, "mae_std": 0.0, "n_users": 10},
        "mf_foldin": {"mae": mf_mae, "ndcg@3": mf_ndcg, "mae_std": 0.0, "n_users": 10},
    }
    return {
        "dataset": "d",
        "seeds": [seed],
        "scenarios": {"user_cold": scores},
        # A copy: one dict under both keys made every edit of a test's validation scores its test scores too.
        "validation": {"user_cold": {name: dict(values) for name, values in scores.items()}},
        "kshot": {
            "user_cold": {"maml": {"1": {"mae": maml_mae + 0.1}}, "mf_foldin": {"1": {"mae": mf_mae + 0.1}}}
        },
        "methods": {"maml": {"kind": "meta", "model_dir": f"/m{seed}"}, "mf_foldin": {"kind": "baseline"}},
        "selection_metric": "ndcg@3",
    }


def test_aggregate_seeds_mean_std_and_best():
    documents = [_seed_document(0, 0.70, 0.80, 0.75, 0.74), _seed_document(1, 0.80, 0.78, 0.71, 0.73)]
    aggregated = aggregate_seeds(documents)
    assert aggregated["seeds"] == [0, 1]
    maml = aggregated["scenarios"]["user_cold"]["maml"]
    assert maml["mae"] == pytest.approx(0.75)
    assert maml["mae_std"] == pytest.approx(math.sqrt(0.005))  # sample std of 0.70 and 0.80
    assert maml["ndcg@3"] == pytest.approx(0.73)
    assert aggregated["kshot"]["user_cold"]["mf_foldin"]["1"]["mae"] == pytest.approx(0.89)
    # Mean nDCG@3: maml 0.73 vs mf_foldin 0.735.
    assert aggregated["best_meta"] == "maml"
    assert aggregated["best_baseline"] == "mf_foldin"
    assert aggregated["methods"]["maml"]["kind"] == "meta"
    assert "± " in render_markdown(aggregated)
    with pytest.raises(ValueError):
        aggregate_seeds([])


def test_report_summary_reads_the_direction_of_the_metric():
    # MAE: lower is better, so a meta-learner with the higher MAE does not win on it.
    document = _seed_document(0, 0.90, 0.80, 0.75, 0.74)
    document["selection_metric"] = "mae"
    summary = render_markdown(document).split("## Summary")[1].split("\n## ")[0]
    row = next(line for line in summary.splitlines() if line.startswith("| user_cold"))
    assert row.endswith("| mae: NO, MAE: NO |"), row


def test_report_names_the_meta_learner_chosen_on_validation_users():
    document = _seed_document(0, 0.70, 0.80, 0.75, 0.74)
    document["scenarios"]["user_cold"]["fomaml"] = {"mae": 0.60, "ndcg@3": 0.99, "n_users": 10}
    document["validation"]["user_cold"]["fomaml"] = {"mae": 0.90, "ndcg@3": 0.10, "n_users": 10}
    document["methods"]["fomaml"] = {"kind": "meta"}
    summary = render_markdown(document).split("## Summary")[1].split("\n## ")[0]
    row = next(line for line in summary.splitlines() if line.startswith("| user_cold"))
    assert "| maml: " in row and "fomaml" not in row  # fomaml wins on test only


def test_fitted_start_is_the_meta_learners_start_with_their_inner_loop(tmp_path):
    # A model "trained" for 0 meta-steps is exactly the start: fitted_start must predict as it does, so
    # the comparison with fitted_start measures what meta-training adds and nothing else.
    from metarec.evaluation import FittedStart, MetaModelPredictor
    from metarec.model import read_model_json
    from metarec.preprocessing import run_preprocessing
    from metarec.tasks import Preprocessed, scenario_tasks
    from metarec.training import run_meta_training

    run_preprocessing("synthetic:tiny", None, None, str(tmp_path / "pre"))
    run_meta_training(str(tmp_path / "pre"), "reptile", {**TINY_TRAINING, "meta_steps": 0, "seed": 3},
                      str(tmp_path / "start"))  # fmt: skip
    pre = Preprocessed.load(str(tmp_path / "pre"))
    _, batch = scenario_tasks(pre, "user_cold")
    start = FittedStart(pre, read_model_json(tmp_path / "start")["training"], seed=0)
    assert start.settings.seed == 3  # the meta-learner's own seed, not the evaluation's
    torch.testing.assert_close(start.predict(batch), MetaModelPredictor(tmp_path / "start").predict(batch))


def test_baselines_and_peers_are_tuned_on_the_validation_users(tmp_path, monkeypatch):
    """The tuning batch handed to the baselines and the peers holds the validation users' user_cold tasks,
    never the test users' (a tuning on test users scores every other number the same)."""
    import metarec.evaluation as evaluation
    import metarec.peers as peers
    from metarec.preprocessing import run_preprocessing
    from metarec.tasks import Preprocessed, scenario_tasks

    run_preprocessing("synthetic:tiny", None, None, str(tmp_path / "pre"))
    seen = {}
    fit_baselines, fit_peers = evaluation.fit_baselines, peers.fit_peers

    def spy_baselines(pre, config, val_batch, *args):
        seen["baselines"] = val_batch
        return fit_baselines(pre, config, val_batch, *args)

    def spy_peers(pre, names, val_batch, *args):
        seen["peers"] = val_batch
        return fit_peers(pre, names, val_batch, *args)

    monkeypatch.setattr(evaluation, "fit_baselines", spy_baselines)
    monkeypatch.setattr(peers, "fit_peers", spy_peers)
    config = {"baselines": ["global_mean", "item_user_bias"], "scenarios": ["user_cold"], "kshots": [1],
              "item_user_bias": FAST_EVALUATION["item_user_bias"]}  # fmt: skip
    run_evaluation(str(tmp_path / "pre"), {}, config, str(tmp_path / "out"))
    pre = Preprocessed.load(str(tmp_path / "pre"))
    (_, val), (_, test) = (
        scenario_tasks(pre, "user_cold", users_split="val"),
        scenario_tasks(pre, "user_cold"),
    )
    assert val.query_items.shape != test.query_items.shape or not torch.equal(
        val.query_items, test.query_items
    )
    for name in ("baselines", "peers"):
        for field in ("user_cat", "support_items", "query_items", "query_ratings"):
            torch.testing.assert_close(getattr(seen[name], field), getattr(val, field), msg=f"{name} {field}")
