"""evaluate from its compiled YAML under kfp.local, fed by the real preprocess and meta_train steps."""

import json

import pytest
from kfp import dsl
from kfp_fakes import load, task_dir

pytestmark = pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
TRAIN = json.dumps({"meta_steps": 2, "meta_batch": 4, "val_every": 0, "checkpoint_every": 0})
EVALUATE = json.dumps({"scenarios": ["user_cold"], "baselines": ["global_mean"], "kshots": [1],
                       "tune_on_val": False})  # fmt: skip


@pytest.mark.slow
def test_evaluate_scores_candidates_and_baselines(local_runner):
    @dsl.pipeline(name="evaluate-only")
    def pipe(methods: list = ["maml", "reptile"]):  # noqa: B006 - a pipeline parameter default
        prep = load("preprocess")(data_uri="synthetic:tiny")
        with dsl.ParallelFor(methods) as method:
            train = load("meta_train")(dataset=prep.outputs["dataset"], method=method, config=TRAIN)
        load("evaluate")(dataset=prep.outputs["dataset"], models=dsl.Collected(train.outputs["model"]),
                         config=EVALUATE)  # fmt: skip

    pipe()
    folder = task_dir(local_runner, "evaluate")
    document = json.loads((folder / "evaluation").read_text())
    assert {"maml", "reptile", "global_mean"} <= set(document["scenarios"]["user_cold"])
    logged = json.loads((folder / "executor_output.json").read_text())["artifacts"]["metrics"]
    assert "user_cold.maml.ndcg@3" in logged["artifacts"][0]["metadata"]
    assert (folder / "report").read_text().startswith("#")
