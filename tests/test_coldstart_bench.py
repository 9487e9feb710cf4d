"""bench/coldstart_quality.py: per-seed results, peer references and paired bootstrap CIs in its last line."""

from __future__ import annotations

import json

import pytest
from bench_modules import load_bench

pytest.importorskip(
    "surprise", reason="the bench's peer references need scikit-surprise: pip install '.[bench]'"
)


@pytest.mark.slow
def test_quick_bench_reports_per_seed_results_peers_and_intervals(tmp_path, capsys):
    bench = load_bench("coldstart_quality")
    bench.main(["--data", "synthetic:tiny", "--seeds", "0", "1", "--quick", "--methods", "mf_foldin", "reptile",
                "--peers", "surprise_knn", "--workdir", str(tmp_path)])  # fmt: skip
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert set(result["per_seed"]) == {"0", "1"}
    assert set(result["per_seed"]["0"]["user_cold"]) == {"reptile", "mf_foldin", "surprise_knn"}
    assert "surprise_knn" in result["scenarios"]["item_cold"]
    # base fit, user_cold, user_item_cold and one per K of the curve, per seed (quick: no grid search)
    assert result["peer_cost"]["surprise_knn"]["retrains"] >= 2 * 3
    assert set(result["ci95"]) == set(result["scenarios"])
    for scenario, per_metric in result["ci95"].items():
        assert set(per_metric) == {"mae", "ndcg@3"}
        for metric, (low, high) in per_metric.items():
            vs = result["ci95_vs"][scenario][metric]
            assert vs["meta"] == "reptile" and vs["other"] in {"mf_foldin", "surprise_knn"}
            assert low <= high and vs["includes_zero"] == (low <= 0 <= high)
    # The aggregated report labels the peer and states the intervals.
    report = (tmp_path / "report.md").read_text()
    assert "| surprise_knn | reference |" in report
    assert "## Paired bootstrap: best meta-learner minus best other method" in report
    assert "95% CI [" in captured.err


def test_the_bench_evaluates_every_baseline_the_evaluation_knows():
    from metarec.baselines import BASELINE_NAMES

    assert load_bench("coldstart_quality").BASELINE_METHODS == BASELINE_NAMES


def test_the_result_gives_the_targets_as_ratios_against_the_same_runs_baseline():
    bench = load_bench("coldstart_quality")
    scores = {"mae": 0.75, "rmse": 0.95, "ndcg@3": 0.76}
    aggregated = {
        "dataset": "x",
        "seeds": [0],
        "best_meta": "reptile",
        "best_baseline": "mf_foldin",
        "scenarios": {
            "user_cold": {"reptile": scores, "mf_foldin": {"mae": 0.8, "rmse": 1.0, "ndcg@3": 0.74}},
            # A scenario the baseline has no score in gets no ratio (never a division by a missing value).
            "item_cold": {"reptile": scores, "mf_foldin": {"mae": 0.9}},
        },
    }
    result = bench.summarise(aggregated, 1.0)
    assert result["meta_over_baseline"] == {
        "user_cold": {
            "mae": pytest.approx(0.75 / 0.8, abs=1e-4),
            "ndcg@3": pytest.approx(0.76 / 0.74, abs=1e-4),
        },
        "item_cold": {"mae": pytest.approx(0.75 / 0.9, abs=1e-4)},
    }
    # No meta-learner evaluated: nothing to compare.
    assert bench.summarise({**aggregated, "best_meta": None}, 1.0)["meta_over_baseline"] == {}
