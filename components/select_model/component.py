"""KFP component: pick the best meta-learned candidate and gate it against the best baseline."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from metarec.images import components_image


@dsl.component(base_image=components_image(), install_kfp_package=False)
def select_model(
    evaluation: Input[Artifact],
    models: Input[list[Model]],
    selected_model: Output[Model],
    selection: Output[Artifact],
    metrics: Output[Metrics],
    metric: str = "ndcg@3",
    scenario: str = "user_cold",
    fail_if_worse: bool = False,
):
    """Selects the best meta-learned model of an evaluation and copies it to the output.

    The choice and the gate read the validation users' scores (the evaluation's ``validation`` section);
    the test users' scores are only reported beside them.

    Args:
        evaluation: Evaluation document (output ``evaluation`` of the evaluate component).
        models: The candidate models that were evaluated (the same list given to evaluate).
        selected_model: Copy of the selected candidate's model directory; metadata names the method.
        selection: JSON summary: selected, metric, scenario, decided_on, value and baseline_value (on
            the validation users), best_baseline, beats_baseline, test_value and baseline_test_value
            (the two methods' test scores, reported only), message.
        metrics: The selected and best-baseline validation scores, the selected model's test score
            (``selected.test.<metric>``), and beats_baseline as 0/1.
        metric: Selection metric: ``ndcg@<k>`` (higher is better), ``mae`` or ``rmse``.
        scenario: Scenario the choice is for: ``user_cold`` (default), ``warm``, ``item_cold`` or
            ``user_item_cold``; decided on the validation users' ``user_cold`` (for ``warm`` and
            ``user_cold``) or ``user_item_cold`` rows (for the cold-item scenarios).
        fail_if_worse: Fail the task when the selected model does not beat the best baseline (the
            default only warns).
    """
    import shutil

    from metarec.components.common import (
        fresh_output_dir,
        model_dirs_by_method,
        read_json_artifact,
        write_json,
    )
    from metarec.selection import select_model as choose

    document = read_json_artifact(evaluation.path, "evaluation (output 'evaluation' of evaluate)")
    result = choose(document, metric=metric, scenario=scenario, fail_if_worse=fail_if_worse)
    candidates = model_dirs_by_method(models)
    if result["selected"] not in candidates:
        raise ValueError(
            f"the evaluation selected {result['selected']!r} but the candidate models are {sorted(candidates)}"
        )
    # Emptied first: an earlier attempt may have copied another candidate there.
    shutil.copytree(candidates[result["selected"]], fresh_output_dir(selected_model.path), dirs_exist_ok=True)
    selected_model.metadata["method"] = result["selected"]
    result["model_dir"] = selected_model.path
    write_json(selection.path, result)

    print(result["message"])
    metrics.log_metric(f"selected.{metric}", float(result["value"]))
    if result.get("test_value") is not None:
        metrics.log_metric(f"selected.test.{metric}", float(result["test_value"]))
    if result.get("baseline_value") is not None:
        metrics.log_metric(f"best_baseline.{metric}", float(result["baseline_value"]))
    metrics.log_metric("beats_baseline", 1.0 if result["beats_baseline"] else 0.0)
