"""Hyper-parameter search of a meta-learner with Optuna, on validation users only.

Each trial meta-trains one method with ``metarec.training.run_meta_training`` (the code the
``meta_train`` component runs) under a sampled config, and is scored by the validation-user metrics
that training returns (``val_mae`` / ``val_ndcg@3``: the user_cold scenario of the *validation* split).
Given several preprocessed splits (seeds), a trial trains once per split and scores the mean: one
MovieLens-100K split has only a few dozen validation users.
Nothing here reads the test split: the test users are for the final evaluation only. The best config is
written as a run-config YAML (``methods`` + ``train`` sections) for ``metarec run-local --config``.

:data:`SEARCH_SPACE` is also what the Katib ``Experiment`` in ``manifests/katib/`` searches (a test
keeps them equal). Optuna is the ``bench`` extra.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# name -> (kind, spec). kind: "log" / "float" (low, high), "int" (low, high), "choice" (values).
SEARCH_SPACE: dict[str, tuple[str, Any]] = {
    "inner_lr": ("log", (0.005, 0.3)),
    "inner_steps": ("int", (1, 8)),
    "outer_lr": ("log", (0.0003, 0.01)),
    "user_bias_prior": ("log", (0.5, 20.0)),
    "user_factors": ("choice", [0, 4, 8, 16]),
    "embed_dim": ("choice", [8, 16, 32]),
    "adapt_mode": ("choice", ["head", "decision"]),
    "id_dropout": ("float", (0.0, 0.3)),
}
OBJECTIVES = {"ndcg@3": ("val_ndcg@3", "maximize"), "mae": ("val_mae", "minimize")}
DEFAULTS: dict[str, Any] = {
    "method": "reptile",
    "trials": 12,
    "objective": "ndcg@3",  # validation metric to optimise: "ndcg@3" (maximise) or "mae" (minimise)
    "seed": 0,  # Optuna sampler seed and training seed
    "timeout_s": None,  # stop starting trials after this many seconds (None: run every trial)
    "fixed": {},  # training settings held fixed in every trial (e.g. a reduced meta_steps)
    "space": None,  # subset of SEARCH_SPACE names to search (None: all)
}


def _suggest(trial, name: str) -> Any:
    kind, spec = SEARCH_SPACE[name]
    if kind == "log":
        return trial.suggest_float(name, spec[0], spec[1], log=True)
    if kind == "float":
        return trial.suggest_float(name, spec[0], spec[1])
    if kind == "int":
        return trial.suggest_int(name, spec[0], spec[1])
    return trial.suggest_categorical(name, list(spec))


def resolve_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """Merges tuning settings over :data:`DEFAULTS` and checks them.

    Raises:
        ValueError: An unknown key, objective or search-space name, or a fixed key training does not know.
    """
    from metarec.training import DEFAULTS as TRAINING_DEFAULTS

    unknown = sorted(set(settings or {}) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown tuning settings {unknown}; known: {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **(settings or {})}
    if merged["objective"] not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {merged['objective']!r}")
    space = list(merged["space"] or SEARCH_SPACE)
    bad = sorted(set(space) - set(SEARCH_SPACE))
    if bad:
        raise ValueError(f"unknown search-space names {bad}; known: {sorted(SEARCH_SPACE)}")
    bad = sorted(set(merged["fixed"]) - set(TRAINING_DEFAULTS))
    if bad:
        raise ValueError(f"fixed training keys {bad} are not training settings")
    from metarec.training import TrainSettings

    TrainSettings.from_dict(merged["fixed"])  # a bad value fails here, not inside the first trial
    clash = sorted(set(merged["fixed"]) & set(space))
    if clash:
        raise ValueError(f"{clash} are both searched and fixed")
    merged["space"] = space
    return merged


def require_optuna() -> None:
    """Refuses at once when Optuna is not installed: it is the ``bench`` extra, in no image.

    ``metarec`` is the components image's command line, so ``metarec tune`` can be started there; it must
    say what is missing before preprocessing anything, not fail on the import after.

    Raises:
        ModuleNotFoundError: Naming the package, the extra that has it and the image alternative (Katib).
    """
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise ModuleNotFoundError(
            "metarec tune needs optuna, from the 'bench' extra (pip install 'metarec[bench]'), which the "
            "components image does not install; on the cluster, search with Katib instead "
            "(manifests/katib, docs/tuning.md)",
            name="optuna",
        )


def run_tuning(
    preprocessed_dirs: list[str], settings: dict[str, Any] | None, output_dir: str
) -> dict[str, Any]:
    """Searches the meta-learner's hyper-parameters against validation-user metrics.

    Args:
        preprocessed_dirs: Preprocessing outputs, e.g. one per split seed (their validation users score
            the trials; a trial's value is the mean over them).
        settings: Overrides of :data:`DEFAULTS`.
        output_dir: Receives ``tuning.json`` (every trial), ``best-run-config.yaml`` and, while it
            runs, one model directory per trial under ``trials/`` (removed after scoring).

    Returns:
        ``{"method", "objective", "best": {"params", "value", "val_mae", "val_ndcg@3", "trial"},
        "defaults": the same metrics with training's defaults (trial 0), "trials": [...] (completed),
        "failed": [{"trial", "params", "error"}] (trials whose training raised, e.g. diverged: Optuna
        marks them FAIL and the search goes on), "run_config": path of the YAML, "elapsed_s"}``.

    Raises:
        RuntimeError: No trial completed.
    """
    require_optuna()
    import optuna
    import yaml

    from metarec.tasks import Preprocessed
    from metarec.training import run_meta_training

    cfg = resolve_settings(settings)
    for preprocessed_dir in preprocessed_dirs:
        Preprocessed.load(preprocessed_dir)  # a wrong folder fails here, with one line, not in a trial
    metric, direction = OBJECTIVES[cfg["objective"]]
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    records: list[dict[str, Any]] = []  # completed trials
    failed: list[dict[str, Any]] = []  # trials whose training raised: params and error

    def objective(trial) -> float:
        params = {name: _suggest(trial, name) for name in cfg["space"]}
        train_config = {**cfg["fixed"], **params, "seed": int(cfg["seed"]), "checkpoint_every": 0}
        results = []
        try:
            for index, preprocessed_dir in enumerate(preprocessed_dirs):
                trial_dir = output / "trials" / f"trial-{trial.number}-{index}"
                results.append(run_meta_training(preprocessed_dir, cfg["method"], train_config, str(trial_dir),
                                                 resume=False))  # fmt: skip
                shutil.rmtree(trial_dir, ignore_errors=True)
            mean = {
                key: statistics.fmean(float(r[key]) for r in results) for key in ("val_mae", "val_ndcg@3")
            }
            if math.isnan(mean[metric]):
                raise FloatingPointError(f"{metric} is NaN")
        except Exception as err:
            # One diverged or refused config fails its trial (Optuna marks it FAIL), not the study.
            failed.append({"trial": trial.number, "params": params, "error": f"{type(err).__name__}: {err}"})
            logger.warning("trial %d %s failed: %s", trial.number, params, failed[-1]["error"])
            raise
        value = mean[metric]
        records.append({"trial": trial.number, "params": params, "value": value, **mean,
                        "per_split": [{k: r[k] for k in ("val_mae", "val_ndcg@3")} for r in results],
                        "train_seconds": round(sum(r["train_seconds"] for r in results), 2)})  # fmt: skip
        logger.info("trial %d %s: %s %.4f", trial.number, params, metric, value)
        return value

    # ERROR: Optuna logs a failed trial's whole traceback as a warning; the error itself is raised.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(
        direction=direction, sampler=optuna.samplers.TPESampler(seed=int(cfg["seed"]))
    )
    # Trial 0 is training's current defaults, so the result says what the search gained over them.
    study.enqueue_trial(_default_params(cfg["space"]), skip_if_exists=True)
    study.optimize(objective, n_trials=int(cfg["trials"]), timeout=cfg["timeout_s"], catch=(Exception,))
    if not records:
        raise RuntimeError(
            f"every trial failed ({len(failed)}); the first: trial {failed[0]['trial']} "
            f"{failed[0]['params']}: {failed[0]['error']}"
            if failed
            else "no trial ran (timeout_s before the first one ended?)"
        )
    best = study.best_trial
    best_record = next(r for r in records if r["trial"] == best.number)
    run_config = {"methods": [cfg["method"]], "train": {**cfg["fixed"], **best.params}}
    config_path = output / "best-run-config.yaml"
    header = (f"# metarec tune: best of {len(records)} trials of {cfg['method']} by {metric} "
              f"({best_record['value']:.4f}); validation users only, test users never read.\n")  # fmt: skip
    config_path.write_text(header + yaml.safe_dump(run_config, sort_keys=True))
    summary = {
        "method": cfg["method"],
        "objective": metric,
        "direction": direction,
        "best": {**best_record, "params": best.params},
        "defaults": records[0] if records and records[0]["trial"] == 0 else None,
        "trials": records,
        "failed": failed,
        "fixed": cfg["fixed"],
        "splits": [str(d) for d in preprocessed_dirs],
        "run_config": str(config_path),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    (output / "tuning.json").write_text(json.dumps(summary, indent=2, default=float))
    shutil.rmtree(output / "trials", ignore_errors=True)
    return summary


def _default_params(space: list[str]) -> dict[str, Any]:
    """Training's current defaults for the searched names (values outside the space are clipped)."""
    from metarec.training import DEFAULTS as TRAINING_DEFAULTS

    params = {}
    for name in space:
        kind, spec = SEARCH_SPACE[name]
        value = TRAINING_DEFAULTS[name]
        if kind == "choice":
            params[name] = value if value in spec else spec[0]
        else:
            params[name] = min(max(value, spec[0]), spec[1])
    return params
