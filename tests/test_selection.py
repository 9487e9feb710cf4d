"""Model selection: picks by metric, breaks ties by MAE, gates against the best baseline."""

from __future__ import annotations

import logging

import pytest

from metarec.selection import ModelSelectionError, select_model


def _document(scores: dict[str, dict], meta: set[str]) -> dict:
    return {
        "dataset": "test",
        "seeds": [0],
        "scenarios": {"user_cold": scores, "warm": scores},
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
