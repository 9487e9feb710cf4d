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
