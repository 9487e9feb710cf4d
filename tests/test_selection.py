"""Model selection: picks by metric, breaks ties by MAE, gates against the best baseline."""

from __future__ import annotations

import logging

import pytest

from metarec.selection import ModelSelectionError, best_methods, select_model


def _document(scores: dict[str, dict], meta: set[str], test: dict[str, dict] | None = None) -> dict:
    """``scores`` on the validation users; the test users' are ``test`` (default: the same)."""
    test = scores if test is None else test
    return {
        "dataset": "test",
        "seeds": [0],
        "validation": {"user_cold": scores},
        "scenarios": {"user_cold": test, "warm": test},
        "methods": {
            name: ({"kind": "meta", "model_dir": f"/models/{name}"} if name in meta else {"kind": "baseline"})
            for name in scores
        },
    }


SCORES = {
    "maml": {"mae": 0.74, "rmse": 0.95, "ndcg@3": 0.78},
    "reptile": {"mae": 0.72, "rmse": 0.93, "ndcg@3": 0.76},
    "mf_foldin": {"mae": 0.79, "rmse": 0.99, "ndcg@3": 0.75},
    "global_mean": {"mae": 0.95, "rmse": 1.12, "ndcg@3": 0.70},
}


def test_selects_by_ndcg_higher_is_better():
    result = select_model(_document(SCORES, {"maml", "reptile"}))
    assert result["selected"] == "maml"
    assert result["value"] == pytest.approx(0.78)
    assert result["best_baseline"] == "mf_foldin"
    assert result["baseline_value"] == pytest.approx(0.75)
    assert result["beats_baseline"] is True
    assert result["model_dir"] == "/models/maml"
    assert {"selected", "metric", "scenario", "value", "best_baseline", "baseline_value"} <= set(result)
    assert "maml" in result["message"]


def test_the_choice_and_the_gate_read_the_validation_users_only():
    # On the test users fomaml would win and the baseline would beat both: neither may decide.
    test = {
        "maml": {"mae": 0.80, "ndcg@3": 0.70},
        "fomaml": {"mae": 0.70, "ndcg@3": 0.90},
        "mf_foldin": {"mae": 0.60, "ndcg@3": 0.95},
    }
    validation = {
        "maml": {"mae": 0.75, "ndcg@3": 0.80},
        "fomaml": {"mae": 0.76, "ndcg@3": 0.79},
        "mf_foldin": {"mae": 0.77, "ndcg@3": 0.78},
    }
    result = select_model(_document(validation, {"maml", "fomaml"}, test=test))
    assert result["selected"] == "maml" and result["beats_baseline"] is True
    assert result["value"] == pytest.approx(0.80) and result["baseline_value"] == pytest.approx(0.78)
    assert result["test_value"] == pytest.approx(0.70)  # reported as measured, not chosen on
    assert result["baseline_test_value"] == pytest.approx(0.95)
    assert result["decided_on"] == "validation users (user_cold)"


def test_best_methods_picks_the_product_on_validation_and_the_opponent_on_test_users():
    """The document's best_meta (named by the report and the benches) is chosen as select_model chooses:
    on the validation users; the opponent is the baseline best on the test users."""
    validation = {
        "maml": {"mae": 0.75, "ndcg@3": 0.80},
        "fomaml": {"mae": 0.76, "ndcg@3": 0.70},
        "mf_foldin": {"mae": 0.77, "ndcg@3": 0.90},
        "global_mean": {"mae": 0.95, "ndcg@3": 0.60},
    }
    test = {
        "maml": {"mae": 0.80, "ndcg@3": 0.70},
        "fomaml": {"mae": 0.70, "ndcg@3": 0.90},
        "mf_foldin": {"mae": 0.77, "ndcg@3": 0.60},
        "global_mean": {"mae": 0.95, "ndcg@3": 0.75},
    }
    document = _document(validation, {"maml", "fomaml"}, test=test)
    assert best_methods(document) == ("maml", "global_mean")


@pytest.mark.parametrize(
    ("scenario", "decided_on", "winner"),
    [("warm", "user_cold", "maml"), ("item_cold", "user_item_cold", "fomaml"),
     ("user_item_cold", "user_item_cold", "fomaml")],
)  # fmt: skip
def test_each_scenario_is_decided_on_its_validation_rows(scenario, decided_on, winner):
    """The validation users are cold users: warm choices read their user-cold rows, cold-item choices
    their user+item-cold rows (each section here has another winner)."""
    cold_users = {"maml": {"mae": 0.7, "ndcg@3": 0.9}, "fomaml": {"mae": 0.8, "ndcg@3": 0.7}}
    cold_both = {"maml": {"mae": 0.8, "ndcg@3": 0.6}, "fomaml": {"mae": 0.7, "ndcg@3": 0.8}}
    document = _document(cold_users, {"maml", "fomaml"})
    document["validation"]["user_item_cold"] = cold_both
    document["scenarios"].update(item_cold=cold_users, user_item_cold=cold_users)
    result = select_model(document, scenario=scenario)
    assert result["selected"] == winner and result["decided_on"] == f"validation users ({decided_on})"
    assert best_methods(document, scenario=scenario)[0] == winner


def test_a_document_without_validation_scores_is_refused():
    document = _document(SCORES, {"maml", "reptile"})
    del document["validation"]
    with pytest.raises(ValueError, match="would read the test split"):
        select_model(document)


def test_selects_by_mae_lower_is_better():
    result = select_model(_document(SCORES, {"maml", "reptile"}), metric="mae")
    assert result["selected"] == "reptile"
    assert result["best_baseline"] == "mf_foldin"
    assert result["beats_baseline"] is True


def test_ties_broken_by_mae():
    scores = {
        "maml": {"mae": 0.80, "ndcg@3": 0.77},
        "fomaml": {"mae": 0.76, "ndcg@3": 0.77},
        "global_mean": {"mae": 0.95, "ndcg@3": 0.70},
    }
    assert select_model(_document(scores, {"maml", "fomaml"}))["selected"] == "fomaml"


def test_warns_when_worse_and_fails_if_asked(caplog):
    scores = dict(SCORES, mf_foldin={"mae": 0.70, "rmse": 0.9, "ndcg@3": 0.80})
    document = _document(scores, {"maml", "reptile"})
    with caplog.at_level(logging.WARNING, logger="metarec.selection"):
        result = select_model(document)
    assert result["beats_baseline"] is False
    assert result["selected"] == "maml"
    assert any("WARNING" in record.getMessage() and "NOT" in record.getMessage() for record in caplog.records)
    with pytest.raises(ModelSelectionError, match="mf_foldin"):
        select_model(document, fail_if_worse=True)
    assert issubclass(ModelSelectionError, RuntimeError)


def test_equal_to_baseline_does_not_beat_it():
    scores = {"maml": {"mae": 0.8, "ndcg@3": 0.75}, "mf_foldin": {"mae": 0.8, "ndcg@3": 0.75}}
    with pytest.raises(ModelSelectionError):
        select_model(_document(scores, {"maml"}), fail_if_worse=True)


def test_scenario_and_metric_validation():
    document = _document(SCORES, {"maml"})
    with pytest.raises(ValueError, match="scenario"):
        select_model(document, scenario="item_cold")
    with pytest.raises(ValueError, match="metric"):
        select_model(document, metric="auc")
    with pytest.raises(ValueError, match="meta"):
        select_model(_document(SCORES, set()))
