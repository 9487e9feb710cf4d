"""Documented options whose packages an image lacks refuse at once, naming the package and its extra.

The dev venv has every extra, so the packages are hidden here the way a clean image lacks them
(``importlib.util.find_spec`` answers None); ``make fidelity`` runs the same paths in the real image venv.
"""

from __future__ import annotations

import importlib.util
import time

import pytest

from metarec import cli
from metarec.evaluation import run_evaluation

BENCH_MODULES = ("surprise", "lightfm", "optuna")


@pytest.fixture
def without_bench(monkeypatch):
    """Makes the ``bench`` extra's modules look uninstalled, as in the components and serving images."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name.split(".")[0] in BENCH_MODULES:
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.fixture(scope="module")
def pre_dir(tmp_path_factory):
    from metarec.preprocessing import run_preprocessing

    root = tmp_path_factory.mktemp("image-options")
    run_preprocessing("synthetic:tiny", None, None, str(root / "pre"))
    return root / "pre"


def test_evaluate_with_peers_refuses_before_reading_data(without_bench, tmp_path, monkeypatch):
    # Before: the data were loaded and every baseline fitted (minutes on real data) before the peers'
    # packages were looked for. Now nothing is read: the preprocessed folder need not even exist.
    from metarec.tasks import Preprocessed

    def no_load(*args, **kwargs):
        raise AssertionError("the data were read before the missing peer packages were reported")

    monkeypatch.setattr(Preprocessed, "load", no_load)
    with pytest.raises(ValueError) as caught:
        run_evaluation(
            str(tmp_path / "absent"), {}, {"peers": ["lightfm", "surprise_knn"]}, str(tmp_path / "o")
        )
    message = str(caught.value)
    assert "['lightfm-next', 'scikit-surprise']" in message and "'bench' extra" in message
    assert "components and serving images do not install" in message
    assert not (tmp_path / "o").exists()


def test_evaluate_without_peers_still_runs_without_bench(without_bench, pre_dir, tmp_path):
    document = run_evaluation(
        str(pre_dir), {}, {"scenarios": ["user_cold"], "baselines": ["global_mean"], "tune_on_val": False,
                           "kshots": [1]}, str(tmp_path / "o"),
    )  # fmt: skip
    assert "global_mean" in document["scenarios"]["user_cold"]


def test_tune_refuses_before_preprocessing(without_bench, tmp_path, capsys):
    # Before: `metarec tune --data ...` preprocessed every split, then failed on `import optuna` with a
    # bare "No module named 'optuna'".
    started = time.monotonic()
    status = cli.main(["tune", "--data", "synthetic:tiny", "--trials", "1", "--output", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert status == 1
    assert "metarec tune needs optuna, from the 'bench' extra" in err and "manifests/katib" in err
    assert not (tmp_path / "t").exists()  # nothing preprocessed
    assert time.monotonic() - started < 5


def test_run_tuning_names_the_extra(without_bench, pre_dir, tmp_path):
    from metarec.tuning import run_tuning

    with pytest.raises(ModuleNotFoundError, match="'bench' extra"):
        run_tuning([str(pre_dir)], {"trials": 1}, str(tmp_path / "t"))
