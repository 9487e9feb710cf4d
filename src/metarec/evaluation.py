"""Cold-start evaluation of meta-learned models against honest baselines.

For every scenario of the contract (warm, user_cold, item_cold, user_item_cold) each meta-learned
model is adapted on each user's support rows with its own stored adapt settings and scores the query
rows; every baseline is fitted on the train users' support rows (the same data meta-training sees),
with its hyper-parameters chosen on the *validation* users, never on test users. K-shot curves restrict
the support set to rows with ``kshot_rank < K``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from metarec.baselines import BASELINE_NAMES, RatingBaseline
from metarec.metrics import DEFAULT_NDCG_KS, KSHOT_METRICS
from metarec.model import ModelConfig, PreferenceModel
from metarec.selection import VALIDATION_OF
from metarec.settings import Settings

if TYPE_CHECKING:
    from metarec.tasks import Preprocessed, TaskBatch

logger = logging.getLogger(__name__)

SCENARIOS = ("warm", "user_cold", "item_cold", "user_item_cold")

# The baseline grids: with tune_on_val every combination is fitted on the train rows and the one with
# the lowest MAE on the *validation* users (user_cold) is kept; without it (or without validation
# users) the first value of each list is used. A partial grid in a config is merged over these.
_GRIDS = {
    "item_user_bias": {"item_reg": [10.0, 2.0, 5.0, 25.0], "user_reg": [5.0, 0.5, 1.0, 2.0, 10.0]},
    "mf_foldin": {
        "factors": [10, 5, 20],
        "reg": [10.0, 3.0, 30.0],  # ALS ridge penalty on the factors
        "foldin_reg_scale": [1.0, 0.1, 0.3, 3.0],  # fold-in factor penalty = reg * scale
        "foldin_bias_reg": [5.0, 1.0, 2.0],  # fold-in penalty on the new user's bias
        "iterations": 15,  # ALS sweeps (not tuned)
    },
    # Adam on all training rows; early stopping on validation MAE when tune_on_val.
    "global_model": {"epochs": 30, "lr": 1e-3, "weight_decay": 0.0, "batch_size": 256, "patience": 3},
    # Adapter inner loop on the global model: plain SGD steps and learning rates (grids), adapt mode.
    "finetune": {"mode": "all", "steps": [10, 5], "lr": [0.01, 0.003, 0.03]},
}


def _grid(name: str) -> Any:
    return dataclasses.field(default_factory=lambda: copy.deepcopy(_GRIDS[name]))


@dataclasses.dataclass(frozen=True)
class EvaluateSettings(Settings):
    """The ``evaluate`` section of a run config (keys of :data:`DEFAULTS`)."""

    section = "evaluate"
    seed: int | None = None  # MF init / global-model seed and the document's "seeds"; None: the split seed
    scenarios: tuple[str, ...] = SCENARIOS  # subset of SCENARIOS to evaluate
    baselines: tuple[str, ...] = BASELINE_NAMES  # baselines to fit (finetune brings global_model along)
    kshots: tuple[int, ...] | None = None  # K values of the K-shot curves; None: the schema's tasks.kshots
    kshot_scenarios: tuple[str, ...] = ("user_cold",)  # scenarios that get a K-shot curve
    ndcg_ks: tuple[int, ...] = DEFAULT_NDCG_KS  # nDCG cut-offs
    selection_metric: str = "ndcg@3"  # decides best_meta (on validation users) / best_baseline (user_cold)
    task_chunk: int = 128  # tasks adapted per vmapped call (bounds memory)
    tune_on_val: bool = True  # tune baseline grids on validation users (never on test users)
    item_user_bias: dict = _grid("item_user_bias")
    mf_foldin: dict = _grid("mf_foldin")
    global_model: dict = _grid("global_model")
    finetune: dict = _grid("finetune")
    # Peer references (metarec.peers): names, or name -> grid overrides; each retrains per scenario (slow).
    peers: Any = ()  # a list of names, or a mapping name -> grid overrides (checked by metarec.peers)
    per_user: bool = False  # keep per-user metric parts in the document (paired bootstrap, metarec.stats)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> EvaluateSettings:
        """As :meth:`Settings.from_dict`; a grid section is merged over its defaults, key by key."""
        merged = {**dict(values or {}), **overrides}
        for name, defaults in _GRIDS.items():
            if name not in merged:
                continue
            value = merged[name]
            if not isinstance(value, Mapping):
                raise ValueError(f"evaluation config {name!r} must be a mapping, got {value!r}")
            unknown = sorted(set(value) - set(defaults))
            if unknown:
                raise ValueError(
                    f"unknown keys {unknown} in evaluation config {name!r}; known: {sorted(defaults)}"
                )
            merged[name] = {**copy.deepcopy(defaults), **value}
        return super().from_dict(merged)

    def validate(self) -> None:
        """Refuses unknown scenarios and baselines."""
        unknown_scenarios = set(self.scenarios) - set(SCENARIOS)
        if unknown_scenarios:
            raise ValueError(f"unknown scenarios {sorted(unknown_scenarios)}; known: {list(SCENARIOS)}")
        unknown_baselines = set(self.baselines) - set(BASELINE_NAMES)
        if unknown_baselines:
            raise ValueError(f"unknown baselines {sorted(unknown_baselines)}; known: {list(BASELINE_NAMES)}")

    def fitted_baselines(self) -> tuple[str, ...]:
        """The baselines to fit and score: ``baselines``, with global_model when finetune needs it."""
        if "finetune" in self.baselines and "global_model" not in self.baselines:
            # finetune starts from the global model, so it cannot run alone.
            return (*self.baselines, "global_model")
        return self.baselines


# The evaluate section's keys and defaults as a dict (run-config validation, docs).
DEFAULTS: dict = EvaluateSettings().to_dict()


def _as_list(value) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def _chunked_predict(predict_fn, batch, chunk: int) -> torch.Tensor:
    """Runs ``predict_fn`` on slices of ``chunk`` tasks and concatenates the [T, Q] results."""
    if len(batch) == 0:
        return torch.zeros(batch.query_items.shape)
    if getattr(predict_fn, "whole_batch", False):  # peers retrain per call: one call per scenario
        chunk = len(batch)
    parts = [predict_fn(batch.select(slice(start, start + chunk))) for start in range(0, len(batch), chunk)]
    return torch.cat([part.detach().float() for part in parts], dim=0)


def _score(predictions: torch.Tensor, batch, ndcg_ks) -> dict[str, float]:
    from metarec.metrics import rating_metrics

    return rating_metrics(predictions, batch.query_ratings, batch.query_mask, ks=ndcg_ks)


def _val_mae(predict_fn, batch, chunk: int) -> float:
    from metarec.metrics import mae

    return mae(_chunked_predict(predict_fn, batch, chunk), batch.query_ratings, batch.query_mask)


def _tune(name: str, candidates: list[tuple[dict, object]], val_batch, chunk: int, tune: bool):
    """Returns (settings, fitted baseline) with the lowest validation MAE among ``candidates``."""
    if not tune or val_batch is None or len(candidates) == 1:
        return candidates[0]
    scored = []
    for settings, baseline in candidates:
        value = _val_mae(baseline.predict, val_batch, chunk)
        scored.append((value if not math.isnan(value) else math.inf, settings, baseline))
        logger.info("tuning %s %s: val MAE %.4f", name, settings, value)
    best = min(scored, key=lambda item: item[0])
    return best[1], best[2]


def fit_baselines(
    pre: Preprocessed,
    config: EvaluateSettings,
    val_batch: TaskBatch | None,
    model_config: ModelConfig | None,
    seed: int,
    start_training: dict | None = None,
) -> dict[str, tuple[RatingBaseline, dict]]:
    """Fits (and tunes on validation users) every configured baseline on the train users' support rows.

    Args:
        pre: A loaded :class:`metarec.tasks.Preprocessed`.
        config: The evaluation settings.
        val_batch: Validation-user user_cold tasks used for tuning, or None to use the first grid values.
        model_config: The global model's architecture, so that it matches the meta-learned one (the
            comparison isolates the training method); None: the model defaults on the data's rating range.
        seed: Seed for MF initialisation and the global model.
        start_training: The first meta-learned model's training settings (its model.json
            ``training``), which ``fitted_start`` rebuilds its starting point from; None: the defaults.

    Returns:
        Baseline name -> (fitted baseline with ``predict(batch)``, chosen settings).
    """
    from metarec.baselines import Finetune, GlobalMean, GlobalModel, ItemUserBias, MFFoldIn

    users, items, ratings = pre.training_rows()
    n_items = int(pre.item_warm_idx.shape[0])
    rating_min, rating_max = float(pre.schema["rating_min"]), float(pre.schema["rating_max"])
    scale = {"rating_min": rating_min, "rating_max": rating_max}
    chunk, tune = config.task_chunk, config.tune_on_val
    fitted: dict[str, tuple[RatingBaseline, dict]] = {}
    wanted = config.fitted_baselines()

    if "global_mean" in wanted:
        fitted["global_mean"] = (GlobalMean(**scale).fit(users, items, ratings, n_items), {})

    if "item_user_bias" in wanted:
        grid = config.item_user_bias
        settings_list = [
            {"item_reg": i, "user_reg": u}
            for i in _as_list(grid["item_reg"])
            for u in _as_list(grid["user_reg"])
        ]
        if not tune:
            settings_list = settings_list[:1]
        candidates = [
            (s, ItemUserBias(**s, **scale).fit(users, items, ratings, n_items)) for s in settings_list
        ]
        settings, baseline = _tune("item_user_bias", candidates, val_batch, chunk, tune)
        fitted["item_user_bias"] = (baseline, settings)

    if "mf_foldin" in wanted:
        grid = config.mf_foldin
        candidates = []
        factor_grid = _as_list(grid["factors"]) if tune else _as_list(grid["factors"])[:1]
        reg_grid = _as_list(grid["reg"]) if tune else _as_list(grid["reg"])[:1]
        scale_grid = _as_list(grid["foldin_reg_scale"]) if tune else _as_list(grid["foldin_reg_scale"])[:1]
        bias_grid = _as_list(grid["foldin_bias_reg"]) if tune else _as_list(grid["foldin_bias_reg"])[:1]
        for factors in factor_grid:
            for reg in reg_grid:
                model = MFFoldIn(
                    factors=factors, reg=reg, iterations=int(grid["iterations"]), seed=seed, **scale
                )
                model.fit(users, items, ratings, n_items)
                # Fold-in strength is tuned without refitting: copies share the trained item factors.
                for foldin_scale in scale_grid:
                    for foldin_bias_reg in bias_grid:
                        variant = copy.copy(model)
                        variant.foldin_reg = reg * foldin_scale
                        variant.foldin_bias_reg = float(foldin_bias_reg)
                        settings = {"factors": factors, "reg": reg, "foldin_reg": variant.foldin_reg,
                                    "foldin_bias_reg": variant.foldin_bias_reg}  # fmt: skip
                        candidates.append((settings, variant))
        settings, baseline = _tune("mf_foldin", candidates, val_batch, chunk, tune)
        fitted["mf_foldin"] = (baseline, settings)

    if "global_model" in wanted:
        torch.manual_seed(seed)
        encoder = pre.encoder
        model = PreferenceModel(
            encoder.user_dims,
            encoder.item_dims,
            int(pre.schema["n_warm_items"]),
            pre.item_features,
            pre.item_warm_idx,
            model_config or ModelConfig(rating_min=rating_min, rating_max=rating_max),
        )
        settings = dict(config.global_model)
        global_model = GlobalModel(model, pre.user_features, seed=seed, **settings, **scale)
        global_model.fit(users, items, ratings, n_items, validation=val_batch if tune else None)
        settings["epochs_run"] = len(global_model.history)
        fitted["global_model"] = (global_model, settings)

        if "finetune" in wanted:
            grid = config.finetune
            settings_list = [
                {"mode": grid["mode"], "steps": int(s), "lr": float(lr)}
                for s in _as_list(grid["steps"])
                for lr in _as_list(grid["lr"])
            ]
            if not tune:
                settings_list = settings_list[:1]
            candidates = [
                (s, Finetune(global_model.model, **s, **scale).fit(users, items, ratings, n_items))
                for s in settings_list
            ]
            settings, baseline = _tune("finetune", candidates, val_batch, chunk, tune)
            fitted["finetune"] = (baseline, settings)

    if "fitted_start" in wanted:
        start = FittedStart(pre, start_training, seed)
        fitted["fitted_start"] = (start, start.describe())
    return fitted


class FittedStart:
    """The meta-learners' own starting point, adapted per task by their own inner loop, never meta-trained.

    The same model as a meta-learned one at meta-step 0 (``model_init.build_model``: ALS item tables,
    shrunk item means, the content ridge) with the same adapt settings, so the comparison with it shows
    what meta-training itself adds, which none of the other baselines can (they start elsewhere).

    Args:
        pre: A loaded :class:`metarec.tasks.Preprocessed`.
        training: The meta-learned model's training settings; None: the training defaults.
        seed: The seed used when ``training`` names none.
    """

    def __init__(self, pre, training: dict | None, seed: int):
        from metarec.meta import Adapter
        from metarec.model_init import build_model
        from metarec.training import TrainSettings

        values = dict(training or {})
        values.setdefault("seed", seed)
        self.settings = TrainSettings.from_dict(values)
        torch.manual_seed(self.settings.seed)  # as the trainer seeds before building the same model
        self.model = build_model(pre, self.settings)
        self.adapter = Adapter(self.model, self.settings.adapt())

    def predict(self, batch) -> torch.Tensor:
        """Adapts to each task's support rows and predicts its query rows (Float[T, Q])."""
        return self.adapter.score_tasks(batch)

    def describe(self) -> dict:
        """Its settings as the evaluation document records them."""
        return {"meta_steps": 0, "seed": self.settings.seed, "adapt": self.settings.adapt().to_dict()}


class MetaModelPredictor:
    """A meta-learned model directory, adapted per task with its stored adapt settings.

    Args:
        model_dir: Directory with model.pt / model.json (``PreferenceModel.save``).
    """

    def __init__(self, model_dir: str | Path):
        from metarec.meta import Adapter, AdaptSettings
        from metarec.model import PreferenceModel, read_model_json

        self.model_dir = str(model_dir)
        self.model = PreferenceModel.from_dir(model_dir)
        document = read_model_json(model_dir)
        self.settings = AdaptSettings.from_dict(document.get("adapt"))
        self.adapter = Adapter(self.model, self.settings)
        self.method = document.get("method")

    def predict(self, batch) -> torch.Tensor:
        """Adapts to each task's support rows and predicts its query rows.

        Args:
            batch: Few-shot tasks.

        Returns:
            Float[T, Q] predicted ratings.
        """
        return self.adapter.score_tasks(batch)


def run_evaluation(
    preprocessed_dir: str, model_dirs: dict[str, str], config: dict | None, output_dir: str
) -> dict:
    """Evaluates meta-learned models and baselines on every cold-start scenario.

    Args:
        preprocessed_dir: Preprocessing output directory (``Preprocessed.load``).
        model_dirs: Method name (e.g. "maml") -> model directory; may be empty (baselines only).
        config: Overrides of :data:`DEFAULTS`; unknown keys raise ValueError.
        output_dir: Directory for ``evaluation.json``, ``report.md`` and ``kshot.png`` (created).

    Returns:
        The evaluation document (also written to ``evaluation.json``): ``dataset``, ``seeds``,
        ``scenarios`` (scenario -> method -> metrics incl. ``<metric>_std`` = 0 for one seed),
        ``validation`` (``user_cold`` / ``user_item_cold`` on the validation users -> method -> metrics:
        what every choice among the methods reads), ``kshot`` (scenario -> method -> K -> metrics),
        ``methods`` (kind, model dir or tuned settings), ``best_meta`` (by ``selection_metric`` on the
        validation users), ``best_baseline`` (the strongest on the test users), ``selection_metric``.

    Raises:
        ValueError: Unknown config keys, scenarios or baselines, a method name used twice, or peers whose
            packages (the ``bench`` extra) are not installed.
    """
    from metarec import stats
    from metarec.peers import PEER_NAMES, fit_peers, require_packages, resolve_peers
    from metarec.report import write_report
    from metarec.selection import best_methods
    from metarec.tasks import Preprocessed, scenario_tasks

    config = EvaluateSettings.from_dict(config)
    # Peers need the bench extra, which no image installs: refuse before loading data or fitting baselines.
    require_packages(resolve_peers(config.peers))
    clash = set(model_dirs) & (set(BASELINE_NAMES) | set(PEER_NAMES))
    if clash:
        raise ValueError(f"model names {sorted(clash)} clash with baseline names")
    started = time.monotonic()
    pre = Preprocessed.load(preprocessed_dir)
    seed = config.seed
    if seed is None:
        seed = int(pre.schema.get("splits", {}).get("seed", 0))
    ndcg_ks = list(config.ndcg_ks)
    chunk = config.task_chunk
    kshots = config.kshots or pre.schema.get("tasks", {}).get("kshots", [1, 3, 5, 10, 20])

    meta_models = {name: MetaModelPredictor(path) for name, path in model_dirs.items()}
    architecture = None
    if meta_models:
        # The global-model baseline gets the first meta-learned model's network on this data's rating
        # range (learn_inner_lr is meta-learning only), so the comparison isolates the training method.
        first = next(iter(meta_models.values())).model.settings
        architecture = first.replace(
            rating_min=float(pre.schema["rating_min"]),
            rating_max=float(pre.schema["rating_max"]),
            learn_inner_lr=False,
        )

    val_batch = None
    if config.tune_on_val:
        val_users, val_batch = scenario_tasks(pre, "user_cold", users_split="val")
        if len(val_users) == 0:
            logger.warning("no validation users: baselines use their untuned defaults")
            val_batch = None
    start_training = None
    if meta_models:
        from metarec.model import read_model_json

        start_training = read_model_json(next(iter(meta_models.values())).model_dir).get("training")
    fitted = fit_baselines(pre, config, val_batch, architecture, seed, start_training)
    peers = fit_peers(pre, config.peers, val_batch, seed)
    logger.info("baselines fitted in %.1fs", time.monotonic() - started)

    predictors = {name: predictor.predict for name, predictor in meta_models.items()}
    predictors.update(
        {
            name: baseline.predict
            for name, (baseline, _) in fitted.items()
            if name in config.fitted_baselines()
        }
    )
    predictors.update({name: peer.predict for name, peer in peers.items()})

    # The validation users' scores, which every choice among the methods reads (the model to ship, the
    # publishing gate, the report's and the bench's best meta-learner); the test users' scores below are
    # only reported. Their baselines and checkpoints were tuned on these users, so they run optimistic.
    validation: dict[str, dict] = {}
    for scenario in dict.fromkeys(VALIDATION_OF[s] for s in config.scenarios):
        users, batch = scenario_tasks(pre, scenario, users_split="val")
        if not users:
            logger.warning("no validation users with %s query rows: nothing can be chosen on them", scenario)
            continue
        validation[scenario] = {
            name: _score(_chunked_predict(predict_fn, batch, chunk), batch, ndcg_ks)
            for name, predict_fn in predictors.items()
        }

    scenarios: dict[str, dict] = {}
    per_user: dict[str, dict] = {}
    for scenario in config.scenarios:
        users, batch = scenario_tasks(pre, scenario)
        scenarios[scenario] = {}
        if config.per_user:
            per_user[scenario] = {"users": users, "n_rows": stats.query_rows(batch), "methods": {}}
        for name, predict_fn in predictors.items():
            predictions = _chunked_predict(predict_fn, batch, chunk)
            scores = _score(predictions, batch, ndcg_ks)
            if config.per_user:
                per_user[scenario]["methods"][name] = stats.per_user_parts(predictions, batch, ndcg_ks)
            for metric in [m for m in scores if m not in ("n_users", "n_rows")]:
                scores[f"{metric}_std"] = 0.0
            scenarios[scenario][name] = scores
        logger.info("scenario %s: %d tasks", scenario, len(batch))

    kshot: dict[str, dict] = {}
    for scenario in config.kshot_scenarios:
        kshot[scenario] = {name: {} for name in predictors}
        for k in kshots:
            _, batch = scenario_tasks(pre, scenario, kshot=int(k))
            for name, predict_fn in predictors.items():
                scores = _score(_chunked_predict(predict_fn, batch, chunk), batch, ndcg_ks)
                kshot[scenario][name][str(int(k))] = {metric: scores[metric] for metric in KSHOT_METRICS}

    methods = {
        name: {"kind": "meta", "model_dir": predictor.model_dir, "adapt": predictor.settings.to_dict()}
        for name, predictor in meta_models.items()
    }
    methods.update(
        {name: {"kind": "baseline", "settings": settings} for name, (_, settings) in fitted.items()}
    )
    methods.update({name: peer.describe() for name, peer in peers.items()})
    document = {
        "dataset": pre.schema.get("dataset", "unknown"),
        "seeds": [seed],
        "scenarios": scenarios,
        "validation": validation,
        "kshot": kshot,
        "methods": methods,
        "selection_metric": config.selection_metric,
        "kshots": [int(k) for k in kshots],
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    if per_user:
        document["per_user"] = per_user
    _set_best(document, best_methods)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "evaluation.json").write_text(json.dumps(_json_safe(document), indent=2, sort_keys=False))
    write_report(document, output)
    return document


def _set_best(document: dict, best_methods) -> None:
    scenario = (
        "user_cold" if "user_cold" in document["scenarios"] else next(iter(document["scenarios"]), None)
    )
    best_meta, best_baseline = (None, None)
    if scenario is not None:
        best_meta, best_baseline = best_methods(
            document, document.get("selection_metric", "ndcg@3"), scenario
        )
    document["best_meta"], document["best_baseline"] = best_meta, best_baseline


def _json_safe(value):
    """Replaces NaN/inf by None so that evaluation.json is strict JSON."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def _aggregate_section(documents: list[dict], section: str) -> dict[str, dict]:
    """scenario -> method -> mean and ``<metric>_std`` over the documents' ``section`` (``scenarios`` or
    ``validation``); a method is averaged over the seeds that have it."""
    out: dict[str, dict] = {}
    for scenario in documents[0].get(section, {}):
        out[scenario] = {}
        methods = dict.fromkeys(m for doc in documents for m in doc.get(section, {}).get(scenario, {}))
        for method in methods:
            per_seed = [
                doc[section][scenario][method]
                for doc in documents
                if method in doc.get(section, {}).get(scenario, {})
            ]
            metrics = [m for m in per_seed[0] if not m.endswith("_std") and m not in ("n_users", "n_rows")]
            aggregated = {}
            for metric in metrics:
                aggregated[metric], aggregated[f"{metric}_std"] = _mean_std(
                    [scores.get(metric) for scores in per_seed]
                )
            for count in ("n_users", "n_rows"):
                if count in per_seed[0]:
                    aggregated[count] = statistics.fmean(scores[count] for scores in per_seed)
            out[scenario][method] = aggregated
    return out


def aggregate_seeds(documents: list[dict]) -> dict:
    """Mean and standard deviation over per-seed evaluation documents.

    Args:
        documents: Evaluation documents of the same methods and scenarios, one per seed.

    Returns:
        One document of the same shape: every metric is the mean over seeds, ``<metric>_std`` the
        sample standard deviation (0 for a single seed); K-shot points are averaged the same way;
        ``seeds`` lists every seed; ``validation`` is averaged like ``scenarios``; ``best_meta`` /
        ``best_baseline`` are recomputed on the means.
        Methods missing from some seeds are averaged over the seeds that have them.

    Raises:
        ValueError: For an empty list.
    """
    from metarec.selection import best_methods

    if not documents:
        raise ValueError("aggregate_seeds needs at least one evaluation document")
    first = documents[0]
    scenarios = _aggregate_section(documents, "scenarios")
    validation = _aggregate_section(documents, "validation")
    kshot: dict[str, dict] = {}
    for scenario, curves in first.get("kshot", {}).items():
        kshot[scenario] = {}
        for method in curves:
            kshot[scenario][method] = {}
            for k in curves[method]:
                points = [
                    doc["kshot"][scenario][method][k]
                    for doc in documents
                    if k in doc.get("kshot", {}).get(scenario, {}).get(method, {})
                ]
                point = {}
                for metric in points[0]:
                    point[metric], point[f"{metric}_std"] = _mean_std([p.get(metric) for p in points])
                kshot[scenario][method][k] = point
    methods: dict[str, dict] = {}
    for doc in documents:
        for name, info in doc.get("methods", {}).items():
            entry = methods.setdefault(name, {"kind": info.get("kind", "baseline"), "per_seed": []})
            entry["per_seed"].append({key: value for key, value in info.items() if key != "kind"})
    document = {
        "dataset": first.get("dataset", "unknown"),
        "seeds": [seed for doc in documents for seed in doc.get("seeds", [])],
        "scenarios": scenarios,
        "validation": validation,
        "kshot": kshot,
        "methods": methods,
        "selection_metric": first.get("selection_metric", "ndcg@3"),
    }
    if "kshots" in first:
        document["kshots"] = first["kshots"]
    _set_best(document, best_methods)
    return document
