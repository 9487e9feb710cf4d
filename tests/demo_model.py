"""Builds a small but real served model from the embedded synthetic data (tests, benchmarks, demos).

Every step is the production one: ``run_preprocessing("synthetic:tiny")``, a short
``run_meta_training`` (MAML), ``run_evaluation`` against two cheap baselines, ``build_archive``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEMO_TRAIN_CONFIG: dict[str, Any] = {
    "meta_steps": 400,
    "meta_batch": 16,
    "val_every": 0,
    "checkpoint_every": 0,
    "log_every": 1000,
    "device": "cpu",
    "seed": 0,
}
DEMO_EVAL_CONFIG: dict[str, Any] = {"baselines": ["global_mean", "item_user_bias"], "tune_on_val": False}


def build_untrained_model(workdir: str | Path, adapt: dict[str, Any]) -> Path:
    """Preprocesses ``synthetic:tiny`` and saves a freshly initialised model with its catalogue tables.

    Fast (no training); enough for request validation, routing and batching tests.

    Args:
        workdir: Directory to write ``pre/`` and ``model/`` into.
        adapt: The ``adapt`` section of model.json (``mode``, ``inner_steps``, ``inner_lr``).

    Returns:
        The model directory, laid out like an unpacked archive (schema and tables beside the model).
    """
    import shutil

    import torch

    from metarec.model import PreferenceModel
    from metarec.preprocessing import run_preprocessing
    from metarec.tasks import Preprocessed

    workdir = Path(workdir)
    pre_dir, out = workdir / "pre", workdir / "model"
    run_preprocessing("synthetic:tiny", None, None, str(pre_dir))
    pre = Preprocessed.load(str(pre_dir))
    torch.manual_seed(0)
    model = PreferenceModel(
        pre.encoder.user_dims, pre.encoder.item_dims, pre.schema["n_warm_items"], pre.item_features,
        pre.item_warm_idx,
    )  # fmt: skip
    model.save(out, {"method": "maml", "adapt": adapt})
    for name in ("schema.json", "items.parquet", "users.parquet"):
        shutil.copyfile(pre_dir / name, out / name)
    return out


def build_demo_model(
    workdir: str | Path, data_uri: str = "synthetic:tiny", meta_steps: int = 400
) -> dict[str, Path]:
    """Preprocesses the synthetic data and meta-trains a MAML model on it.

    Args:
        workdir: Directory to write ``preprocessed/`` and ``model/`` into.
        data_uri: Data to preprocess (``synthetic:tiny`` by default: 120 users, 80 items).
        meta_steps: Meta-training steps (400 take about 20 s on one core).

    Returns:
        ``{"preprocessed": dir, "model": dir}``.
    """
    import torch

    from metarec.preprocessing import run_preprocessing
    from metarec.training import run_meta_training

    workdir = Path(workdir)
    preprocessed, model = workdir / "preprocessed", workdir / "model"
    threads = torch.get_num_threads()
    # Tiny tensors: extra intra-op threads only contend for the (shared) cores.
    torch.set_num_threads(1)
    try:
        run_preprocessing(data_uri, None, None, str(preprocessed))
        run_meta_training(
            str(preprocessed), "maml", {**DEMO_TRAIN_CONFIG, "meta_steps": meta_steps}, str(model)
        )
    finally:
        torch.set_num_threads(threads)
    return {"preprocessed": preprocessed, "model": model}


def build_demo_archive(
    workdir: str | Path,
    data_uri: str = "synthetic:tiny",
    meta_steps: int = 400,
    serving_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Builds the demo model, evaluates it and packages it (``<workdir>/archive``).

    Args:
        workdir: Directory for every intermediate output.
        data_uri: Data to preprocess.
        meta_steps: Meta-training steps.
        serving_config: ``build_archive`` serving overrides.

    Returns:
        ``{"preprocessed", "model", "evaluation", "archive_dir", "summary"}`` (paths and the
        ``build_archive`` summary).
    """
    from metarec.evaluation import run_evaluation
    from metarec.packaging import build_archive

    workdir = Path(workdir)
    paths = build_demo_model(workdir, data_uri, meta_steps)
    evaluation_dir = workdir / "evaluation"
    run_evaluation(
        str(paths["preprocessed"]), {"maml": str(paths["model"])}, DEMO_EVAL_CONFIG, str(evaluation_dir)
    )
    archive_dir = workdir / "archive"
    summary = build_archive(
        str(paths["model"]),
        str(evaluation_dir / "evaluation.json"),
        str(archive_dir),
        serving_config=serving_config,
        preprocessed_dir=str(paths["preprocessed"]),
    )
    return {
        **paths,
        "evaluation": evaluation_dir / "evaluation.json",
        "archive_dir": archive_dir,
        "summary": summary,
    }
