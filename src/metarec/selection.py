"""Model selection: the best meta-learned candidate, gated against the best honest baseline.

Every choice reads the validation users' scores (the evaluation document's ``validation`` section): the
model to ship, the publishing gate, and the best meta-learner the report and the bench name. The test
users' scores are only reported, so the figure reported for the chosen model is not the best of several
test scores.
"""

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

# The validation-user scenario a scenario's choices are made on: the validation users are cold users, so
# their query rows are user-cold and their cold-item rows user+item-cold (there are no warm validation
# users, and the item-cold rows of training users are the item-cold test itself).
VALIDATION_OF = {
    "warm": "user_cold",
    "user_cold": "user_cold",
    "item_cold": "user_item_cold",
    "user_item_cold": "user_item_cold",
}


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


def _split(evaluation: dict, scores: dict) -> tuple[dict, dict]:
    """(meta-learned methods' scores, every other method's scores)."""
    meta = {name: s for name, s in scores.items() if _method_kind(evaluation, name) == "meta"}
    return meta, {name: s for name, s in scores.items() if name not in meta}


def validation_scores(evaluation: dict, scenario: str) -> dict:
    """method -> metrics on the validation users a choice in ``scenario`` reads ({} when there are none)."""
    return evaluation.get("validation", {}).get(VALIDATION_OF.get(scenario, scenario), {})


def best_methods(
    evaluation: dict, metric: str = "ndcg@3", scenario: str = "user_cold"
) -> tuple[str | None, str | None]:
    """The product's meta-learned method and its strongest opponent in one scenario.

    Args:
        evaluation: Evaluation document.
        metric: Ranking metric (direction from :func:`metarec.metrics.higher_is_better`); ties by MAE.
        scenario: Scenario of the comparison.

    Returns:
        (the meta-learned method best on the validation users (:data:`VALIDATION_OF`), or None without
        validation scores; the baseline or reference best on the scenario's own (test) scores, or None).
        Choosing the opponent on the test users only makes a comparison against it harder to win.
    """
    higher_is_better(metric)
    meta, _ = _split(evaluation, validation_scores(evaluation, scenario))
    _, others = _split(evaluation, evaluation.get("scenarios", {}).get(scenario, {}))
    return _best(meta, metric), _best(others, metric)


def select_model(
    evaluation: dict,
    metric: str = SelectSettings.metric,
    scenario: str = SelectSettings.scenario,
    fail_if_worse: bool = SelectSettings.fail_if_worse,
) -> dict:
    """Picks the best meta-learned model of an evaluation and checks it beats every baseline, both on
    the validation users (the test users' scores are only reported).

    Args:
        evaluation: Evaluation document (``evaluation.json`` content): ``validation`` and ``scenarios``
            map a scenario to ``{method: {metric: value}}`` (validation and test users), and ``methods``
            maps a method to ``{"kind": "meta" | "baseline" | "reference", ...}``.
        metric: Selection metric: ``"ndcg@<k>"`` (higher is better), ``"mae"`` or ``"rmse"`` (lower
            is better). Ties are broken by the lower MAE.
        scenario: Scenario the choice is for, normally ``"user_cold"``; it is made on the validation
            users of :data:`VALIDATION_OF` ``[scenario]``.
        fail_if_worse: Raise instead of only warning when the selected model does not beat the best
            baseline.

    Returns:
        ``{"selected": best meta method, "metric", "scenario", "decided_on": "validation users
        (<scenario>)", "value": its validation score, "best_baseline": best other method on the
        validation users or None, "baseline_value": its validation score or None, "beats_baseline":
        bool, "test_value" / "baseline_test_value": the two methods' test scores (reported, never
        compared), "model_dir": the selected model's directory if recorded, "message"}``.

    Raises:
        ValueError: Unknown metric or scenario, no validation scores for it (the choice would read the
            test users), or no meta-learned candidate in the document.
        ModelSelectionError: ``fail_if_worse`` is set and the selected model does not strictly beat the
            best baseline on ``metric``.
    """
    higher = higher_is_better(metric)
    scenarios = evaluation.get("scenarios", {})
    if scenario not in scenarios:
        raise ValueError(f"scenario {scenario!r} not in the evaluation (has {sorted(scenarios)})")
    scores = validation_scores(evaluation, scenario)
    if not scores:
        raise ValueError(
            f"the evaluation has no validation users' scores for {scenario!r} "
            f"({VALIDATION_OF.get(scenario, scenario)!r} on the val split): choosing on its test users "
            f"would read the test split; re-run evaluate (it scores the validation users too)"
        )
    meta, baselines = _split(evaluation, scores)
    if not meta:
        raise ValueError(f"no meta-learned candidate in scenario {scenario!r} (methods: {sorted(scores)})")

    decided_on = f"validation users ({VALIDATION_OF.get(scenario, scenario)})"
    selected = _best(meta, metric)
    value = meta[selected].get(metric)
    best_baseline = _best(baselines, metric)
    baseline_value = baselines[best_baseline].get(metric) if best_baseline else None
    if best_baseline is None or baseline_value is None or math.isnan(baseline_value):
        beats = True
        message = f"selected {selected} ({metric}={value:.4f} on {decided_on}); no baseline to compare with"
    else:
        beats = value > baseline_value if higher else value < baseline_value
        relation = "beats" if beats else "does NOT beat"
        message = (
            f"selected {selected} ({metric}={value:.4f} on {decided_on}) {relation} the best baseline "
            f"{best_baseline} ({metric}={baseline_value:.4f})"
        )
    test = scenarios[scenario]
    result = {
        "selected": selected,
        "metric": metric,
        "scenario": scenario,
        "decided_on": decided_on,
        "value": value,
        "best_baseline": best_baseline,
        "baseline_value": baseline_value,
        "beats_baseline": bool(beats),
        "test_value": test.get(selected, {}).get(metric),
        "baseline_test_value": test.get(best_baseline, {}).get(metric) if best_baseline else None,
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
