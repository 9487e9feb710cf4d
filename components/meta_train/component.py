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
    device: str = "cpu",
    cpu_threads: int = 1,
    checkpoint_root: str = "",
    run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    task_id: str = dsl.PIPELINE_TASK_ID_PLACEHOLDER,
):
    """Meta-trains a preference model with one meta-learning method, resuming a retry from its checkpoints.

    Args:
        dataset: Preprocessed data set (output of the preprocess component).
        model: Output model directory (model.pt, model.json, schema.json); metadata ``method`` names
            the method so that downstream steps can tell the candidates apart.
        metrics: Final validation metrics of the run (one value per number ``run_meta_training`` returns).
        method: Meta-learning method: ``maml``, ``fomaml`` or ``reptile``.
        config: JSON object with the ``train`` section of the run config (see
            ``metarec.training.DEFAULTS``); ``"{}"`` keeps the defaults.
        device: ``cpu`` or ``cuda``, set by the pipeline variant: ``cuda`` fails when no GPU is visible
            rather than training on the CPU while holding the GPU.
        cpu_threads: torch CPU threads, set by the pipeline to the task's CPU request.
        checkpoint_root: Durable prefix (``gs://`` on a cluster) for checkpoints; empty: the folder
            above the model artifact. A retry of the same task resumes from
            ``<root>/checkpoints/<run_id>/<task_id>/<method>``; another run never sees them.
        run_id: KFP run id (the backend fills it).
        task_id: KFP task id (the backend fills it; a retry keeps it).
    """
    from metarec.components.common import (
        check_location,
        checkpoint_dir,
        fresh_output_dir,
        numeric_items,
        parse_config,
    )
    from metarec.training import run_meta_training

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    train = dict(parse_config(config, "train") or {})
    root = check_location(train.get("checkpoint_dir") or checkpoint_root, "checkpoint_root")
    train["checkpoint_dir"] = checkpoint_dir(root, model.uri, run_id, task_id, method)
    # Checkpoints live outside the model folder, so emptying it keeps what a retry resumes from.
    fresh_output_dir(model.path)
    train["device"], train["cpu_threads"] = device, cpu_threads
    result = run_meta_training(
        preprocessed_dir=dataset.path, method=method, config=train, output_dir=model.path
    )
    model.metadata["method"] = method
    for name, value in numeric_items(result or {}).items():
        metrics.log_metric(name, value)
