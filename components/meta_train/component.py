"""KFP component: meta-train one recommender (one method per task, so candidates train side by side)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from metarec.images import components_image


@dsl.component(base_image=components_image(), install_kfp_package=False)
def meta_train(
    dataset: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    method: str = "maml",
    config: str = "{}",
):
    """Meta-trains a preference model with one meta-learning method.

    Args:
        dataset: Preprocessed data set (output of the preprocess component).
        model: Output model directory (model.pt, model.json, schema.json); metadata ``method`` names
            the method so that downstream steps can tell the candidates apart.
        metrics: Final validation metrics of the run (one value per number ``run_meta_training`` returns).
        method: Meta-learning method: ``maml``, ``fomaml`` or ``reptile``.
        config: JSON object with the ``train`` section of the run config (see
            ``metarec.training.DEFAULTS``); ``"{}"`` keeps the defaults.
    """
    from metarec.components.common import numeric_items, parse_config
    from metarec.training import run_meta_training

    result = run_meta_training(
        preprocessed_dir=dataset.path,
        method=method,
        config=parse_config(config, "train"),
        output_dir=model.path,
    )
    model.metadata["method"] = method
    for name, value in numeric_items(result or {}).items():
        metrics.log_metric(name, value)
