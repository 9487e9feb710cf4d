"""The benchmarks without a test of their own run end to end at toy sizes, so a change that breaks one
fails the suite instead of the next measurement (their figures are not checked here: tests check
behaviour, not time)."""

from __future__ import annotations

import json

import pytest
from bench_modules import load_bench


@pytest.mark.slow
def test_meta_train_speed_runs_and_its_two_implementations_agree(capsys):
    bench = load_bench("meta_train_speed")
    status = bench.main(["--meta-batch", "4", "--inner-steps", "2", "--steps", "1", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Exit status 0 only when the vectorised and the per-task meta-gradients agree.
    assert status == 0
    assert result["meta_batch"] == 4 and result["tasks_per_s"] > 0 and result["reference_tasks_per_s"] > 0


@pytest.mark.slow
def test_serving_latency_runs_against_real_servers(capsys):
    bench = load_bench("serving_latency")
    assert bench.main(["--requests", "8", "--meta-steps", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["errors"] == 0 and result["worker_restarts"] == 0
    for level in result["concurrency"].values():
        assert level["feedback_p50_ms"] > 0 and level["noop_p50_ms"] > 0
        assert level["recommend_stateless_p50_ms"] > 0
    assert result["feedback_over_noop_p50"] > 0 and result["recommend_stateless_over_recommend_p50"] > 0


@pytest.mark.slow
def test_serving_soak_runs_and_survives_a_worker_kill(capsys):
    bench = load_bench("serving_soak")
    bench.main(["--seconds", "2", "--kills", "1", "--meta-steps", "3"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["concurrency"]) == {"8", "32"} and result["errors"] == 0
    kill = result["kill"]
    assert kill["kills"] == 1 and kill["requests"] > 0
    # A SIGKILLed worker loses at most the batch it held; the others keep answering.
    assert kill["requests_lost"] <= kill["batch_size"]


@pytest.mark.slow
def test_serving_scale_runs_every_request_kind_at_two_sizes(capsys):
    bench = load_bench("serving_scale")
    argv = ["--items", "100,200", "--users", "40", "--meta-steps", "1", "--repeats", "1"]
    assert bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["items"] == [100, 200]
    for size in ("100", "200"):
        # Every kind answered k items with status 200 (the child raises otherwise) and was timed.
        assert set(result["per_request_ms"][size]) == set(bench.KINDS)
        assert all(ms > 0 for ms in result["per_request_ms"][size].values())
        assert result["rss_loaded_mb"][size] > 0 and result["peak_rss_mb"][size] > 0
        assert result["score_by_index_ms"][size] > 0 and result["score_catalogue_ms"][size] > 0
    # The baseline is the smallest size: its own ratios are 1.
    assert set(result["over_smallest"]["100"].values()) == {1.0}
