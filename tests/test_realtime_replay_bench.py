"""bench/realtime_replay.py: the paired bootstrap of the served loop against MF fold-in."""

from __future__ import annotations

import json
import math

import pytest
from bench_modules import load_bench


@pytest.fixture(scope="module")
def replay():
    return load_bench("realtime_replay")


def events(errors_by_user: dict, ndcg: float = 0.5) -> list[dict]:
    return [
        {"unit": (0, user), "error": error, "ndcg": ndcg if n else math.nan}
        for user, errors in errors_by_user.items()
        for n, error in enumerate(errors)
    ]


def test_same_predictions_give_a_zero_difference_inside_the_interval(replay):
    rows = events({1: [0.5, 1.0], 2: [0.2], 3: [0.9, 0.1, 0.4]})
    result = replay.paired_bootstrap(rows, rows, "mae", seed=0)
    assert result == {"diff": 0.0, "ci95": [0.0, 0.0], "includes_zero": True}


def test_a_method_better_for_every_user_is_better_with_an_interval_off_zero(replay):
    worse = events({user: [0.8, 0.9, 1.0] for user in range(20)})
    better = events({user: [0.6, 0.7, 0.8] for user in range(20)})
    result = replay.paired_bootstrap(better, worse, "mae", seed=0)
    assert result["diff"] == pytest.approx(-0.2) and result["ci95"][1] < 0 and not result["includes_zero"]
    # nDCG skips the events without one (NaN) and is positive when the first method ranks better.
    ranked = replay.paired_bootstrap(events({u: [0, 0] for u in range(20)}, ndcg=0.9),
                                     events({u: [0, 0] for u in range(20)}, ndcg=0.6), "ndcg@3", seed=0)  # fmt: skip
    assert ranked["diff"] == pytest.approx(0.3) and ranked["ci95"][0] > 0


def test_mixed_users_give_an_interval_that_includes_zero(replay):
    a = events({user: [0.5 if user % 2 else 1.0] * 3 for user in range(30)})
    b = events({user: [1.0 if user % 2 else 0.5] * 3 for user in range(30)})
    result = replay.paired_bootstrap(a, b, "mae", seed=0)
    assert result["includes_zero"] and result["ci95"][0] < 0 < result["ci95"][1]


def test_train_settings_reach_the_training_config_as_json(replay):
    args = replay.parse_args(
        ["--meta-steps", "7", "--train", 'freeze=["hidden"]', "--train", "inner_lr=0.02"]
    )
    config = replay.training_config(args, seed=2)
    assert config["seed"] == 2 and config["meta_steps"] == 7
    assert config["freeze"] == ["hidden"] and config["inner_lr"] == 0.02
    with pytest.raises(ValueError, match="not JSON"):
        replay.training_config(replay.parse_args(["--train", "freeze=[hidden]"]), seed=0)
    with pytest.raises(ValueError, match="KEY=JSON"):
        replay.training_config(replay.parse_args(["--train", "inner_lr"]), seed=0)


@pytest.mark.slow
def test_the_bench_runs_end_to_end_on_tiny_data(replay, capsys):
    """The whole replay (training, served loop, baselines, deletion test) on the tiny synthetic set: a
    change to the serving path that breaks the bench fails here, not at the next measurement."""
    replay.main(["--data", "synthetic:tiny", "--meta-steps", "3", "--max-users", "4"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["prequential"]) == {"served_loop", "prior_only", "mf_foldin", "item_user_bias"}
    assert result["events"] > 0 and result["users"] >= 1
    for method in result["prequential"].values():
        assert 0 <= method["mae"] < 4
    assert result["explain_deletion"]["top"] is not None
    served, mf = result["prequential"]["served_loop"], result["prequential"]["mf_foldin"]
    for metric in ("mae", "ndcg@3"):
        assert result["served_over_mf_foldin"][metric] == pytest.approx(served[metric] / mf[metric], abs=1e-4)
    deletion = result["explain_deletion"]
    if deletion["random"]:
        assert result["deletion_ratio"] == pytest.approx(
            deletion["top"] / deletion["random"], rel=1e-2, abs=1e-3
        )
