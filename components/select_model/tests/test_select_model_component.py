"""select_model from its compiled YAML under kfp.local: the choice, the copy, the gate."""

import json

import pytest
from kfp import dsl
from kfp_fakes import fake_candidate, fake_evaluation, load, task_dir

pytestmark = pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")


def _pipeline(best_meta_score: float):
    @dsl.pipeline(name="select-only")
    def pipe(methods: list = ["maml", "reptile"]):  # noqa: B006 - a pipeline parameter default
        with dsl.ParallelFor(methods) as method:
            candidate = fake_candidate(method=method)
        scores = fake_evaluation(best_meta_score=best_meta_score)
        load("select_model")(
            evaluation=scores.outputs["evaluation"], models=dsl.Collected(candidate.outputs["model"])
        )

    return pipe()


# 0.75: reptile is still the best candidate but loses to the baseline (0.8), and the task, whose
# fail_if_worse defaults to false, only says so (with a winner alone, a component that always failed
# a loser passed).
@pytest.mark.slow
@pytest.mark.parametrize(("best_meta_score", "beats"), [(0.9, True), (0.75, False)])
def test_select_model_from_yaml_runs_locally(local_runner, best_meta_score, beats):
    _pipeline(best_meta_score)
    select_dir = task_dir(local_runner, "select-model")
    selection = json.loads((select_dir / "selection").read_text())
    assert selection["selected"] == "reptile"
    assert selection["best_baseline"] == "global_mean"
    assert selection["beats_baseline"] is beats
    # The selected candidate's files were copied, not a reference to them.
    assert json.loads((select_dir / "selected_model" / "model.json").read_text())["method"] == "reptile"
    assert (select_dir / "selected_model" / "model.pt").read_bytes() == b"reptile"
    logged = json.loads((select_dir / "executor_output.json").read_text())["artifacts"]["metrics"]
    values = logged["artifacts"][0]["metadata"]
    assert values["selected.ndcg@3"] == pytest.approx(best_meta_score)
    assert values["beats_baseline"] == float(beats)


@pytest.mark.slow
def test_select_model_fail_if_worse_fails_the_task(local_runner):
    @dsl.pipeline(name="select-worse")
    def pipe(methods: list = ["maml", "reptile"]):  # noqa: B006
        with dsl.ParallelFor(methods) as method:
            candidate = fake_candidate(method=method)
        scores = fake_evaluation(best_meta_score=0.5)
        load("select_model")(
            evaluation=scores.outputs["evaluation"],
            models=dsl.Collected(candidate.outputs["model"]),
            fail_if_worse=True,
        )

    with pytest.raises(RuntimeError, match="select-model"):
        pipe()
