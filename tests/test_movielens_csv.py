"""The MovieLens CSV layout end to end: a small release with tags -> preprocessing -> meta-training ->
evaluation, the same protocol as MovieLens-100K, driven by the shipped config alone."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
from csv_release import write_csv_release

from metarec.evaluation import run_evaluation
from metarec.model import PreferenceModel
from metarec.preprocessing import run_preprocessing
from metarec.training import run_meta_training

TRAIN = {"meta_steps": 6, "meta_batch": 4, "val_every": 0, "checkpoint_every": 0, "device": "cpu"}
EVALUATE = {"baselines": ["global_mean", "item_user_bias"], "kshots": [1, 5], "tune_on_val": False}


def test_csv_release_with_tags_runs_the_whole_protocol(tmp_path):
    source = write_csv_release(tmp_path / "raw")
    pre_dir, model_dir = tmp_path / "pre", tmp_path / "reptile"
    run_preprocessing(str(source), "movielens-csv", None, str(pre_dir))
    run_meta_training(str(pre_dir), "reptile", TRAIN, str(model_dir), resume=False)
    document = run_evaluation(str(pre_dir), {"reptile": str(model_dir)}, EVALUATE, str(tmp_path / "eval"))

    assert set(document["scenarios"]) == {"warm", "user_cold", "item_cold", "user_item_cold"}
    for scenario, methods in document["scenarios"].items():
        assert set(methods) == {"reptile", "global_mean", "item_user_bias"}, scenario
        assert methods["reptile"]["n_users"] > 0
        assert all(math.isfinite(methods["reptile"][m]) for m in ("mae", "rmse", "ndcg@3")), scenario
    assert 0.0 < document["scenarios"]["item_cold"]["reptile"]["mae"] < 2.5

    # The model scores every item from its text: the trained catalogue carries the title+tag vectors,
    # and two cold items with different text get different item inputs.
    schema = json.loads((pre_dir / "schema.json").read_text())
    items = pd.read_parquet(pre_dir / "items.parquet")
    model = PreferenceModel.from_dir(model_dir)
    assert model.item_dims.n_num == 1 + 32  # year + the text vector
    cold = np.flatnonzero(items["is_cold"].to_numpy())
    item_num = next(value for key, value in model.state_dict().items() if key.endswith("item_num"))
    text_block = item_num[:, 1:]
    assert text_block.shape == (len(items), 32)
    assert not np.allclose(text_block[cold[0]].numpy(), text_block[cold[1]].numpy())
    assert schema["counts"]["tags_used"] > 0 and schema["display"][0]["column"] == "display_title"
