"""`metarec tune`: Optuna over meta-training, scored on validation users, never reading the test split."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

pytest.importorskip("optuna", reason="metarec tune needs optuna: pip install '.[bench]'")

from metarec import cli  # noqa: E402
from metarec.tasks import Preprocessed  # noqa: E402
from metarec.tuning import SEARCH_SPACE, resolve_settings, run_tuning  # noqa: E402

TINY = {"meta_steps": 4, "meta_batch": 4, "hidden": [8], "val_every": 0}
SETTINGS = {"trials": 3, "fixed": TINY, "space": ["inner_lr", "inner_steps", "adapt_mode"]}


@pytest.fixture(scope="module")
def pre_dir(tmp_path_factory):
    from metarec.preprocessing import run_preprocessing

    root = tmp_path_factory.mktemp("tuning")
    run_preprocessing("synthetic:tiny", None, None, str(root / "pre"))
    return root / "pre"


def test_resolve_settings_refuses_what_it_does_not_know():
    with pytest.raises(ValueError, match=r"unknown tuning settings \['budget'\]"):
        resolve_settings({"budget": 3})
    with pytest.raises(ValueError, match="objective must be one of"):
        resolve_settings({"objective": "rmse"})
    with pytest.raises(ValueError, match=r"unknown search-space names \['depth'\]"):
        resolve_settings({"space": ["depth"]})
    with pytest.raises(ValueError, match=r"fixed training keys \['speed'\]"):
        resolve_settings({"fixed": {"speed": 1}})
    with pytest.raises(ValueError, match="both searched and fixed"):
        resolve_settings({"fixed": {"inner_lr": 0.1}, "space": ["inner_lr"]})
    with pytest.raises(ValueError, match="meta_steps must be an integer"):
        resolve_settings({"fixed": {"meta_steps": "abc"}})


def test_cli_tune_refuses_bad_input_with_one_line_before_any_work(tmp_path, capsys):
    # Before: the first Optuna trial failed and Optuna logged its whole traceback, and a bad --set was
    # only refused after the data had been preprocessed.
    assert cli.main(["tune", "--preprocessed", str(tmp_path / "nope"), "--trials", "1",
                     "--output", str(tmp_path / "a")]) == 1  # fmt: skip
    assert cli.main(["tune", "--data", "synthetic:tiny", "--set", "meta_steps=abc", "--trials", "1",
                     "--output", str(tmp_path / "b")]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "schema.json not found" in err and "meta_steps must be an integer" in err
    assert "Traceback" not in err
    assert not (tmp_path / "b").exists()  # nothing preprocessed for a run that cannot start
    # A small float in exponent form is a number (YAML 1.1 alone reads 1e-05 as a string).
    assert cli.main(["tune", "--preprocessed", str(tmp_path / "nope"), "--set", "weight_decay=1e-05",
                     "--output", str(tmp_path / "c")]) == 1  # fmt: skip
    assert "weight_decay" not in capsys.readouterr().err  # refused for the folder, not the value


@pytest.mark.slow
def test_best_trial_becomes_a_valid_run_config(pre_dir, tmp_path):
    from metarec.pipelines.run_config import validate_run_config

    summary = run_tuning([str(pre_dir)], SETTINGS, str(tmp_path))
    trials = summary["trials"]
    assert len(trials) == 3
    assert trials[0]["params"] == {"inner_lr": 0.01, "inner_steps": 5, "adapt_mode": "head"}  # the defaults
    assert summary["defaults"] == trials[0]
    # The tiny data's trials tie on ndcg@3, so the next line alone passed with the direction flipped;
    # test_mae_objective_picks_the_lowest_validation_error checks the choice on values that differ.
    assert summary["best"]["value"] == max(t["val_ndcg@3"] for t in trials)
    assert summary["direction"] == "maximize"  # ndcg@3 is maximised
    for trial in trials:
        kind, spec = SEARCH_SPACE["inner_lr"]
        assert spec[0] <= trial["params"]["inner_lr"] <= spec[1]
    written = yaml.safe_load((tmp_path / "best-run-config.yaml").read_text())
    assert written == {"methods": ["reptile"], "train": {**TINY, **summary["best"]["params"]}}
    config = validate_run_config(written)
    assert config["train"]["inner_steps"] == summary["best"]["params"]["inner_steps"]
    assert json.loads((tmp_path / "tuning.json").read_text())["best"]["trial"] == summary["best"]["trial"]
    assert not (tmp_path / "trials").exists()  # trial models are not kept


@pytest.mark.slow
def test_mae_objective_picks_the_lowest_validation_error(pre_dir, tmp_path):
    summary = run_tuning([str(pre_dir)], {**SETTINGS, "objective": "mae"}, str(tmp_path))
    errors = [trial["val_mae"] for trial in summary["trials"]]
    assert len(set(errors)) > 1  # the trials differ, so the direction decides which one is best
    assert [trial["value"] for trial in summary["trials"]] == errors
    assert summary["direction"] == "minimize" and summary["best"]["value"] == min(errors)
    written = yaml.safe_load((tmp_path / "best-run-config.yaml").read_text())
    assert written["train"] == {**TINY, **summary["best"]["params"]}


def _scramble_test_split(pre_dir, target):
    """A copy of the preprocessed data whose test users' ratings are all changed."""
    import shutil

    shutil.copytree(pre_dir, target)
    frame = pd.read_parquet(target / "interactions.parquet")
    test = (frame["user_split"].astype(str) == "test").to_numpy()
    assert test.any()
    rng = np.random.default_rng(0)
    frame.loc[test, "rating"] = rng.integers(1, 6, int(test.sum())).astype(frame["rating"].dtype)
    frame.to_parquet(target / "interactions.parquet")


@pytest.mark.slow
def test_tuning_never_reads_test_users(pre_dir, tmp_path, monkeypatch):
    requested = []
    original = Preprocessed.tasks_for_users

    def spy(self, users, query_role="query", kshot=None):
        test = set(self.split_users("test").tolist())
        requested.append(len(test & set(np.asarray(users).tolist())))
        return original(self, users, query_role, kshot)

    monkeypatch.setattr(Preprocessed, "tasks_for_users", spy)
    first = run_tuning([str(pre_dir)], SETTINGS, str(tmp_path / "a"))
    assert requested and sum(requested) == 0  # tasks were built, none for a test user
    # Behaviour, not only calls: with every test rating changed, the search is the same, trial by trial.
    _scramble_test_split(pre_dir, tmp_path / "scrambled")
    second = run_tuning([str(tmp_path / "scrambled")], SETTINGS, str(tmp_path / "b"))
    strip = lambda trials: [{k: t[k] for k in ("params", "value", "val_mae")} for t in trials]  # noqa: E731
    assert strip(first["trials"]) == strip(second["trials"])


@pytest.mark.slow
def test_cli_tune_preprocesses_and_writes_the_run_config(tmp_path, capsys):
    status = cli.main(["tune", "--data", "synthetic:tiny", "--split-seeds", "0", "1", "--trials", "2",
                       "--space", "inner_lr", "--set", "meta_steps=3", "--set", "val_every=0",
                       "--output", str(tmp_path)])  # fmt: skip
    assert status == 0
    out = capsys.readouterr().out
    assert "current defaults (trial 0)" in out and "best-run-config.yaml" in out
    summary = json.loads((tmp_path / "tuning.json").read_text())
    assert len(summary["splits"]) == 2 and len(summary["trials"][0]["per_split"]) == 2
    assert (
        cli.main(["tune", "--data", "synthetic:tiny", "--set", "meta_steps", "--output", str(tmp_path)]) == 1
    )
    assert "--set expects KEY=VALUE" in capsys.readouterr().err


def test_a_failing_trial_is_recorded_and_the_search_goes_on(pre_dir, tmp_path, monkeypatch):
    """A trial whose training raises (a diverged config: FloatingPointError) or scores NaN used to abort
    the whole study with that error (Optuna re-raises unless told to catch)."""
    import metarec.training

    original, calls = metarec.training.run_meta_training, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("meta-training diverged at meta-step 1/2")
        if len(calls) == 3:
            return {**original(*args, **kwargs), "val_ndcg@3": float("nan")}
        return original(*args, **kwargs)

    monkeypatch.setattr(metarec.training, "run_meta_training", flaky)
    fixed = {**TINY, "meta_steps": 2}
    summary = run_tuning([str(pre_dir)], {"trials": 4, "fixed": fixed, "space": ["inner_lr"]}, str(tmp_path))
    assert [trial["trial"] for trial in summary["trials"]] == [0, 3]
    assert [(f["trial"], f["error"].split(":")[0]) for f in summary["failed"]] == [
        (1, "FloatingPointError"),
        (2, "FloatingPointError"),
    ]
    assert summary["best"]["trial"] in (0, 3) and summary["defaults"]["trial"] == 0
    assert json.loads((tmp_path / "tuning.json").read_text())["failed"] == summary["failed"]


def test_tuning_says_so_when_every_trial_fails(pre_dir, tmp_path, monkeypatch):
    import metarec.training

    def diverged(*args, **kwargs):
        raise FloatingPointError("diverged")

    monkeypatch.setattr(metarec.training, "run_meta_training", diverged)
    with pytest.raises(RuntimeError, match=r"every trial failed \(2\).*FloatingPointError: diverged"):
        run_tuning([str(pre_dir)], {"trials": 2, "fixed": TINY, "space": ["inner_lr"]}, str(tmp_path))
