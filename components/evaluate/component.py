"""KFP component: evaluate the candidate models against the baselines on every cold-start scenario."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from metarec.images import components_image


@dsl.component(base_image=components_image(), install_kfp_package=False)
def evaluate(
    dataset: Input[Dataset],
    models: Input[list[Model]],
    metrics: Output[Metrics],
    report: Output[Markdown],
    evaluation: Output[Artifact],
    config: str = "{}",
):
    """Scores every candidate and the baselines on the warm and cold-start scenarios.

    Args:
        dataset: Preprocessed data set (output of the preprocess component).
        models: Candidate models (outputs of meta_train, e.g. ``dsl.Collected`` over a ParallelFor);
            each is told apart by its ``method`` metadata or its ``model.json``.
        metrics: Key numbers: ``<scenario>.<method>.<metric>`` for ndcg@3, mae and rmse.
        report: Markdown report with the K-shot curve embedded as a base64 PNG.
        evaluation: The evaluation document (``evaluation.json``, format in docs/ARCHITECTURE.md).
        config: JSON object with the ``evaluate`` section of the run config (see
            ``metarec.evaluation.DEFAULTS``); ``"{}"`` keeps the defaults.
    """
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from metarec.components.common import embed_images, model_dirs_by_method, parse_config
    from metarec.evaluation import run_evaluation

    key_metrics = ("ndcg@3", "mae", "rmse")
    with tempfile.TemporaryDirectory(prefix="metarec-evaluate-") as work_dir:
        document = run_evaluation(
            preprocessed_dir=dataset.path,
            model_dirs=model_dirs_by_method(models),
            config=parse_config(config, "evaluate"),
            output_dir=work_dir,
        )
        shutil.copyfile(Path(work_dir) / "evaluation.json", evaluation.path)
        report_md = Path(work_dir) / "report.md"
        text = report_md.read_text() if report_md.is_file() else "# MetaRec evaluation\n"
        Path(report.path).write_text(embed_images(text, work_dir))

    document = document or json.loads(Path(evaluation.path).read_text())
    for scenario, methods in document.get("scenarios", {}).items():
        for method, scores in methods.items():
            for name in key_metrics:
                if isinstance(scores.get(name), (int, float)):
                    metrics.log_metric(f"{scenario}.{method}.{name}", float(scores[name]))
    evaluation.metadata["best_meta"] = document.get("best_meta")
    evaluation.metadata["best_baseline"] = document.get("best_baseline")
