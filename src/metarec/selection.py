"""Model selection: the best meta-learned candidate, gated against the best honest baseline."""

from __future__ import annotations

import dataclasses
import logging
import math

from metarec.metrics import higher_is_better
from metarec.settings import Settings

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SelectSettings(Settings):
    """The ``select`` section of a run config.

    Attributes:
        metric: the selection metric: ``"ndcg@<k>"`` (higher is better), ``"mae"`` or ``"rmse"``.
        scenario: the scenario whose scores decide.
        fail_if_worse: raise when the selected model does not beat the best baseline.
    """

    section = "select"
    metric: str = "ndcg@3"
    scenario: str = "user_cold"
    fail_if_worse: bool = False

    def validate(self) -> None:
        """Refuses an unknown metric."""
        higher_is_better(self.metric)


DEFAULTS = SelectSettings().to_dict()


class ModelSelectionError(RuntimeError):
    """The best meta-learned model does not beat the best baseline and the caller asked to fail."""


def _method_kind(evaluation: dict, method: str) -> str:
    """Returns "meta" or "baseline" for ``method`` as recorded in the evaluation document."""
    return evaluation.get("methods", {}).get(method, {}).get("kind", "baseline")


def _rank_key(scores: dict, metric: str) -> tuple[float, float]:
    """Sort key (smaller is better): the metric (negated when higher is better), then MAE."""
    value = scores.get(metric, math.nan)
    tie_breaker = scores.get("mae", math.inf)
    if value is None or math.isnan(value):
        return (math.inf, tie_breaker)
    return (-value if higher_is_better(metric) else value, tie_breaker)


def _best(candidates: dict[str, dict], metric: str) -> str | None:
    """Name of the best method among ``candidates`` (sorted by name first so ties are deterministic)."""
    if not candidates:
        return None
    return min(sorted(candidates), key=lambda name: _rank_key(candidates[name], metric))


def best_methods(
    evaluation: dict, metric: str = "ndcg@3", scenario: str = "user_cold"
) -> tuple[str | None, str | None]:
    """The best meta-learned method and the best baseline of one scenario.

    Args:
        evaluation: Evaluation document.
        metric: Ranking metric (direction from :func:`metarec.metrics.higher_is_better`); ties by MAE.
        scenario: Scenario to rank in.

    Returns:
        (best meta method or None, best baseline or None).
    """
    higher_is_better(metric)
    scores = evaluation.get("scenarios", {}).get(scenario, {})
    meta = {name: s for name, s in scores.items() if _method_kind(evaluation, name) == "meta"}
    baselines = {name: s for name, s in scores.items() if _method_kind(evaluation, name) != "meta"}
    return _best(meta, metric), _best(baselines, metric)


def select_model(
    evaluation: dict,
    metric: str = SelectSettings.metric,
    scenario: str = SelectSettings.scenario,
    fail_if_worse: bool = SelectSettings.fail_if_worse,
) -> dict:
    """Picks the best meta-learned model of an evaluation and checks it beats every baseline.

    Args:
        evaluation: Evaluation document (``evaluation.json`` content): ``scenarios`` maps a scenario
            to ``{method: {metric: value}}`` and ``methods`` maps a method to ``{"kind": "meta" |
            "baseline", ...}``.
        metric: Selection metric: ``"ndcg@<k>"`` (higher is better), ``"mae"`` or ``"rmse"`` (lower
            is better). Ties are broken by the lower MAE.
        scenario: Scenario whose scores decide, normally ``"user_cold"``.
        fail_if_worse: Raise instead of only warning when the selected model does not beat the best
            baseline.

    Returns:
        ``{"selected": best meta method, "metric", "scenario", "value": its score, "best_baseline":
        best baseline method or None, "baseline_value": its score or None, "beats_baseline": bool,
        "model_dir": the selected model's directory if recorded, "message": a one-line summary}``.

    Raises:
        ValueError: Unknown metric or scenario, or no meta-learned candidate in the document.
        ModelSelectionError: ``fail_if_worse`` is set and the selected model does not strictly beat the
            best baseline on ``metric``.
    """
    higher = higher_is_better(metric)
    scenarios = evaluation.get("scenarios", {})
    if scenario not in scenarios:
        raise ValueError(f"scenario {scenario!r} not in the evaluation (has {sorted(scenarios)})")
    scores = scenarios[scenario]
    meta = {name: s for name, s in scores.items() if _method_kind(evaluation, name) == "meta"}
    baselines = {name: s for name, s in scores.items() if _method_kind(evaluation, name) != "meta"}
    if not meta:
        raise ValueError(f"no meta-learned candidate in scenario {scenario!r} (methods: {sorted(scores)})")

    selected = _best(meta, metric)
    value = meta[selected].get(metric)
    best_baseline = _best(baselines, metric)
    baseline_value = baselines[best_baseline].get(metric) if best_baseline else None
    if best_baseline is None or baseline_value is None or math.isnan(baseline_value):
        beats = True
        message = f"selected {selected} ({metric}={value:.4f} on {scenario}); no baseline to compare with"
    else:
        beats = value > baseline_value if higher else value < baseline_value
        relation = "beats" if beats else "does NOT beat"
        message = (
            f"selected {selected} ({metric}={value:.4f} on {scenario}) {relation} the best baseline "
            f"{best_baseline} ({metric}={baseline_value:.4f})"
        )
    result = {
        "selected": selected,
        "metric": metric,
        "scenario": scenario,
        "value": value,
        "best_baseline": best_baseline,
        "baseline_value": baseline_value,
        "beats_baseline": bool(beats),
        "model_dir": evaluation.get("methods", {}).get(selected, {}).get("model_dir"),
        "message": message,
    }
    if beats:
        logger.info(message)
    else:
        logger.warning("WARNING: %s", message)
        if fail_if_worse:
            raise ModelSelectionError(
                f"{message}; refusing to select it (fail_if_worse=True). Retrain or tune the meta-learners, "
                f"or set fail_if_worse=False to ship it anyway."
            )
    return result
